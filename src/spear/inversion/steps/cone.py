"""Input-side peeling: nonnegative inputs as extreme rays of the row space's cone
(:mod:`spear.input_cone`), scaled by the model after the layer and peeled when they pass
the row-peeled examples' checks; below float64, one vertex per missing example, solved
together."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from spear.candidates import (
    certified_alone,
    certified_by,
    row_ratios,
    scaled_grad,
    unknown_subspace,
)
from spear.downstream import divisor_tolerance, own_columns, range_tolerance
from spear.dropout import dropout_scales
from spear.input_cone import (
    SCALE_STEP,
    cone_vertex,
    directions_from_inputs,
    ray_at_zeros,
    residual_row_space,
    row_starts,
    scale_candidates,
    trimmed_vertex,
)
from spear.inversion.pool import DirectionPool, same_direction, same_direction_tolerance
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual
from spear.inversion.state import SearchState, Taken
from spear.inversion.steps.base import StepReport
from spear.inversion.steps.complete import peel_verified
from spear.linalg import KERNEL_GAP, kernel, least_squares, orthonormal_basis, zero_mask
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
#: The margin of the sure zero set (:func:`_exact_column`) at a scale the bias gradient
#: gives (:func:`_bias_scaled`): that scale is exact to the update's precision, so only
#: units within rounding of zero are left out.
BIAS_SCALE_MARGIN = 1e-3
#: Below float64 a vertex's scale is known roughly; the units it is off on at every
#: scale within this relative margin of the rough one are its sure zero set
#: (:func:`_exact_column`). Measured: the rough scale of an example on the trained
#: VGG-style CNN (float32, b = 32) is a few 1e-4 off.
SCALE_MARGIN = 0.1
#: A refused vertex's gradient direction is pooled only where the kernel of its sure zero
#: set has at most this many dimensions (:func:`_pool_refused`): an example's own line,
#: or the face it shares with one other example.
SHARED_FACE = 2


def has_input_side(problem: Problem) -> bool:
    """Whether the input side can scale and check vertices here: the model after the
    layer is known (an exact one-step gradient with the layer's weights), whatever the
    precision; below float64 :class:`InputCone` also needs the bias gradient (the
    complete solve fixes the scales from it). Where the update is read as computed with
    a Dropout active right after the layer's ReLU (``dropout=True``), the model after
    the layer in eval mode does not reproduce the client's pass; there the bias gradient
    scales the vertices and the model run with each one's mask checks them
    (:func:`_layer_only`)."""
    if problem.layer is None:
        return False
    return problem.downstream is not None or _layer_only(problem)


def _layer_only(problem: Problem) -> bool:
    """Whether the input side runs without the problem's model after the layer: a
    one-step gradient read with an active Dropout after the layer (:mod:`spear.dropout`),
    the layer's weights and bias gradient given, and the model with the Dropout's ``p``
    (:attr:`spear.inversion.problem.Request.masked`). The bias gradient fixes each
    vertex's scale and the units it is off on fix its column (:func:`_bias_scaled`),
    neither of which the masks change (a dropped unit only adds a zero to the column);
    the model run with the mask the column shows checks it (:func:`_masked_certify`)."""
    return (
        problem.downstream is None
        and problem.request.masked is not None
        and problem.layer is not None
        and problem.layer.bias is not None
        and problem.bias_grad is not None
        and not problem.delta
        and not problem.noisy
    )


class InputCone:
    """Peel examples found as vertices of the input cone, in rounds where the other steps
    neither peeled an example nor pooled a direction; leaves a record when it runs.

    With the model after the layer only (an exact one-step gradient with the layer's
    weights). In float64 every vertex that passes the checks a row-peeled example passes
    is peeled (:func:`_peel_vertices`). Below float64 those checks tell an example's
    scale from nearby ones poorly (where two examples show merged, fact 12, an example
    at 15/16 of its scale was measured to pass them: a batch of 16 of Flower's untrained
    CNN), and an example peeled at a scale a few 1e-4 off leaves a residual that spoils
    the next ones' checks (the untrained VGG-style CNN at b = 16: true columns 1.2e-4
    from the column space after ten such peels, where the limit is 7e-5). There only the
    vertices' directions are kept, which the zeros of the inputs fix exactly, one per
    missing example; the gradient directions they give are solved together, the scales
    from the bias gradient, and every example is checked as a solved one is
    (:func:`_solve_vertices`). Where fewer vertices than missing examples come out, the
    gradient direction of each, exact from the units it is off on at every nearby scale
    (:func:`_exact_column`), is pooled for the other steps to complete; where all but one
    come out, so is the last example's, the residual's column off the others
    (:func:`_last_column`).
    """

    name = "input-cone"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Find, scale, check and peel vertices until :data:`CONE_MISSES` times the
        missing examples fail in a row, or the step's share of the time is spent."""
        moving = state.found > state.round_start[0] or len(state.pool) > state.round_start[1]
        if not has_input_side(problem) or moving or problem.rank <= state.found:
            return StepReport()
        t0 = time.perf_counter()
        stop = t0 + CONE_SHARE * max(0.0, problem.deadline - t0)
        if problem.downstream is None:
            if state.residual.bias is None:
                return StepReport()
            before = state.found
            rows = None
            if exact_precision(problem.eps):
                assert problem.layer is not None  # has_input_side
                rows = row_starts(state.residual.left, problem.layer.right, problem.tol.zero_tol)
            tries, _ = _peel_vertices(
                problem, state.residual, stop, state.bar.update, by_bias=True, row_queue=rows
            )
            found = candidates = state.found - before
            progressed = found > 0
        elif exact_precision(problem.eps):
            before = state.found
            if state.cone_rows_at != state.found:
                assert problem.layer is not None  # has_input_side
                state.cone_rows = row_starts(
                    state.residual.left, problem.layer.right, problem.tol.zero_tol
                )
            tries, _ = _peel_vertices(
                problem, state.residual, stop, state.bar.update, row_queue=state.cone_rows
            )
            state.cone_rows_at = state.found
            found = candidates = state.found - before
            progressed = found > 0
        elif state.residual.bias is not None:
            tries, candidates, found, pooled = _solve_vertices(problem, state, stop)
            if found == 0 and pooled == 0:
                # exact scales from the bias gradient peel examples one by one, as in
                # float64, where the vertices taken neither solve nor pool anything
                before = state.found
                more, pooled = _peel_vertices(
                    problem, state.residual, stop, state.bar.update, by_bias=True
                )
                tries += more
                peeled = state.found - before
                candidates, found = candidates + peeled, found + peeled
            progressed = found > 0 or pooled > 0
        else:
            return StepReport()
        if tries == 0:
            return StepReport()
        record = SolverStats(
            self.name,
            samples=tries,
            candidates=candidates,
            found=found,
            seconds=time.perf_counter() - t0,
        )
        return StepReport(stats=record, progressed=progressed)


