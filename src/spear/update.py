"""What a client's update is, and whether it fits the model it was computed on.

An *update* is a mapping parameter-name -> tensor keyed like ``model.named_parameters()``,
each tensor with its parameter's shape. Its *kind* says how to read it:

* ``"gradient"`` -- FedSGD: the loss gradient on the client's batch (any loss reduction,
  per-example clipping allowed);
* ``"delta"`` -- FedAvg: the weights after local training minus the weights sent, that is
  minus a learning rate times summed gradients.

Every entry point checks its arguments here once and passes the checked values on:

* :func:`check_update_kind` -- an ``update_kind`` argument as an :data:`UpdateKind`;
* :func:`check_update` -- the update holds exactly the model's parameters, with their
  shapes, in a floating-point dtype spear reads and with finite values (what a client
  returns; :func:`spear.attack` and :func:`spear.certify` need every parameter);
* :func:`check_partial_update` -- the update holds some of the model's parameters (frozen
  ones may be absent), with their shapes and finite values (the baseline attacks, which
  read only the layers they use).

Examples
--------
>>> check_update_kind("delta")
'delta'
>>> check_update_kind("weights")  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
spear.errors.InputError: update_kind must be 'gradient' or 'delta', found 'weights': ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from spear.errors import InputError

__all__ = [
    "UPDATE_KINDS",
    "UpdateKind",
    "check_partial_update",
    "check_update",
    "check_update_kind",
    "check_values",
    "float32_in_float64",
    "without_buffers",
]

#: What a client's update is: ``"gradient"`` (FedSGD, any loss reduction, clipping) or
#: ``"delta"`` (FedAvg: weights after local training minus the weights sent; ReLU masks
#: may move between local steps, and the sign is that of minus a gradient).
UpdateKind = Literal["gradient", "delta"]
#: Every :data:`UpdateKind`, in the order messages list them.
UPDATE_KINDS: tuple[UpdateKind, ...] = ("gradient", "delta")


def check_update_kind(value: object) -> UpdateKind:
    """``value`` as an :data:`UpdateKind`, when it names one.

    Parameters
    ----------
    value:
        The ``update_kind`` argument as a caller passed it.

    Returns
    -------
    UpdateKind
        ``"gradient"`` or ``"delta"`` (the same string).

    Raises
    ------
    InputError
        When ``value`` is anything else: the message names the accepted values, the value
        found and which one to use.
    """
    if value == "gradient":
        return "gradient"
    if value == "delta":
        return "delta"
    raise InputError(
        f"update_kind must be 'gradient' or 'delta', found {value!r}: use 'gradient' for "
        "FedSGD gradients and 'delta' for FedAvg weight differences."
    )


def _misshaped(
    params: Mapping[str, nn.Parameter], update: Mapping[str, object]
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """``(name, parameter shape, update shape)`` of each tensor entry whose shape differs.

    In the order of ``params``; names absent from ``update`` and entries that are not
    tensors are skipped.
    """
    found = []
    for name, param in params.items():
        value = update.get(name)
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(param.shape):
            found.append((name, tuple(param.shape), tuple(value.shape)))
    return found


#: Floating-point dtypes an update may have (half precisions are widened where needed).
_UPDATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_values(name: str, value: torch.Tensor) -> None:
    """Check that one update entry has a dtype spear reads and only finite values.

    Parameters
    ----------
    name:
        The parameter's name, for the message.
    value:
        The update's tensor for it.

    Raises
    ------
    InputError
        When the dtype is not float16, bfloat16, float32 or float64 (float8, integers,
        booleans, complex numbers), the tensor has no data (``meta``), or holds NaN or
        infinite values; the message names the parameter.
    """
    if value.dtype not in _UPDATE_DTYPES:
        what = "float8, which spear does not support" if "float8" in str(value.dtype) else ""
        raise InputError(
            f"update[{name!r}] has dtype {value.dtype}"
            + (f" ({what})" if what else "")
            + "; expected float32 or float64 (float16 and bfloat16 are read too): send the "
            "update as float32 or float64, e.g. {name: t.double() for name, t in ...}."
        )
    if value.is_meta:
        raise InputError(
            f"update[{name!r}] is a meta tensor (a shape without values); pass the tensor "
            "the client computed."
        )
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        nans = int(torch.isnan(value).sum())
        raise InputError(
            f"update[{name!r}] contains {bad} NaN or infinite entries ({nans} NaN, "
            f"{bad - nans} infinite); expected finite values. A client whose training "
            "diverged sends no usable update: check its loss and learning rate, or that the "
            "file was saved from the right tensors."
        )


def without_buffers(
    model: nn.Module, update: Mapping[str, torch.Tensor]
) -> tuple[Mapping[str, torch.Tensor], list[str]]:
    """``update`` without the entries named after ``model``'s buffers, and their names.

    A FedAvg delta taken between two state dicts also holds the buffers (a BatchNorm's
    running mean and variance, its step count): they are no parameters' update, and the
    attack reads parameters only. ``update`` is returned as it is where it holds none (or
    is no mapping: :func:`check_update` says so).
    """
    if not isinstance(update, Mapping):
        return update, []
    buffers = {name for name, _ in model.named_buffers()}
    dropped = [name for name in update if name in buffers]
    if not dropped:
        return update, []
    return {name: value for name, value in update.items() if name not in buffers}, dropped


def check_update(model: nn.Module, update: Mapping[str, torch.Tensor]) -> None:
    """Check that ``update`` has exactly the parameters of ``model``, with their shapes.

    Every entry must also pass :func:`check_values` (a floating-point dtype spear reads,
    finite values).

    Parameters
    ----------
    model : torch.nn.Module
        The model the server sent.
    update : Mapping[str, torch.Tensor]
        Parameter name -> tensor, as a client returned it.

    Raises
    ------
    InputError
        (a ``ValueError``) listing the missing, unexpected, non-tensor and mis-shaped
        names, and what to try; or naming an entry of another dtype or with non-finite
        values.
    """
    if not isinstance(update, Mapping):
        raise InputError(
            f"the update must be a mapping parameter-name -> tensor, found "
            f"{type(update).__name__}. Build it as {{name: grad for name, grad in ...}} with "
            "the names of model.named_parameters()."
        )
    params = dict(model.named_parameters())
    missing = [name for name in params if name not in update]
    extra = [name for name in update if name not in params]
    not_tensors = [
        f"{name} ({type(value).__name__})"
        for name, value in update.items()
        if name in params and not isinstance(value, torch.Tensor)
    ]
    misshaped = [
        f"{name}: expected {expected}, found {found}"
        for name, expected, found in _misshaped(params, update)
    ]
    if not (missing or extra or not_tensors or misshaped):
        for name in params:
            check_values(name, update[name])
        return
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if not_tensors:
        parts.append(f"not tensors {not_tensors}")
    if misshaped:
        parts.append("mis-shaped [" + "; ".join(misshaped) + "]")
    hint = ""
    if extra and missing and all("." in name for name in extra):
        hint = (
            " If the names carry a wrapper's prefix (for example '_module.' from Opacus or "
            "'module.' from DataParallel), strip it."
        )
    raise InputError(
        "the update does not match model.named_parameters(): "
        + ", ".join(parts)
        + f". Expected the {len(params)} names {list(params)}. Pass the update the client "
        "computed on exactly the model the server sent (same architecture, unwrapped)." + hint
    )


def float32_in_float64(update: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``update`` is float64 holding float32 numbers only: an update computed in
    float32 and cast before it was sent, whose precision is float32's. A float64
    computation gives such entries with vanishing probability."""
    tensors = list(update.values())
    if not tensors or any(t.dtype != torch.float64 for t in tensors):
        return False
    if not any(bool((t != 0).any()) for t in tensors):
        return False
    return all(torch.equal(t.to(torch.float32).to(torch.float64), t) for t in tensors)


