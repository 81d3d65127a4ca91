"""Input-side peeling: nonnegative inputs as extreme rays of the row space's cone
(:mod:`spear.input_cone`), scaled by the model after the layer and peeled when they pass
the row-peeled examples' checks."""

from __future__ import annotations

import math
import time

import torch

from spear.candidates import certified_alone, row_ratios, scaled_grad, unknown_subspace
from spear.downstream import divisor_tolerance, own_columns, range_tolerance
from spear.input_cone import SCALE_STEP, cone_vertex, residual_row_space, scale_candidates
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.linalg import KERNEL_GAP, orthonormal_basis, zero_mask
from spear.results import SolverStats
from spear.solvers.polish import live_rows
from spear.verify import exact_precision, pattern_check

__all__ = ["CONE_MISSES", "InputCone", "has_input_side"]

#: The step stops for the round after this many vertices in a row per missing example
#: give no example (the inputs are not nonnegative, or most vertices are not examples: it
#: runs again in the next round that peels nothing), or after :data:`CONE_SHARE`.
CONE_MISSES = 6
#: An example's scale must be told from ``1 / c`` of it for these ``c``
#: (:func:`_scale_pinned`).
MERGED_COPIES = (2.0, 3.0)
#: ... and from the scales whose divisors are a mean's over this many examples more or
#: fewer than the update shows (:func:`_scale_pinned`).
MISCOUNTED = (-1, 1)
#: Two unit vertices are the same when their cosine is within this of 1 (vertices are
#: refitted as kernels of their zero sets, so the same vertex comes back to roundoff).
SAME_VERTEX = 1e-9
#: Share of the time left that one run of the step may take.
CONE_SHARE = 0.5
#: Secant steps towards an example's plain cross-entropy divisor (:func:`_plain_scale`).
DIVISOR_ROUNDS = 20


def has_input_side(problem: Problem) -> bool:
    """Whether the input side can scale and check vertices here: the model after the
    layer is known (an exact one-step gradient with the layer's weights), whatever the
    precision; :class:`InputCone` runs only where it is also float64."""
    return problem.downstream is not None and problem.layer is not None


class InputCone:
    """Peel examples found as vertices of the input cone, in rounds where the other steps
    neither peeled an example nor pooled a direction; leaves a record when it runs.

    Exact float64 one-step gradients with the model after the layer only: the scale of a
    vertex is fixed by checks whose tolerances follow the update's precision, and at
    float32 rounding they tell its scale apart from nearby ones poorly. Where two
    examples show merged (columns that agree to rounding, fact 12) the mean's divisor is
    one above the update's rank, and an example at 15/16 of its scale was measured to
    pass them (a batch of 16 of Flower's untrained CNN); a vertex that was no example
    (1 - cos = 1e-3 to the nearest, on the untrained VGG-style CNN at b = 16) passed the
    range test as closely as the true examples beside it.
    """

    name = "input-cone"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Find, scale, check and peel vertices until :data:`CONE_MISSES` times the
        missing examples fail in a row, or the step's share of the time is spent."""
        downstream, layer = problem.downstream, problem.layer
        moving = state.found > state.round_start[0] or len(state.pool) > state.round_start[1]
        if not has_input_side(problem) or moving or not exact_precision(problem.eps):
            return StepReport()
        assert downstream is not None and layer is not None
        certify = certified_alone(problem)
        assert certify is not None
        t0 = time.perf_counter()
        stop = t0 + CONE_SHARE * max(0.0, problem.deadline - t0)
        before = state.found
        reference = _reference_norm(problem, state)
        misses = tries = 0
        tried: list[torch.Tensor] = []  # unit vertices that gave no example since a peel
        while misses < CONE_MISSES * (problem.rank - state.found) and time.perf_counter() < stop:
            remaining = problem.rank - state.found
            if remaining <= 0:
                break
            tries += 1
            res = state.residual
            # examples whose gradient direction is pooled are not among the cone's rays
            # here: their coordinates are the only ones not orthogonal to it
            space = (
                unknown_subspace(res, problem.rank)
                if res.directions and misses % 2 == 0
                else residual_row_space(res.left, remaining)
            )  # (b, d)
            rows = layer.right.T @ space  # (n, r)
            norms = rows.norm(dim=1)
            live_in = norms > problem.tol.zero_tol * float(norms.max())
            w = cone_vertex(rows[live_in], problem.generator, problem.tol.zero_tol)
            if w is None:
                misses += 1
                continue
            coord_dir = space @ w  # (b,)
            if _seen(tried, coord_dir):
                misses += 1
                continue
            basis = orthonormal_basis(res.left, remaining)
            scaled = None
            for t in scale_candidates(downstream, basis, coord_dir @ layer.right, reference):
                scaled = _plain_scale(problem, res, basis, coord_dir, t)
                if scaled is not None:
                    break
            if scaled is None:
                misses += 1
                continue
            coord, grad = scaled
            live = live_rows(basis, problem.tol.zero_tol)
            zeros = zero_mask(grad[:, None], problem.tol.zero_tol)[:, 0]
            ok, _ = pattern_check(layer, coord, zeros, live, problem.eps, problem.delta)
            if not (ok and certify(coord, grad, True)):
                misses += 1
                continue
            res.directions.remove(grad / grad.norm())
            res.peel(coord, grad)
            state.bar.update(1)
            reference = _reference_norm(problem, state)
            tried.clear()
            misses = 0
        peeled = state.found - before
        if tries == 0:
            return StepReport()
        record = SolverStats(
            self.name,
            samples=tries,
            candidates=peeled,
            found=peeled,
            seconds=time.perf_counter() - t0,
        )
        return StepReport(stats=record, progressed=peeled > 0)


