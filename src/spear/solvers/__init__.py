"""Ways to find the disaggregation directions, one file each, behind one interface.

:func:`get_solver` maps a name to a solver (see :mod:`spear.solvers.base` for the
interface); ``"auto"`` is resolved by :func:`spear.invert_layer` itself.
"""

from __future__ import annotations

from collections.abc import Callable

from spear.errors import InputError
from spear.solvers.base import Budget, Directions, DirectionSolver, SearchSpec
from spear.solvers.sampling import SamplingSolver

__all__ = [
    "Budget",
    "DirectionSolver",
    "Directions",
    "SearchSpec",
    "available",
    "get_solver",
]


def _sparse() -> DirectionSolver:
    from spear.solvers.sparse import SparseSolver

    return SparseSolver()


_REGISTRY: dict[str, Callable[[], DirectionSolver]] = {
    "sampling": SamplingSolver,
    "sparse": _sparse,
}


def available() -> list[str]:
    """Names accepted by :func:`get_solver` (plus ``"auto"`` in the attack functions)."""
    return sorted(_REGISTRY)


def get_solver(name: str) -> DirectionSolver:
    """A fresh solver by name.

    Raises
    ------
    InputError
        For an unknown name; the message lists the known ones.
    """
    if name not in _REGISTRY:
        raise InputError(
            f"unknown solver {name!r}; available: {', '.join(['auto', *available()])}."
        )
    return _REGISTRY[name]()