def _vertex(
    tries: int,
    rows: torch.Tensor,
    space: torch.Tensor,
    left: torch.Tensor,
    starts: list[int],
    problem: Problem,
) -> torch.Tensor | None:
    """The vertex search of try ``tries`` (from 1) on the live input coordinates' rows
    ``rows`` ``(n, d)`` of the row space ``span(space)`` ``(b, d)``: trimmed least squares
    and linear programs in turn (:func:`spear.input_cone.trimmed_vertex` lands on examples
    far more often where most of the cone's vertices are no example; the programs keep
    every batch the vertices they gave before). The trimmed search starts from the next
    unit of ``starts`` (:func:`spear.input_cone.row_starts`, consumed here) while there is
    one, its row of the residual ``left`` ``(m, b)``, else from a random direction."""
    tol = problem.tol.zero_tol
    if tries % 2 == 0:
        return cone_vertex(rows, problem.generator, tol)
    while starts:
        start = space.T @ left[starts.pop(0)]  # (d,)
        norm = float(start.norm())
        if norm > 0.0:
            return trimmed_vertex(rows, problem.generator, tol, start=start / norm)
    return trimmed_vertex(rows, problem.generator, tol)


def _peel_vertices(
    problem: Problem,
    res: Residual,
    stop: float,
    on_peel: Callable[[int], object],
    by_bias: bool = False,
    row_queue: list[int] | None = None,
) -> tuple[int, int]:
    """Find vertices of the input cone of ``res``, scale them by the model after the
    layer (``by_bias``: by the bias gradient, :func:`_bias_scaled`) and peel those that
    pass the checks, until :data:`CONE_MISSES` times the missing examples fail in a row,
    every example is peeled, or the clock passes ``stop``; returns the vertices tried and
    the directions pooled. ``on_peel(1)`` is called after each peel (the progress bar).
    With ``by_bias``, the gradient direction of a vertex the checks refuse is pooled
    where two derivations agree (:func:`_pool_refused`): the complete solve checks it.
    ``row_queue``: the units whose rows of ``res`` start the trimmed search
    (:func:`spear.input_cone.row_starts`), consumed, and renewed in place after each
    peel; ``None``: random starts only. Row starts are given in float64 only: below it
    they were measured to cost examples (Flower's trained CNN, float32, ``b = 32``: 2 of
    10 attack seeds whole within 60 s, against 7 of 10 from random starts).
    """
    downstream, layer = problem.downstream, problem.layer
    assert layer is not None and (downstream is not None or by_bias)
    certify = certified_alone(problem) if downstream is not None else _masked_certify(problem)
    assert certify is not None  # has_input_side
    reference = _reference_norm(problem, res)
    misses = tries = pooled = 0
    tried: list[torch.Tensor] = []  # unit vertices that gave no example since a peel
    queue = row_queue if row_queue is not None else []
    while misses < CONE_MISSES * (problem.rank - res.found) and time.perf_counter() < stop:
        remaining = problem.rank - res.found
        if remaining <= 0:
            break
        tries += 1
        # examples whose gradient direction is pooled are not among the cone's rays
        # here: their coordinates are the only ones not orthogonal to it
        space = (
            unknown_subspace(res, problem.rank)
            if res.directions and misses % 2 == 0
            else residual_row_space(res.left, remaining)
        )  # (b, d)
        rows = layer.right.T @ space  # (n, r)
        live_in = live_rows(rows, problem.tol.zero_tol)
        w = _vertex(tries, rows[live_in], space, res.left, queue, problem)
        if w is None:
            misses += 1
            continue
        coord_dir = space @ w  # (b,)
        if _seen(tried, coord_dir):
            misses += 1
            continue
        basis = orthonormal_basis(res.left, remaining)
        scaled = None
        if by_bias:
            scaled = _bias_scaled(problem, res, coord_dir)
        elif downstream is not None:
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
        # a scale chosen to make the divisor plain is no evidence of the update's; the
        # bias gradient's is
        if not (ok and certify(coord, grad, True, by_bias)):
            if by_bias and downstream is not None and _pool_refused(problem, res, coord, basis):
                pooled += 1
            misses += 1
            continue
        res.directions.remove(grad / grad.norm())
        res.peel(coord, grad)
        on_peel(1)
        reference = _reference_norm(problem, res)
        tried.clear()
        if row_queue is not None:
            queue[:] = row_starts(res.left, layer.right, problem.tol.zero_tol)
        misses = 0
    return tries, pooled


