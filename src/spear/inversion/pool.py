"""The pool of exact gradient directions found but not yet peeled.

Every direction the search finds goes through :class:`DirectionPool`: it is the one place
where directions are added, compared (one rule, :func:`same_direction`), removed and
pruned of combinations of the others. The vectors are unit gradient directions ``(m,)``
of the (residual) weight gradient, or their coordinates ``(r,)`` in an orthonormal basis
of it; a pool holds vectors of one kind only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from spear.linalg import orthonormal_basis, zero_mask

__all__ = [
    "DEPENDENCE_HEADROOM",
    "MAX_DEPENDENCE_DISTANCE",
    "SAME_DIRECTION",
    "DirectionPool",
    "same_direction",
    "same_direction_distance",
    "same_direction_tolerance",
]

#: Two unit vectors are the same direction (up to sign) when ``|<u, v>| > 1 -
#: SAME_DIRECTION``. Exact directions found twice agree to roundoff (``1 - |<u, v>|`` about
#: ``1e-15`` in float64, and it is ``|u - v|^2 / 2``, so directions ``1e-4`` apart still
#: count as distinct); distinct examples' directions are far apart.
SAME_DIRECTION = 1e-8
#: A pooled direction is a combination of other pooled ones when its distance from their
#: span (unit coordinates in the residual's orthonormal basis) is at most this many zero
#: tolerances. Measured on float32 Fashion-MNIST, b = 128, m = 1000: a pooled mixture of
#: two similar examples lay 1.2e-6 from the span of their own pooled directions, while
#: the smallest singular value of the true unit directions was 0.21 (the zero tolerance
#: was 2.5e-5).
DEPENDENCE_HEADROOM = 100.0
#: Above this distance (``DEPENDENCE_HEADROOM`` zero tolerances, with the coarse zero tests
#: of noisy updates) nothing is judged a combination of other directions: true
#: directions themselves come as close to each other's span (0.21 measured above).
MAX_DEPENDENCE_DISTANCE = 1e-2


def same_direction_distance(zero_tol: float) -> float:
    """Distance under which a unit direction of a problem with ``zero_tol`` (its
    :attr:`spear.linalg.Tolerances.zero_tol`) is one already known, or lies in the span
    of known ones: ``DEPENDENCE_HEADROOM`` zero tolerances, at most
    ``MAX_DEPENDENCE_DISTANCE`` (:func:`same_direction_tolerance`)."""
    return min(DEPENDENCE_HEADROOM * zero_tol, MAX_DEPENDENCE_DISTANCE)


def same_direction_tolerance(zero_tol: float) -> float:
    """``1 - |<u, v>|`` below which two directions of a problem with ``zero_tol`` are the
    same.

    Directions computed from an update with a noise floor (float32) differ from the
    truth, and from each other, by about that floor (measured on a float32 FedAvg delta,
    ``784 -> 1000 -> 128 -> 10``, b = 128, one epoch in mini-batches of 8: pooled
    directions 9e-6 (median) and 8e-5 (worst) from the truth, zero tolerance 2.9e-4).
    Two directions count as one when they are within the distance under which a
    direction counts as a combination of others (``DEPENDENCE_HEADROOM`` zero
    tolerances, at most ``MAX_DEPENDENCE_DISTANCE``), and never under
    :data:`SAME_DIRECTION`.
    """
    return max(SAME_DIRECTION, same_direction_distance(zero_tol) ** 2 / 2)


def same_direction(u: torch.Tensor, v: torch.Tensor, tol: float = SAME_DIRECTION) -> bool:
    """Whether unit vectors ``u`` and ``v`` (same shape) are equal up to sign.

    ``tol`` is :data:`SAME_DIRECTION` except where a caller compares approximate
    vectors and documents its own.
    """
    return abs(float(u @ v)) > 1 - tol


class DirectionPool:
    """Distinct unit directions, in the order they were found.

    Parameters
    ----------
    directions:
        Initial unit vectors (all ``(m,)`` or all ``(r,)``); kept as given, in order.
    same_tol:
        ``1 - |<u, v>|`` under which two vectors are one direction
        (:func:`same_direction_tolerance` of the problem's zero tolerance).
    """

    def __init__(
        self, directions: Iterable[torch.Tensor] = (), same_tol: float = SAME_DIRECTION
    ) -> None:
        self._items: list[torch.Tensor] = list(directions)
        self.same_tol = same_tol

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._items)

    def __getitem__(self, index: slice) -> list[torch.Tensor]:
        """The pooled vectors in ``index`` (a slice), oldest first."""
        return self._items[index]

    def stack(self, dim: int = 0) -> torch.Tensor:
        """The pooled vectors stacked along ``dim``: ``(k, m)`` for 0, ``(m, k)`` for 1."""
        return torch.stack(self._items, dim=dim)

    def contains(self, unit: torch.Tensor) -> bool:
        """Whether ``unit`` is already pooled (up to sign)."""
        return any(same_direction(unit, d, self.same_tol) for d in self._items)

    def add(self, unit: torch.Tensor) -> bool:
        """Pool a unit direction unless it is already there (or not finite: an
        ill-conditioned solve's); True when added."""
        if not bool(torch.isfinite(unit).all()) or self.contains(unit):
            return False
        self._items.append(unit)
        return True

    def remove(self, unit: torch.Tensor) -> None:
        """Remove the pooled direction equal to ``unit`` (up to sign), if any."""
        for i, d in enumerate(self._items):
            if same_direction(unit, d, self.same_tol):
                del self._items[i]
                return

    def keep_first(self, count: int) -> None:
        """Keep only the ``count`` oldest directions."""
        del self._items[count:]

    def clear(self) -> None:
        """Remove every direction."""
        self._items.clear()

    def drop_dependent(self, left: torch.Tensor, remaining: int, zero_tol: float) -> int:
        """Remove pooled directions that are combinations of other pooled ones.

        True gradient directions are linearly independent; a pooled mixture of several
        examples is not, once those examples' own directions are pooled as well (float32
        pools such mixtures when their entries cancel, by accident, on a few rows). Each
        dependency found is broken by removing its member with the fewest zeros: a mixture
        is zero only where all its examples are (and on its few accidental rows), so it is
        the least sparse member.

        Parameters
        ----------
        left:
            ``(m, b)`` left factor of the residual, whose ``remaining`` leading columns
            span the pooled ``(m,)`` directions.
        remaining:
            Rank of the residual (examples not yet peeled).
        zero_tol:
            The problem's zero tolerance.

        Returns
        -------
        int
            The number of directions removed.
        """
        removed = 0
        distance = DEPENDENCE_HEADROOM * zero_tol
        if distance > MAX_DEPENDENCE_DISTANCE:
            return 0
        while 2 <= len(self._items) <= remaining:
            basis = orthonormal_basis(left, remaining)  # (m, r)
            pooled = self.stack(dim=1)  # (m, k)
            coords = basis.T @ pooled
            coords = coords / coords.norm(dim=0).clamp_min(torch.finfo(coords.dtype).tiny)
            _, s, vh = torch.linalg.svd(coords, full_matrices=False)
            if float(s[-1]) > distance:
                break
            null = vh[-1].abs()  # (k,) unit: the dependency's coefficients
            members = torch.nonzero(null > distance).flatten()
            if members.numel() == 0:
                members = null.argmax().reshape(1)
            zeros = zero_mask(pooled[:, members], zero_tol).sum(dim=0)
            del self._items[int(members[int(torch.argmin(zeros))])]
            removed += 1
        return removed
