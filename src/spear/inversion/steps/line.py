"""Line scan: with two directions missing, their examples lie on a known line, and the
Jacobians along it give their exact directions (:mod:`spear.downstream`).

With every direction but two pooled, the two missing examples lie in the unknown
subspace (:func:`spear.candidates.unknown_subspace`, two dimensions), on the line
``p . s = 1`` every example satisfies (``s = L^+ db``). Along the line the layer's
pre-activations are affine, so its ReLU pattern changes only at the ``m`` points where a
unit crosses zero; between them the patterns after the layer change at most a few times
more. Points spread over every such piece include some with each missing example's
patterns, where the range of the Jacobian meets the column space of ``dW`` in that
example's exact direction, whatever the dimension of its zero set's kernel. Each
direction found is tried at once: with it pooled, one direction is missing, and its
example is exact in a complete solve with a filler
(:func:`spear.inversion.solve.complete_last`); the pair is pooled only when the complete
solve with both verifies every example.
"""

from __future__ import annotations

import time

import torch

from spear.candidates import residual_svd, unknown_subspace_from
from spear.downstream import Downstream, nearest_directions, range_tolerance
from spear.inversion.checks import verified_indices
from spear.inversion.pool import same_direction
from spear.inversion.problem import Problem
from spear.inversion.settle import settle
from spear.inversion.solve import complete_last, solve_complete
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.linalg import least_squares
from spear.results import SolverStats
from spear.solvers.polish import live_rows

__all__ = ["POINTS_PER_PIECE", "LineScan"]

#: Points tried inside each piece of the line between two of the layer's breakpoints
#: (the patterns after the layer may change inside a piece), and on each end ray.
POINTS_PER_PIECE = 6


class LineScan:
    """With two directions of the round missing, scan the line their examples lie on.
    Needs the weights, the bias gradient and the model after the layer."""

    name = "line"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Pool the two missing directions when a point of the line yields them."""
        downstream, layer, res = problem.downstream, problem.layer, state.residual
        if (
            downstream is None
            or layer is None
            or res.bias is None
            or state.remaining - len(state.pool) != 2
            or not problem.time_left()
        ):
            return StepReport()
        t0 = time.perf_counter()
        points = _line_points(problem, state)
        if points is None:
            return StepReport()
        basis = state.basis
        live = live_rows(basis, problem.tol.zero_tol)
        tol = range_tolerance(problem.tol.zero_tol)
        pooled = (
            state.pool.stack(dim=1) if state.pool else basis.new_zeros(basis.shape[0], 0)
        )  # (m, r - 2)
        tried: list[torch.Tensor] = []
        inputs = points @ layer.right
        found = downstream.intersections(basis, inputs, tol)
        for shared in _shared_spans(downstream, basis, inputs, found, tol):
            # the two examples have the same patterns: their columns span the one
            # two-dimensional intersection, and their own cross-entropy columns tell
            # them apart (fixed point from that span)
            if time.perf_counter() > problem.deadline:
                break
            start = torch.cat([pooled, shared], dim=1)
            cols = settle(problem, res, basis, start, pooled.shape[1])
            if cols is None or not self._verifies(problem, state, cols, live):
                continue
            state.pool.add(cols[:, -2])
            state.pool.add(cols[:, -1])
            return self._found_two(points, t0)
        for unit in found:
            if unit is None or any(same_direction(unit, t) for t in tried):
                continue
            if time.perf_counter() > problem.deadline:
                break
            tried.append(unit)
            others = torch.cat([pooled, unit[:, None]], dim=1)
            last = complete_last(res.left, res.bias, basis, others, layer, problem.tol, downstream)
            if last is None:
                continue
            cols = torch.cat([others, (last / last.norm())[:, None]], dim=1)
            if not self._verifies(problem, state, cols, live):
                continue
            state.pool.add(unit)
            state.pool.add(last / last.norm())
            return self._found_two(points, t0)
        return StepReport()

    def _found_two(self, points: torch.Tensor, t0: float) -> StepReport:
        """The report of a scan that pooled the two directions, from ``points`` ``(k, b)``
        scanned since ``t0``."""
        record = SolverStats(
            self.name,
            samples=int(points.shape[0]),
            candidates=2,
            seconds=time.perf_counter() - t0,
        )
        return StepReport(stats=record, progressed=True)

    @staticmethod
    def _verifies(
        problem: Problem, state: SearchState, cols: torch.Tensor, live: torch.Tensor
    ) -> bool:
        """Whether the complete solve with ``cols`` ``(m, r)`` verifies every example."""
        res = state.residual
        solved = solve_complete(res.left, res.bias, cols)
        if solved is None:
            return False
        coords, grads = solved[0].clone(), solved[1].clone()
        return len(verified_indices(problem, coords, grads, live)) == state.remaining


def _shared_spans(
    downstream: Downstream,
    basis: torch.Tensor,
    inputs: torch.Tensor,
    found: list[torch.Tensor | None],
    tol: float,
) -> list[torch.Tensor]:
    """Distinct ``(m, 2)`` two-dimensional intersections of ``span(basis)`` with the range
    of the Jacobian at the points of ``inputs`` ``(k, n)`` that gave no single direction
    (``found``)."""
    out: list[torch.Tensor] = []
    rest = [i for i, unit in enumerate(found) if unit is None]
    if not rest:
        return out
    for span in downstream.ranges(inputs[rest]):
        if span.shape[1] == 0:
            continue
        vecs, dist = nearest_directions(basis, span)
        if int((dist <= tol).sum()) != 2:
            continue
        pair = vecs[:, :2]
        if any(float(torch.linalg.svdvals(pair.T @ seen)[-1]) > 1.0 - tol for seen in out):
            continue
        out.append(pair)
    return out


def _line_points(problem: Problem, state: SearchState) -> torch.Tensor | None:
    """``(k, b)`` points of the line ``{p in span : p . s = 1}``: ``POINTS_PER_PIECE`` in
    every piece between the layer's breakpoints and on both end rays."""
    layer, res = problem.layer, state.residual
    assert layer is not None and res.bias is not None
    span = unknown_subspace_from(residual_svd(res, problem.rank), state.pool)  # (b, 2)
    if span.shape[1] != 2:
        return None
    s = least_squares(res.left, res.bias[:, None])[:, 0]  # (b,)
    a = span.T @ s  # (2,)
    if float(a.norm()) == 0.0:
        return None
    origin = span @ (a / float(a @ a))  # origin . s = 1
    step = span @ torch.stack([-a[1], a[0]]) / float(a.norm())  # step . s = 0
    z0 = layer.weight_coords @ origin
    if layer.bias is not None:
        z0 = z0 + layer.bias
    z1 = layer.weight_coords @ step
    moving = z1.abs() > 0
    breaks = torch.unique(-z0[moving] / z1[moving])
    if breaks.numel() == 0:
        breaks = torch.zeros(1, dtype=origin.dtype, device=origin.device)
    width = float(breaks[-1] - breaks[0]) or 1.0
    fractions = (torch.arange(POINTS_PER_PIECE, dtype=origin.dtype) + 0.5) / POINTS_PER_PIECE
    inner = (breaks[:-1, None] + (breaks[1:] - breaks[:-1])[:, None] * fractions).flatten()
    rays = width * fractions
    t = torch.cat([breaks[0] - rays, inner, breaks[-1] + rays])
    return origin[None, :] + t[:, None] * step[None, :]
