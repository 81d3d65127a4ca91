"""Checks of the arguments the public API and the command line share.

Each check returns the value it accepts and raises :class:`~spear.errors.InputError` with
what was expected, what was found and what to try. The ``*_arg`` functions are the same
checks as ``argparse`` ``type=`` converters (they raise ``argparse.ArgumentTypeError``, which
``argparse`` reports as a usage error naming the option).

Examples
--------
>>> batch_size(16), batch_size(None), time_budget(2)
(16, None, 2.0)
>>> batch_size(-3)  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
spear.errors.InputError: batch_size must be a positive integer, found -3; ...
>>> time_budget(float("inf"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
spear.errors.InputError: time_budget must be ... found inf: ... pass a large finite number ...
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator

import torch

from spear.errors import InputError

__all__ = [
    "batch_size",
    "budget_or_zero_arg",
    "device",
    "input_range",
    "input_shape",
    "positive_int",
    "positive_int_arg",
    "seed",
    "seed_arg",
    "time_budget",
    "time_budget_arg",
]


def positive_int(value: object, name: str, *, hint: str = "") -> int:
    """``value`` as an ``int`` when it is an integer of at least 1.

    Parameters
    ----------
    value:
        Any object; ``int`` and integer scalars (NumPy, 0-d tensors) are accepted, ``bool``
        and floats are not.
    name:
        The argument's name, for the message.
    hint:
        What to try, appended to the message (default: ``pass e.g. {name}=16``).

    Raises
    ------
    InputError
        When ``value`` is not an integer or is below 1.
    """
    try:
        number = None if isinstance(value, bool) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or number < 1:
        shown = f"{value!r} ({type(value).__name__})" if number is None else repr(number)
        raise InputError(
            f"{name} must be a positive integer, found {shown}; {hint or f'pass e.g. {name}=16'}."
        )
    return int(number)


def batch_size(value: object) -> int | None:
    """A batch size for :func:`spear.attack` and :func:`spear.invert_layer`: ``None`` or >= 1.

    Raises
    ------
    InputError
        When ``value`` is not ``None`` and not a positive integer.
    """
    if value is None:
        return None
    return positive_int(
        value, "batch_size", hint="pass e.g. batch_size=16, or None to read it off the update"
    )


def _seconds_problem(seconds: float, name: str) -> str | None:
    """Why ``seconds`` is not a usable budget (``None`` when it is), with what to try."""
    if math.isinf(seconds) and seconds > 0:
        return (
            "found inf: a budget is required so that a search that cannot finish still "
            f"returns; pass a large finite number such as {name}=3600 instead"
        )
    if not seconds > 0 or math.isinf(seconds):  # NaN fails every comparison
        return f"found {seconds!r}; pass e.g. {name}=120"
    return None


def time_budget(value: object, name: str = "time_budget") -> float:
    """A time budget in seconds: a finite real number greater than 0.

    Infinity is refused: the search stops only when its budget runs out, so an unbounded
    budget could leave it running for ever on a batch it cannot finish.

    Raises
    ------
    InputError
        When ``value`` is not a real number, is NaN, infinite, zero or negative.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(
            f"{name} must be a number of seconds, found {value!r} ({type(value).__name__}); "
            f"pass e.g. {name}=120."
        )
    seconds = float(value)
    problem = _seconds_problem(seconds, name)
    if problem is not None:
        raise InputError(f"{name} must be a finite number of seconds greater than 0, {problem}.")
    return seconds


#: The largest seed: ``torch.manual_seed`` takes 64-bit integers, and seeds are offset
#: by small counts (restarts) in places, so seeds stay within the signed 64-bit range.
MAX_SEED = 2**63 - 1


def drop_probability(value: object) -> float | None:
    """A Dropout's drop probability ``p``: ``None``, or a real number with ``0 < p < 1``.

    Raises
    ------
    InputError
        When ``value`` is not a real number, or not strictly between 0 and 1.
    """
    if value is None:
        return None
    p = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    if p is None or not 0.0 < p < 1.0:
        raise InputError(
            f"dropout_p must be the Dropout's drop probability, a number strictly between 0 "
            f"and 1, found {value!r}; pass e.g. dropout_p=0.5, or None where it is not known."
        )
    return p