def _seen(tried: list[torch.Tensor], coord_dir: torch.Tensor) -> bool:
    """Whether the vertex ``coord_dir`` ``(b,)`` is among the unit vertices ``tried``
    (the linear programs' random objectives land on the same vertex again and again);
    adds it when it is not."""
    unit = coord_dir / coord_dir.norm()
    if any(float(unit @ seen) >= 1.0 - SAME_VERTEX for seen in tried):
        return True
    tried.append(unit)
    return False


def _plain_scale(
    problem: Problem, res: Residual, basis: torch.Tensor, coord_dir: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The example's coordinates ``(b,)`` and column ``(m,)`` near the scale ``t`` of
    ``coord_dir`` ``(b,)``, at the scale whose cross-entropy divisor is a plain mean's
    (the batch size) or sum's (1); ``None`` when none is found near ``t`` or the
    example's own column is not in ``span(basis)`` there.

    The column's size is fixed by the update (``grad coord^T`` does not depend on ``t``)
    while the divisor the model asks for changes with ``t``; the secant method on
    ``log divisor`` against ``log t`` finds the scale. Where the softmax barely changes
    with the input's scale (a flat one, on small features) this fixes ``t`` far better
    than the softmax's shape does (:func:`spear.input_cone.scale_candidates`); where it
    is peaked, the divisor changes fast and the secant's steps are bounded by the grid's.
    """
    downstream, layer = problem.downstream, problem.layer
    assert downstream is not None and layer is not None
    limit = range_tolerance(problem.tol.zero_tol)
    settled = divisor_tolerance(downstream.dtype) / 10

    def at(log_t: float) -> tuple[float, torch.Tensor, torch.Tensor, float] | None:
        coord = math.exp(log_t) * coord_dir
        x = (coord @ layer.right)[None]
        jacobians = downstream.logits_and_jacobians(x)
        columns, miss = own_columns(downstream, basis, x, jacobians)
        grad = scaled_grad(res, coord, columns[:, 0])
        if grad is None:
            return None
        _, divisor = downstream.cross_entropy_fit(x, grad[:, None], jacobians)
        found = float(divisor[0])
        if not (math.isfinite(found) and found > 0):
            return None
        return math.log(found), coord, grad, float(miss[0])

    s = math.log(t)
    first = at(s)
    if first is None:
        return None
    plain = min((math.log(problem.rank), 0.0), key=lambda d: abs(first[0] - d))
    h, coord, grad, miss = first
    h -= plain
    prev: tuple[float, float] | None = None
    for _ in range(DIVISOR_ROUNDS):
        if abs(math.expm1(h)) <= settled:
            pinned = miss <= limit and _scale_pinned(problem, basis, coord, plain, limit)
            return (coord, grad) if pinned else None
        slope = 1.0 if prev is None or h == prev[1] else (h - prev[1]) / (s - prev[0])
        step = max(-SCALE_STEP, min(SCALE_STEP, h / slope)) if slope != 0 else SCALE_STEP
        prev = (s, h)
        s -= step
        now = at(s)
        if now is None:
            return None
        h, coord, grad, miss = now
        h -= plain
    return None


def _scale_pinned(
    problem: Problem,
    basis: torch.Tensor,
    coord: torch.Tensor,
    log_divisor: float,
    limit: float,
) -> bool:
    """Whether the model after the layer, and not only the divisor, fixes the scale of
    the example at ``coord`` ``(b,)``: at the scales of the other divisors the update
    could hold for it, its own column must leave ``span(basis)`` by far more than
    ``limit`` (:data:`spear.linalg.KERNEL_GAP` times).

    The divisor (``exp(log_divisor)``, a plain mean's or sum's) is made plain by the
    choice of the scale, so it is no evidence here, and the scale scales the divisor
    (the column's size is fixed by the update). Two kinds of update give the same
    example another divisor: one that counts it ``c`` times (a duplicate, or in float32
    two examples whose columns agree to rounding) has ``b / c`` at its true scale, so the
    scale is told from ``coord / c`` (:data:`MERGED_COPIES`); a mean over more or fewer
    examples than the update shows (merged or unseen ones) has ``b +- 1``, so from
    ``coord (b +- 1) / b`` (:data:`MISCOUNTED`). Where the softmax barely changes with
    the input's scale, the true and the wrong scale pass every other check (measured on
    Flower's untrained CNN, float32, b = 16 with two examples merged: an example at
    15/16 of its scale passed the range test and the plain divisor of 15).
    """
    downstream, layer = problem.downstream, problem.layer
    assert downstream is not None and layer is not None
    divisor = math.exp(log_divisor)
    ratios = [1.0 / c for c in MERGED_COPIES]
    if divisor > 1.5:  # a mean's (b >= 2), not a sum's (1)
        ratios += [(divisor + d) / divisor for d in MISCOUNTED]
    x = torch.stack([(coord * r) @ layer.right for r in ratios])
    _, other = own_columns(downstream, basis, x)
    return bool((other > KERNEL_GAP * limit).all())


def _reference_norm(problem: Problem, state: SearchState) -> float:
    """A typical example norm: the median norm of the row candidates ``dW[j] / db[j]``
    (weighted means of the examples on at unit ``j``), else that of ``W``'s rows'
    inverse (a unit pre-activation)."""
    layer = problem.layer
    assert layer is not None
    if state.residual.bias is not None:
        _, cand = row_ratios(state.residual, problem.tol)
        if cand.shape[0]:
            norms = (cand @ layer.right).norm(dim=1)
            return float(norms.median())
    scale = float(layer.weight_coords.norm(dim=1).median())
    return 1.0 / scale if scale > 0 else 1.0