def _masked_certify(
    problem: Problem,
) -> Callable[[torch.Tensor, torch.Tensor, bool, bool], bool] | None:
    """:func:`spear.candidates.certified_alone` for an update read with an active Dropout
    right after the layer (:func:`_layer_only`): each candidate is checked against the
    model after the layer run with the mask its own column shows
    (:func:`spear.dropout.dropout_scales`: the units it turns on with an entry at the
    column's noise floor dropped, the others scaled by ``1 / (1 - p)``), which is the
    client's pass for a true example. ``None`` where that model or ``p`` is not known
    (:func:`_layer_only` is then false: nothing would check a vertex beyond the layer,
    whose checks alone pass vertices that are no examples)."""
    masked, layer = problem.request.masked, problem.layer
    if masked is None or layer is None or layer.bias is None:
        return None
    model, p, bias = masked.model, masked.p, layer.bias

    def certify(coord: torch.Tensor, grad: torch.Tensor, alone: bool, tally: bool) -> bool:
        pre = layer.weight_coords @ coord + bias  # (m,)
        scales = dropout_scales(pre[None], grad[:, None], p, problem.eps)[0]
        mask = scales.to(model.weight.device, model.weight.dtype)
        run = replace(model, after=lambda z: model.after(z * mask))
        return certified_by(problem, run, coord, grad, alone, tally)

    return certify