def seed(value: object) -> int:
    """A seed for the random choices: an integer in ``[0, 2**63 - 1]``.

    Raises
    ------
    InputError
        When ``value`` is not an integer (``bool`` and floats are not) or is outside the
        range.
    """
    try:
        number = None if isinstance(value, bool) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or not 0 <= number <= MAX_SEED:
        shown = f"{value!r} ({type(value).__name__})" if number is None else repr(number)
        raise InputError(
            f"seed must be an integer from 0 to 2**63 - 1, found {shown}; pass e.g. seed=0."
        )
    return int(number)


def input_range(value: object) -> tuple[float, float] | None:
    """``(low, high)`` of the model's inputs: two finite real numbers with ``low < high``.

    Raises
    ------
    InputError
        When ``value`` is not ``None`` and not a pair of finite numbers in increasing order.
    """
    if value is None:
        return None
    pair = tuple(value) if isinstance(value, (tuple, list)) else None
    if (
        pair is None
        or len(pair) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
    ):
        raise InputError(
            f"input_range must be a pair (low, high) of numbers, found {value!r} "
            f"({type(value).__name__}); pass e.g. input_range=(0.0, 1.0) for pixels."
        )
    low, high = float(pair[0]), float(pair[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(
            f"input_range must be finite numbers with low < high, found ({low!r}, {high!r}); "
            "pass e.g. input_range=(0.0, 1.0) for pixels."
        )
    return low, high


def input_shape(value: object) -> tuple[int, ...] | None:
    """The shape of one model input: a tuple (or list) of positive integers, or ``None``.

    Raises
    ------
    InputError
        When ``value`` is not ``None`` and not a non-empty sequence of positive integers.
    """
    if value is None:
        return None
    dims: list[int | None] = []
    if isinstance(value, (tuple, list, torch.Size)):
        for dim in value:
            try:
                dims.append(None if isinstance(dim, bool) else operator.index(dim))
            except TypeError:
                dims.append(None)
    if not dims or any(d is None or d < 1 for d in dims):
        raise InputError(
            f"input_shape must be a tuple of positive integers (the shape of one input, "
            f"without the batch dimension), found {value!r}; pass e.g. input_shape=(1, 28, 28)."
        )
    return tuple(int(d) for d in dims if d is not None)


def device(value: object) -> torch.device | None:
    """A device the linear algebra can run on, or ``None`` (the inputs' own device).

    Raises
    ------
    InputError
        When ``value`` does not name a device, or names a CUDA or MPS device that this
        torch build or machine does not have.
    """
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise InputError(
            f"device must be a string such as 'cpu' or 'cuda', or a torch.device, found "
            f"{value!r} ({type(value).__name__})."
        )
    try:
        dev = torch.device(value)
    except RuntimeError as exc:
        raise InputError(
            f"device={value!r} is not a device torch knows ({exc}); pass 'cpu', or 'cuda' on "
            "a machine with a GPU."
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch build ({torch.__version__}) has no CUDA support"
                if torch.version.cuda is None
                else "no GPU was found"
            )
            raise InputError(
                f"device={value!r} was requested but CUDA is not available: {why}. Use "
                "device='cpu', or install a CUDA build of torch on a machine with an NVIDIA "
                "GPU."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"device={value!r} was requested but this machine has {count} CUDA "
                f"device(s), numbered 0 to {count - 1}; pass one of them, or 'cuda'."
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(
            f"device={value!r} was requested but MPS (Apple GPU) is not available here; "
            "use device='cpu'."
        )
    return dev


def positive_int_arg(text: str) -> int:
    """``argparse`` type: a positive integer (for ``--batch-size``, ``--width``)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}.") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {number}.")
    return number


def seed_arg(text: str) -> int:
    """``argparse`` type: an integer from 0 to ``2**63 - 1`` (``--seed``)."""
    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to 2**63 - 1, found {text!r}; pass e.g. --seed 0."
        )
    return number


def time_budget_arg(text: str) -> float:
    """``argparse`` type: a finite number of seconds greater than 0 (``--time-budget``)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds, found {text!r}; pass e.g. --time-budget 120."
        ) from None
    problem = _seconds_problem(seconds, "--time-budget")
    if problem is not None:
        raise argparse.ArgumentTypeError(
            f"expected a finite number of seconds greater than 0, {problem}."
        )
    return seconds


def budget_or_zero_arg(text: str) -> float:
    """``argparse`` type: ``0`` (skip the step) or a budget as :func:`time_budget_arg`
    takes it (``--image-budget``)."""
    try:
        if float(text) == 0.0:
            return 0.0
    except ValueError:
        pass
    return time_budget_arg(text)
