"""Settling directions by the examples' own cross-entropy columns (fixed point).

A complete solve with approximate directions gives approximate examples; the Jacobian
at each and its softmax give that example's cross-entropy column ``J^T (p - e_y)``
(:func:`spear.downstream.own_columns`), which is its exact direction once the example is
exact. Solving again with those columns and repeating converges to the batch when the
start has every example's ReLU patterns (measured on the VGG-style CNN, b = 16, two
examples with identical patterns: from the two-dimensional span of their columns, exact
in 8 rounds). From a far start it does not converge, and nothing is taken then.
"""

from __future__ import annotations

import torch

from spear.downstream import own_columns, range_tolerance
from spear.inversion.pool import same_direction
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual
from spear.inversion.solve import solve_complete

__all__ = ["MAX_SETTLE_ROUNDS", "settle"]

#: Rounds of solve -> own columns before giving up.
MAX_SETTLE_ROUNDS = 30


def settle(
    problem: Problem, residual: Residual, basis: torch.Tensor, cols: torch.Tensor, fixed: int
) -> torch.Tensor | None:
    """Columns ``(m, r)`` whose last ``r - fixed`` are replaced by their examples' own
    cross-entropy columns until each lies in ``span(basis)`` ``(m, r)``; ``None`` when
    they do not settle, or without the model after the layer.

    The first ``fixed`` columns ``cols[:, :fixed]`` (pooled directions) are kept as they
    are. A column whose example's own column lies in ``span(basis)`` is exact and is kept
    from then on; with one column left free, its example is exact in the next solve (as
    in :func:`spear.inversion.solve.complete_last`). Two free columns drawn to the same
    example's column are kept apart: the later one restarts from a direction outside the
    kept ones. The caller verifies the result.
    """
    downstream, layer = problem.downstream, problem.layer
    if downstream is None or layer is None or residual.bias is None:
        return None
    tol = range_tolerance(problem.tol.zero_tol)
    kept = cols[:, :fixed]
    free = cols[:, fixed:]
    for _ in range(MAX_SETTLE_ROUNDS):
        solved = solve_complete(residual.left, residual.bias, torch.cat([kept, free], dim=1))
        if solved is None or not bool(torch.isfinite(solved[0]).all()):
            return None
        inputs = solved[0][kept.shape[1] :] @ layer.right
        new, dist = own_columns(downstream, basis, inputs)
        if not bool(torch.isfinite(new).all()):
            return None
        still: list[torch.Tensor] = []
        for j in range(new.shape[1]):
            column = new[:, j]
            twin = any(same_direction(column, kept[:, i]) for i in range(kept.shape[1]))
            if float(dist[j]) <= tol and not twin:
                kept = torch.cat([kept, column[:, None]], dim=1)
            elif twin:
                still.append(_outside(basis, torch.cat([kept, *[c[:, None] for c in still]], 1)))
            else:
                still.append(column)
        if not still:
            return kept
        free = torch.stack(still, dim=1)
    return None


def _outside(basis: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A unit column ``(m,)`` of ``span(basis)`` orthogonal to ``cols`` ``(m, k)``
    (``k < r``), in ``basis`` coordinates."""
    coords = basis.T @ cols  # (r, k)
    u, _, _ = torch.linalg.svd(coords, full_matrices=True)
    return basis @ u[:, -1]
