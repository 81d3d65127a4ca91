"""Sparse directions of a noisy rank-``b`` update, and where the missing examples lie.

Under noise a least-squares kernel of a predicted zero set is pulled off the true
direction by every mispredicted unit: a candidate that mixes two examples predicts a zero
set that is wrong on a tenth of its rows, and its kernel lands at a cosine of about 0.9
to the nearest example. Iteratively reweighted least squares (IRLS) on the same rows
weighs each row by ``1 / max(|u_j q|, floor)``, so rows the direction does not vanish on
stop counting, and converges to the direction that vanishes on most of them: from such
a candidate, to the example itself (cosine 0.9999, the noise's limit).

A direction is told from a mixture by its zero count, the rows where ``|u_j q|`` is within
:data:`NEAR_ZERO_Z` noise units: an example's count is its number of inactive units (about
half of ``m``), a mixture's the intersection of its examples' (far fewer).

Once ``k`` directions ``Q_k`` are known, the missing examples span a known subspace: with
``S V^T = Q P`` (``P`` the examples ``[x_i | 1]`` as rows) and any ``Y`` whose columns are
orthogonal to ``Q_k``, ``Y^T S V^T = (Y^T Q_rest) P_rest`` spans exactly the rows of the
``b - k`` missing examples. A random point of that span is a mixture of only those; its
predicted zero set, least-squares kernel and IRLS then find one of them, and the span
shrinks by one (docs/algorithm.md, "Noisy updates").
"""

from __future__ import annotations

import torch

__all__ = [
    "NEAR_ZERO_Z",
    "POLISH_ROUNDS",
    "missing_span",
    "polish_direction",
    "span_distance",
    "zero_count",
]

#: IRLS rounds of :func:`polish_direction` (it stops earlier once the direction settles).
POLISH_ROUNDS = 30
#: Relative change of the direction below which IRLS has settled.
POLISH_SETTLED = 1e-12
#: Entries of ``basis @ q`` within this many noise units of zero count as zero
#: (:func:`zero_count`). Measured (float32, Fashion-MNIST, ``784 -> 1000``, b = 64, noise
#: 1e-5): a true direction's count at 1, 3 and 10 units is about 490, 500 and 525 of 1000.
NEAR_ZERO_Z = 3.0


def polish_direction(
    basis: torch.Tensor, start: torch.Tensor, rows: torch.Tensor, unit: float
) -> torch.Tensor:
    """The sparse direction near ``start`` that vanishes on most of ``rows``.

    Minimises ``sum_j |basis[j] @ q|`` over ``rows`` for a unit vector ``q`` by IRLS: each
    round takes the eigenvector of the smallest eigenvalue of
    ``basis[rows]^T diag(1 / max(|basis[rows] q|, unit)) basis[rows]``.

    Parameters
    ----------
    basis:
        ``(m, b)`` orthonormal left singular vectors of the update.
    start:
        ``(b,)`` unit starting direction (the least-squares kernel of ``rows``).
    rows:
        ``(m,)`` bool, the predicted zero set.
    unit:
        The noise level of ``basis``'s entries (``sigma / s_b``): residuals below it (or
        below the dtype's machine epsilon) are not told apart.

    Returns
    -------
    torch.Tensor
        ``(b,)`` unit direction, the sign of ``start``.
    """
    part = basis[rows]
    # an exact update (unit 0) still has roundoff: the basis has unit columns
    floor = max(unit, float(torch.finfo(basis.dtype).eps))
    q = start / start.norm()
    for _ in range(POLISH_ROUNDS):
        weights = 1.0 / (part @ q).abs().clamp_min(floor)
        _, vectors = torch.linalg.eigh(part.T @ (weights[:, None] * part))
        new = vectors[:, 0]
        if float(new @ q) < 0:
            new = -new
        settled = float((new - q).norm()) <= POLISH_SETTLED
        q = new
        if settled:
            break
    return q


def zero_count(basis: torch.Tensor, direction: torch.Tensor, unit: float) -> int:
    """Entries of ``basis @ direction`` (``(m,)``) within :data:`NEAR_ZERO_Z` ``unit``."""
    return int(((basis @ direction).abs() <= NEAR_ZERO_Z * unit).sum())


def span_distance(directions: torch.Tensor, vector: torch.Tensor) -> float:
    """Distance of unit ``vector`` ``(b,)`` from the span of ``directions`` ``(b, k)``."""
    if directions.shape[1] == 0:
        return float(vector.norm())
    q = torch.linalg.qr(directions).Q
    return float((vector - q @ (q.T @ vector)).norm())


def missing_span(
    directions: torch.Tensor, singular: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """``(b - k, n + 1)`` rows spanning the examples whose directions are not yet known.

    Parameters
    ----------
    directions:
        ``(b, k)`` known directions, linearly independent.
    singular, right:
        ``S_b`` ``(b,)`` and ``V_b^T`` ``(b, n + 1)`` of the rank-``b`` update.
    """
    k = directions.shape[1]
    complement = torch.linalg.svd(directions, full_matrices=True).U[:, k:]  # (b, b - k)
    return complement.T @ (singular[:, None] * right)