def _pool_refused(
    problem: Problem, res: Residual, coord: torch.Tensor, basis: torch.Tensor
) -> bool:
    """Pool the gradient direction of the bias-scaled vertex at ``coord`` ``(b,)`` that
    the checks refused, where two derivations agree; returns whether it was added.
    ``basis`` ``(m, r)``: the orthonormal basis of the residual's column space.

    The one direction of the residual's column space in the range of the model's
    Jacobian at the vertex that fits cross-entropy
    (:meth:`spear.downstream.Downstream.directions`) must lie in the kernel of the
    column basis on the units the vertex is off on at every scale within
    :data:`BIAS_SCALE_MARGIN` of its own (:func:`_sure_zeros`), and that kernel must be
    at most :data:`SHARED_FACE` dimensional: the vertex's zero set and the model agree
    on the column. A vertex near an example whose zero set it shares with another (its
    kernel two lines) fails the divisor by the mixture's weight while the model's
    direction there is the example's. Directions, not examples: the complete solve
    checks them like any pooled one."""
    downstream, layer = problem.downstream, problem.layer
    assert downstream is not None and layer is not None
    limit = range_tolerance(problem.tol.zero_tol)
    (direction,) = downstream.directions(basis, (coord @ layer.right)[None], limit)
    if direction is None:
        return False
    zeros = _sure_zeros(problem, basis, coord, BIAS_SCALE_MARGIN)
    null, _ = kernel(basis[zeros], problem.tol.degeneracy_tol)  # (r, d)
    if not 1 <= null.shape[1] <= SHARED_FACE:
        return False
    inside = basis.T @ direction  # (r,)
    cosine = float((null.T @ inside).norm() / inside.norm())
    if cosine < 1.0 - same_direction_tolerance(problem.tol.zero_tol):
        return False
    return res.directions.add(direction)