def check_partial_update(
    model: nn.Module, update: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Check that ``update`` fits ``model`` and return it as a plain dict of detached tensors.

    Unlike :func:`check_update`, parameters without an entry are allowed (frozen ones),
    and the values must be finite.

    Parameters
    ----------
    model:
        The model as the server sent it.
    update:
        Parameter name -> tensor with the shape of that parameter. Names must be those of
        ``model.named_parameters()``; parameters without an entry are allowed (frozen).

    Returns
    -------
    dict[str, torch.Tensor]
        The same entries, detached, in the order of ``model.named_parameters()``.

    Raises
    ------
    InputError
        On an unknown name, a shape mismatch, an empty update or non-finite values.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(update) - set(params))
    if unknown:
        raise InputError(
            f"update has entries {unknown} that are not parameters of the model; expected "
            f"names from model.named_parameters(), e.g. {list(params)[:4]}."
        )
    misshaped = {name: (expected, found) for name, expected, found in _misshaped(params, update)}
    checked: dict[str, torch.Tensor] = {}
    for name in params:
        if name not in update:
            continue
        if name in misshaped:
            expected, found = misshaped[name]
            raise InputError(
                f"update[{name!r}] has shape {found}, but the parameter has shape "
                f"{expected}; was the update computed for another model?"
            )
        value = update[name]
        check_values(name, value)
        checked[name] = value.detach()
    if not checked:
        raise InputError("update is empty: it has no entry for any parameter of the model.")
    return checked
