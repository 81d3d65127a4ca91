"""Run independent cases as Ray tasks, on this machine or on a Ray cluster.

Used by ``spear bench --ray`` and ``spear audit --ray``. Ray is an optional extra
(``pip install "spear[ray]"``); it is imported only when a parallel run starts.

Addresses (the value of ``--ray``):

* ``local`` (``--ray`` alone): start a Ray instance on this machine for the run and stop
  it at the end (``cpus`` limits its CPUs);
* ``auto``: join the Ray cluster already running on this machine (``ray start --head``);
* ``ray://HOST:10001`` or ``HOST:6379``: join that cluster. Every node must have spear
  (and torch) installed in the same versions as here.

Each case is one task that needs one CPU. Results come back as tasks finish, not in
order; a task that fails (an exception in the case, a worker that died) comes back as
``on_error(item, exception)`` so that one failure never loses the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from spear.errors import InputError

__all__ = ["LOCAL", "describe_error", "import_ray", "ray_map"]

#: ``--ray`` without a value: a Ray instance started for this run.
LOCAL = "local"

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def import_ray() -> Any:
    """The ``ray`` module, or an ``InputError`` that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise InputError(
            f"--ray needs Ray, which is not installed here ({error}). Install the extra: "
            'pip install "spear[ray]".'
        ) from error
    return ray


def describe_error(error: BaseException) -> str:
    """``"Type: message"`` of a failed task (the original exception of a task error)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _start(ray: Any, address: str, cpus: int | None) -> bool:
    """Start or join Ray; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": "ERROR",
    }
    if address == LOCAL:
        options["address"] = "local"
        if cpus is not None:
            options["num_cpus"] = cpus
    else:
        options["address"] = address
    try:
        with warnings.catch_warnings():  # Ray's notice about GPU variables; no task uses GPUs
            warnings.filterwarnings("ignore", message=".*accelerator visible devices.*")
            ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise InputError(
            f"could not start or join Ray at {address!r}: {error}. Use --ray alone for a "
            "local Ray, --ray auto for the cluster running on this machine, or "
            "--ray ray://HOST:10001."
        ) from error
    return True


def ray_map(
    fn: Callable[[_Item], _Result],
    items: Sequence[_Item],
    *,
    address: str = LOCAL,
    cpus: int | None = None,
    on_error: Callable[[_Item, BaseException], _Result],
) -> Iterator[tuple[int, _Result]]:
    """``fn(item)`` for every item as Ray tasks; ``(index, result)`` as each finishes.

    Parameters
    ----------
    fn:
        A module-level function (the workers import it by name).
    items:
        Its arguments, one task each; they must pickle.
    address:
        Where to run (see the module docstring).
    cpus:
        CPUs of a local Ray instance (default: all of this machine's).
    on_error:
        Turns a failed task's item and exception into a result.

    Yields
    ------
    tuple[int, result]
        The item's index in ``items`` and its result, in the order tasks finish.

    Notes
    -----
    Ctrl-C cancels the tasks still pending. Ray is stopped at the end when this call
    started it.
    """
    ray = import_ray()
    started = _start(ray, address, cpus)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(fn)
        index = {task.remote(item): number for number, item in enumerate(items)}
        pending = list(index)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ref = done[0]
                number = index[ref]
                try:
                    result = ray.get(ref)
                except Exception as error:  # the task's own error or a lost worker
                    result = on_error(items[number], error)
                yield number, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()