def _bias_scaled(
    problem: Problem, res: Residual, coord_dir: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The example at the vertex ``coord_dir`` ``(b,)`` at the scale the bias gradient
    gives, with its exact gradient column: ``(coord (b,), grad (m,))``, or ``None``.

    Every missing example's coordinates ``c_i`` satisfy ``c_i . phi = 1`` with
    ``phi = left^+ db`` of the residual (``left phi = sum_i g_i (c_i . phi) = db``), so a
    vertex that is an example's direction has the scale ``1 / (coord_dir . phi)``, to the
    update's precision (measured on Flower's trained CNN, float32, b = 32: the 28
    missing examples' scales within 5e-6, where the model after the layer fixes them to a
    few 1e-4). The column comes from the vertex's ReLU pattern at that scale
    (:func:`_exact_column`). ``None`` without a bias gradient, for a scale that is not
    positive, or where the pattern gives no one column.
    """
    if res.bias is None:
        return None
    remaining = problem.rank - res.found
    phi = least_squares(res.left, res.bias[:, None])[:, 0]
    denominator = float(coord_dir @ phi)
    if not math.isfinite(denominator) or denominator <= 0.0:
        return None
    coord = coord_dir / denominator
    factors = _truncated_svd(res.left, remaining)
    grad = _exact_column(problem, factors, coord, BIAS_SCALE_MARGIN)
    if grad is None and problem.downstream is not None:
        grad = _model_column(problem, factors, coord)
    return None if grad is None else (coord, grad)


def _model_column(problem: Problem, factors: Factors, coord: torch.Tensor) -> torch.Tensor | None:
    """The gradient column ``(m,)`` of the example at ``coord`` ``(b,)`` (its scale
    exact) from the model after the layer: the one direction of the residual's column
    space (truncated SVD ``factors``) in the range of the Jacobian at the example that
    fits cross-entropy (:meth:`spear.downstream.Downstream.directions`), sized by the
    rank-one downdate of the residual as in :func:`_exact_column`; ``None`` where there
    is no such direction. Where the bias dominates the features, an example's zero set
    can leave a kernel of several dimensions while the Jacobian's range singles its
    column out."""
    downstream, layer = problem.downstream, problem.layer
    assert downstream is not None and layer is not None
    limit = range_tolerance(problem.tol.zero_tol)
    (direction,) = downstream.directions(factors[0], (coord @ layer.right)[None], limit)
    if direction is None:
        return None
    return _downdated(factors, coord, direction)


def _solve_vertices(problem: Problem, state: SearchState, stop: float) -> tuple[int, int, int, int]:
    """Below float64: one vertex of the input cone per missing example, solved together;
    returns the vertices tried, those taken, the examples peeled and the directions
    pooled.

    :func:`_take_vertices` finds one vertex per missing example at most; when it finds
    as many as are missing, :func:`spear.input_cone.directions_from_inputs` turns them
    into gradient directions, solved alone (the pool's directions, which the search may
    have found less exactly, stay out of it) and checked example by example as the
    complete solve does (:func:`spear.inversion.steps.complete.peel_verified`). When it
    finds fewer, the vertices' exact columns join the pool (:func:`_pool_exact_columns`)
    for the other steps to complete, and where it finds all but one, the last example's
    gradient direction too (:func:`_last_column`).
    """
    remaining = problem.rank - state.found
    if state.cone_taken_at != state.found:
        state.cone_taken, state.cone_taken_at = [], state.found
    tries = _take_vertices(problem, state.residual, stop, state.cone_taken)
    taken = [unit for unit, _, _, _ in state.cone_taken]
    if len(taken) < remaining:
        pooled = _pool_exact_columns(problem, state)
        last = _last_column(problem, state.residual.left, taken, remaining)
        if last is not None and state.pool.add(last):
            pooled += 1
        return tries, len(taken), 0, pooled
    grads = directions_from_inputs(state.residual.left, taken)  # (m, r)
    peeled = peel_verified(problem, state, grads / grads.norm(dim=0, keepdim=True))
    if not peeled:
        state.cone_taken = []  # a vertex taken was no example: start again next time
    return tries, len(taken), peeled, 0


def _pool_exact_columns(problem: Problem, state: SearchState) -> int:
    """Pool the gradient direction of each vertex taken where two derivations agree: its
    exact column (:func:`_exact_column`, from its ReLU pattern, found when the vertex was
    taken) and the one direction of the column space in the range of the model's
    Jacobian at the vertex that fits cross-entropy
    (:meth:`spear.downstream.Downstream.directions`). A vertex that mixes examples fails
    one or the other. Directions, not examples: the complete solve checks them like any
    pooled one once the pool holds the round's every direction. Returns how many were
    added."""
    basis = _truncated_svd(state.residual.left, problem.rank - state.found)[0]  # (m, r)
    added = 0
    for _, coord, column, exact in state.cone_taken:
        if not exact or not _model_agrees(problem, basis, coord, column):
            continue
        if state.pool.add(column / column.norm()):
            added += 1
    return added


def _last_column(
    problem: Problem, left: torch.Tensor, taken: list[torch.Tensor], remaining: int
) -> torch.Tensor | None:
    """The unit gradient direction ``(m,)`` of the one example of the residual ``left``
    ``(m, b)`` (of rank ``remaining``) whose vertex is missing when the vertices of all
    the others are taken; ``None`` otherwise.

    With ``left = sum_i g_i c_i^T`` and ``U`` ``(b, k)`` an orthonormal basis of the
    vertices taken ``c_1 .. c_k`` (``taken``, unit row-space coordinates, exact: refitted
    at their zeros), ``left (I - U U^T) = g (c - U U^T c)^T`` for the example left: a
    matrix of rank one whose column is that example's gradient direction, exact, with no
    search. Its second singular value must be roundoff next to the first
    (:func:`spear.downstream.range_tolerance`), as where the residual's rank is right.
    Where a vertex taken is no example the column mixes examples' directions: the
    complete solve checks it like any pooled direction, and a mixture fails there."""
    if len(taken) != remaining - 1:
        return None
    if taken:
        basis = torch.linalg.qr(torch.stack(taken, dim=1))[0]  # (b, k)
        left = left - (left @ basis) @ basis.T
    vectors, values, _ = torch.linalg.svd(left, full_matrices=False)
    top = float(values[0]) if values.numel() else 0.0
    if top <= 0.0:
        return None
    if values.numel() > 1 and float(values[1]) > range_tolerance(problem.tol.zero_tol) * top:
        return None
    return vectors[:, 0]


def _model_agrees(
    problem: Problem, basis: torch.Tensor, coord: torch.Tensor, column: torch.Tensor
) -> bool:
    """Whether ``column`` ``(m,)`` has the direction of the one vector of ``span(basis)``
    ``(m, r)`` in the range of the model's Jacobian at the vertex ``coord`` ``(b,)`` that
    fits cross-entropy (:meth:`spear.downstream.Downstream.directions`)."""
    downstream, layer = problem.downstream, problem.layer
    assert downstream is not None and layer is not None
    limit = range_tolerance(problem.tol.zero_tol)
    (from_model,) = downstream.directions(basis, (coord @ layer.right)[None], limit)
    same = same_direction_tolerance(problem.tol.zero_tol)
    return from_model is not None and same_direction(column / column.norm(), from_model, same)


def _take_vertices(problem: Problem, res: Residual, stop: float, taken: list[Taken]) -> int:
    """Vertices of the input cone of ``res``, one per missing example at most, added to
    ``taken`` (kept between runs while ``res`` does not change); returns the vertices
    tried.

    Each vertex whose column some scale brings as near the column space of ``res`` as a
    verified example's must be (:func:`spear.input_cone.scale_candidates`,
    :func:`spear.downstream.range_tolerance`) is taken, refitted on the row space of
    ``res`` itself (:func:`_refit`), and peeled from a copy of the residual by its exact
    column where that is found (:func:`_exact_column`), else at its rough scale: the copy
    steers the next vertex searches away from the examples taken. While every peel of the
    copy is exact, the copy is the residual of the examples not taken, and a vertex it
    shows that ``res`` does not (an example inside a face of the cone of ``res`` with
    examples taken: the input side's next wave) is refitted, and its exact column found,
    on the copy. Stops when as many vertices are taken as examples are missing, after
    :data:`CONE_MISSES` times the missing examples give none in a row, or when the clock
    passes ``stop``.
    """
    downstream, layer = problem.downstream, problem.layer
    assert downstream is not None and layer is not None
    tol = problem.tol.zero_tol
    limit = range_tolerance(tol)
    wanted = problem.rank - res.found
    own = residual_row_space(res.left, wanted)  # (b, r)
    # the scales, range tests and exact columns are taken on the residual itself: its
    # column space holds every missing example's column to the update's precision, while
    # a roughly peeled copy's holds the rough peels' errors as well (measured on the
    # trained VGG-style CNN, float32, b = 32: examples' columns 4e-5 to 1.5e-4 from the
    # copy's after ten peels, 5e-7 from the residual's, against a limit of 3.4e-5)
    factors = _truncated_svd(res.left, wanted)
    basis = factors[0]  # (m, r)
    copy = Residual(
        left=res.left.clone(), bias=res.bias, coords=[], grads=[], directions=DirectionPool()
    )
    for _, coord, grad, _ in taken:
        copy.peel(coord, grad)
    exact_copy = all(exact for *_, exact in taken)
    reference = _reference_norm(problem, res)
    same = same_direction_tolerance(tol)
    tried: list[torch.Tensor] = []
    row_queue: list[int] = []  # random starts below float64 (_peel_vertices)
    misses = tries = 0
    while len(taken) < wanted and misses < CONE_MISSES * (wanted - len(taken)):
        if time.perf_counter() >= stop:
            break
        tries += 1
        space = residual_row_space(copy.left, wanted - len(taken))  # (b, d)
        rows = layer.right.T @ space  # (n, d)
        w: torch.Tensor | None
        if space.shape[1] == 1:
            # one left: the peels leave its direction as the residual
            w = torch.sign(rows.sum(dim=0)) if float(rows.sum()) != 0 else None
        else:
            w = _vertex(tries, rows[live_rows(rows, tol)], space, copy.left, row_queue, problem)
        if w is None or _seen(tried, space @ w):
            misses += 1
            continue
        x = tried[-1] @ layer.right  # (n,) the vertex (_seen keeps its unit coordinates)
        unit = _refit(own, layer.right, x, tol)
        on_copy = unit is None and exact_copy and bool(taken)
        if on_copy:
            unit = _refit(space, layer.right, x, tol)
        starts = scale_candidates(downstream, basis, x, reference) if unit is not None else []
        if unit is None or not starts or any(same_direction(unit, u, same) for u, *_ in taken):
            misses += 1
            continue
        columns, miss = own_columns(downstream, basis, torch.stack([t * x for t in starts]))
        k = int(miss.argmin())
        coord = starts[k] * unit
        rough = scaled_grad(res, coord, columns[:, k])
        if rough is None or float(miss[k]) > limit:
            misses += 1
            continue
        exact = _column_of(problem, factors, copy if exact_copy else None, coord)
        exact_copy = exact_copy and exact is not None
        grad = rough if exact is None else exact
        copy.peel(coord, grad)
        taken.append((unit, coord, grad, exact is not None))
        tried.clear()
        misses = 0
    return tries


#: A residual's truncated SVD ``left = U S V^T`` at its rank: ``U`` ``(m, r)``, ``S``
#: ``(r,)``, ``V^T`` ``(r, b)`` (:func:`_truncated_svd`).
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _column_of(
    problem: Problem, factors: Factors, copy: Residual | None, coord: torch.Tensor
) -> torch.Tensor | None:
    """The exact gradient column ``(m,)`` of the vertex taken at ``coord`` ``(b,)`` (its
    scale known roughly), from its ReLU pattern (:func:`_exact_column`) on the residual
    whose truncated SVD is ``factors``, else on ``copy``: the residual of the examples
    not taken, when its peels are exact, whose smaller column space can single out a
    column that the residual's does not. A column from the copy counts only where the
    one direction of the residual's column space in the range of the model's Jacobian at
    the vertex that fits cross-entropy (:meth:`spear.downstream.Downstream.directions`)
    agrees with it: a kernel of the copy's basis can be one line and still be bent by
    the copy's roundoff. ``None`` where no column is found."""
    column = _exact_column(problem, factors, coord)
    if column is not None or copy is None or not copy.coords:
        return column
    rank = factors[1].numel() - len(copy.coords)
    column = _exact_column(problem, _truncated_svd(copy.left, rank), coord)
    if column is None or not _model_agrees(problem, factors[0], coord, column):
        return None
    return column


def _truncated_svd(left: torch.Tensor, rank: int) -> Factors:
    """The SVD of the residual ``left`` ``(m, b)`` truncated at ``rank``."""
    u, s, vh = torch.linalg.svd(left, full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank], vh[:rank]


def _exact_column(
    problem: Problem, factors: Factors, coord: torch.Tensor, margin: float = SCALE_MARGIN
) -> torch.Tensor | None:
    """The gradient column ``(m,)`` that peels the example at ``coord`` ``(b,)`` (its
    scale known roughly) exactly from the residual ``left`` ``(m, b)`` whose truncated
    SVD is ``factors`` (:func:`_truncated_svd`).

    Its direction is the kernel of ``left``'s column basis on the units the example is
    off on at every scale within ``margin`` (:data:`SCALE_MARGIN`) of ``coord``'s (its
    ReLU pattern needs the scale only through the bias), where that kernel is one line
    (:func:`spear.linalg.kernel`); its size is the one that lowers the rank of
    ``left - column coord^T`` by one, whatever the error of ``coord``'s scale (the
    product, not the split, is what the peel removes). ``None`` where that kernel is not
    one stable line (a vertex that is no example, or too few sure zeros).
    """
    basis, values, _ = factors  # (m, r), (r,), (r, b)
    rank = int(values.numel())
    if rank < 1 or float(values[-1]) <= 0.0:
        return None
    zeros = _sure_zeros(problem, basis, coord, margin)
    null, _ = kernel(basis[zeros], problem.tol.degeneracy_tol)  # (r, d)
    if null.shape[1] != 1 or int(zeros.sum()) < rank:
        return None
    return _downdated(factors, coord, basis @ null[:, 0])


def _sure_zeros(
    problem: Problem, basis: torch.Tensor, coord: torch.Tensor, margin: float
) -> torch.Tensor:
    """``(m,)`` bool: the live units of the column basis ``basis`` ``(m, r)``
    (:func:`spear.solvers.polish.live_rows`) that the example at ``coord`` ``(b,)`` is off
    on at every scale within ``margin`` of its own."""
    layer = problem.layer
    assert layer is not None
    slope = layer.weight_coords @ coord  # (m,) pre-activation without the bias
    bias = layer.bias if layer.bias is not None else torch.zeros_like(slope)
    off = ((1.0 - margin) * slope + bias < 0) & ((1.0 + margin) * slope + bias < 0)
    return off & live_rows(basis, problem.tol.zero_tol)


def _downdated(
    factors: Factors, coord: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor | None:
    """``direction`` ``(m,)`` sized so that the residual with truncated SVD ``factors``
    less ``column coord^T`` (``coord`` ``(b,)``) drops its rank by one: a rank-one
    downdate does iff ``sigma coord^T left^+ direction = 1``; ``None`` where that has no
    finite solution."""
    basis, values, rows = factors
    inverse_image = rows.T @ ((basis.T @ direction) / values)  # (b,) left^+ direction
    denominator = float(coord @ inverse_image)
    if not math.isfinite(denominator) or denominator == 0.0:
        return None
    return direction / denominator


def _refit(
    space: torch.Tensor, right: torch.Tensor, x: torch.Tensor, zero_tol: float
) -> torch.Tensor | None:
    """The vertex ``x`` ``(n,)`` refitted on the row space ``span(space)`` ``(b, r)``, as
    unit row-space coordinates ``(b,)``: the kernel of that space's rows (``right``
    ``(b, n)``) at the zeros of ``x`` (:func:`spear.input_cone.ray_at_zeros`); ``None``
    when that kernel is not one line of nonnegative inputs (``x`` was a vertex of the
    rougher space only, no example)."""
    rows = right.T @ space  # (n, r)
    live = live_rows(rows, zero_tol)
    w = ray_at_zeros(rows[live], x[live], zero_tol)
    if w is None:
        return None
    coord = space @ w
    return coord / coord.norm()


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
    ``coord_dir`` ``(b,)``, at the scale whose cross-entropy divisor is the update's
    (:attr:`spear.inversion.problem.Evidence.whole` once examples have shown it, else a
    plain mean's over the rank or a sum's, 1); ``None`` when none is found near ``t`` or the
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
    whole = problem.evidence.whole  # a mean's count once examples have shown it
    targets = (math.log(whole),) if whole is not None else (math.log(problem.rank), 0.0)
    plain = min(targets, key=lambda d: abs(first[0] - d))
    h, coord, grad, miss = first
    h -= plain
    prev: tuple[float, float] | None = None
    for _ in range(DIVISOR_ROUNDS):
        if abs(math.expm1(h)) <= settled:
            pinned = miss <= limit and _scale_pinned(problem, basis, coord, plain, limit)
            return (coord, grad) if pinned else None
        if prev is not None and s == prev[0]:
            # the last step was below the rounding of s: the secant cannot move on
            return None
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


def _reference_norm(problem: Problem, res: Residual) -> float:
    """A typical example norm: the median norm of the row candidates ``dW[j] / db[j]``
    (weighted means of the examples on at unit ``j``), else that of ``W``'s rows'
    inverse (a unit pre-activation)."""
    layer = problem.layer
    assert layer is not None
    if res.bias is not None:
        _, cand = row_ratios(res, problem.tol)
        if cand.shape[0]:
            norms = (cand @ layer.right).norm(dim=1)
            return float(norms.median())
    scale = float(layer.weight_coords.norm(dim=1).median())
    return 1.0 / scale if scale > 0 else 1.0
