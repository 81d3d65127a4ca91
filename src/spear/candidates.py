"""Examples and gradient directions from single rows of the weight gradient (fact 8).

Row ``j`` of ``dW`` divided by ``db[j]`` is an example when only that example turns unit
``j`` on, and a bias-weighted mixture otherwise. :func:`row_candidates` turns every row into
the exact gradient direction of the nearest example (pooled) and peels the examples that
two rows agree on, in the :class:`spear.inversion.residual.Residual`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from spear.downstream import (
    Downstream,
    fits_whole,
    implied_whole,
    own_columns,
    range_tolerance,
)
from spear.inversion.pool import DirectionPool, same_direction
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual
from spear.linalg import Tolerances, least_squares, orthonormal_basis, zero_mask
from spear.solvers.polish import live_rows
from spear.verify import LayerView, direction_for, pattern_check

__all__ = [
    "ChunkedDirections",
    "DirectionOf",
    "agreeing_direction",
    "certified_alone",
    "guided_weights",
    "residual_svd",
    "row_candidates",
    "row_ratios",
    "scaled_grad",
    "subspace_candidates",
    "unknown_subspace",
    "unknown_subspace_from",
]

#: Two rows give the same candidate example when they agree to this relative distance.
ROW_AGREEMENT = 1e-9
#: Coarser dtypes: two rows agree to this many machine epsilons when that is more than
#: :data:`ROW_AGREEMENT` (float32 single-example rows of Fashion-MNIST give their example to
#: 3e-8 relative, a quarter of an ulp; peels add their roundoff). Agreement only orders
#: and groups candidates: each is still verified by its own ReLU pattern.
ROW_AGREEMENT_ULPS = 100.0
#: A direction derived from a row candidate is pooled when the candidate's predicted ReLU
#: pattern agrees with the direction's zero pattern on this fraction of the units.
DIRECTION_AGREEMENT = 0.9
#: The row scans stop after this many rows in a row that give nothing new (directions come
#: from rows on for few examples, which are scanned first; measured on Fashion-MNIST,
#: b = 256, m = 2000: the first scan's 20 hits came within its first 600 of 1,987 rows, 19 of
#: them within the first 40).
ROW_PATIENCE = 200
#: Scan candidates whose kernel gives no direction get one from the model after the layer,
#: computed for this many candidates at once (:class:`ChunkedDirections`).
SCAN_CHUNK = 64
#: Exponent of the estimated off-rate in the row weights for guided sampling.
GUIDED_WEIGHT_POWER = 3.0

#: How a row scan turns a candidate into a pooled direction: called as
#: ``(layer, basis (m, r), coord (b,), live (m,) bool, tol, eps, delta)`` and returning a
#: unit direction ``(m,)`` or ``None`` (:func:`agreeing_direction`).
DirectionOf = Callable[
    [LayerView, torch.Tensor, torch.Tensor, torch.Tensor, Tolerances, float, bool],
    torch.Tensor | None,
]


def scaled_grad(
    state: Residual, coord: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor | None:
    """Scale a gradient direction so that ``grad coord^T`` is the example's term in ``dW``.

    With ``dW_res = G P`` and ``p_i^T P^+ ... = 1`` (see module notes), the scale is
    ``1 / (p^T L^+ v)``.
    """
    w = least_squares(state.left, direction[:, None])[:, 0]
    denom = float(coord @ w)
    if denom == 0.0 or not math.isfinite(denom):
        return None
    return direction / denom


def row_candidates(
    problem: Problem,
    state: Residual,
    dirty: torch.Tensor,
    *,
    patience: int = ROW_PATIENCE,
    direction_of: DirectionOf | None = None,
) -> int:
    """Use rows of the residual as example candidates (facts 7-8); returns peeled count.

    Every row ``j`` gives a candidate ``p = L[j] / db[j]``: exactly an example when only
    that example turns unit ``j`` on, a bias-weighted mixture otherwise. The candidate's
    own ReLU pattern selects rows whose common kernel is the exact gradient direction of
    the example nearest to it; such directions are pooled in ``state.directions`` (a
    near-miss candidate still yields an exact direction). A candidate is taken as an
    exact example, and peeled, only when at least two rows produce it (two rows that
    agree to roundoff are both single-example rows of it).

    ``dirty`` ``(m,)`` bool: the rows to scan (all, or those the last peels changed). The
    scan stops after ``patience`` rows in a row that give no new direction, or at the
    problem's deadline. ``direction_of`` turns a candidate into a direction (default
    :func:`agreeing_direction`).
    """
    fallback = direction_of is None
    if direction_of is None:
        direction_of = agreeing_direction
    certify = certified_alone(problem)
    layer = problem.layer
    if layer is None or state.bias is None:
        return 0
    tol, eps, delta, deadline = problem.tol, problem.eps, problem.delta, problem.deadline
    remaining = problem.rank - state.found
    if remaining <= 0:
        return 0
    row_norm = state.left.norm(dim=1)
    idx, cand = row_ratios(state, tol, dirty)
    if idx.numel() == 0:
        return 0
    # group rows that give the same candidate (to roundoff): several single-example rows
    close = torch.cdist(cand, cand, compute_mode="donot_use_mm_for_euclid_dist")
    agreement = max(ROW_AGREEMENT, ROW_AGREEMENT_ULPS * eps)
    same = close <= agreement * cand.norm(dim=1)[:, None]
    support = same.sum(dim=1)
    # rows several agree on first (exact examples), then rows on for few examples (small
    # norm): they are the ones whose candidates are (nearly) single examples
    order = torch.argsort(support * 1e6 - row_norm[idx] / row_norm.max(), descending=True)
    basis = orthonormal_basis(state.left, remaining)
    live = live_rows(basis, tol.zero_tol)
    if certify is not None and fallback:
        # every row's candidate at once: exact examples give their own column (fact 12)
        # and are peeled without the row-by-row scan, which runs when none is left
        quick = _own_column_examples(problem, state, cand, basis, live, certify)
        if quick:
            for example, column in quick:
                state.directions.remove(column / column.norm())
                state.peel(example, column)
            return len(quick)
    handled = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
    exact: list[tuple[torch.Tensor, torch.Tensor]] = []
    idle = 0
    ordered = order.tolist()
    extra = ChunkedDirections.when(
        fallback, problem, basis, lambda start, stop: cand[ordered[start:stop]], len(ordered)
    )
    for position, i in enumerate(ordered):
        if time.perf_counter() > deadline or len(state.directions) >= remaining or idle >= patience:
            break
        if bool(handled[i]):
            continue
        handled |= same[i]
        coord = cand[i]
        idle += 1
        unit = direction_of(layer, basis, coord, live, tol, eps, delta)
        if unit is None and extra is not None:
            unit = extra(position)
        if unit is None:
            continue
        known = not state.directions.add(unit)
        if not known:
            idle = 0
        several = int(support[i]) >= 2
        if (several and not known) or (not several and certify is not None):
            grad = scaled_grad(state, coord, unit)
            if grad is None:
                continue
            ok, _ = pattern_check(
                layer, coord, zero_mask(grad[:, None], tol.zero_tol)[:, 0], live, eps, delta
            )
            taken = ok and (
                certify(coord, grad, not several, True) if certify is not None else several
            )
            unit_grad = grad / grad.norm()
            if taken and not any(same_direction(unit_grad, g / g.norm()) for _, g in exact):
                exact.append((coord, grad))
                idle = 0
    for coord, grad in exact:
        state.directions.remove(grad / grad.norm())
        state.peel(coord, grad)
    return len(exact)


def _own_column_examples(
    problem: Problem,
    state: Residual,
    cand: torch.Tensor,
    basis: torch.Tensor,
    live: torch.Tensor,
    certify: Callable[[torch.Tensor, torch.Tensor, bool, bool], bool],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row candidates ``cand`` ``(k, b)`` that are exact examples, with their columns.

    An exact example's own cross-entropy column lies in the column space of the update
    (:func:`spear.downstream.own_columns`); those that do, scaled to the residual and
    passing their pattern check and :func:`certified_alone`, are returned (one per
    example). One batched Jacobian for all candidates replaces a kernel per row.
    """
    downstream, layer = problem.downstream, problem.layer
    assert downstream is not None and layer is not None
    tol = problem.tol
    columns, dist = own_columns(downstream, basis, cand @ layer.right)
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in torch.nonzero(dist <= range_tolerance(tol.zero_tol)).flatten().tolist():
        unit = columns[:, i]
        if any(same_direction(unit, g / g.norm()) for _, g in found):
            continue
        grad = scaled_grad(state, cand[i], unit)
        if grad is None:
            continue
        zeros = zero_mask(grad[:, None], tol.zero_tol)[:, 0]
        ok, _ = pattern_check(layer, cand[i], zeros, live, problem.eps, problem.delta)
        if ok and certify(cand[i], grad, True, True):
            found.append((cand[i], grad))
    return found


def certified_alone(
    problem: Problem,
) -> Callable[[torch.Tensor, torch.Tensor, bool, bool], bool] | None:
    """Whether a row candidate ``coord`` ``(b,)`` with its column ``grad`` ``(m,)`` is an
    exact example by the model after the layer (``None`` when it is not known); the third
    argument says whether one row alone gave it, the fourth whether its divisor is
    evidence of the update's (not where its scale was chosen to make it plain).

    A row that one example alone turns on gives that example exactly; a row several
    examples turn on gives a mixture, which may have the ReLU patterns of one of them
    (when the others' gradients are small at that unit) and then passes every pattern
    check. Its column must lie in the range of the Jacobian at the candidate and fit
    softmax cross-entropy there with the divisor of a plain mean (the count of examples:
    ``b``, or more where examples merge) or sum (1) of per-example losses
    (:func:`spear.downstream.implied_whole`), and the update's divisor once examples have
    established it (:attr:`spear.inversion.problem.Evidence.whole`). The divisor
    settles it: a mixture with weight ``w`` on the example whose patterns it has gets
    that example's column scaled by ``1 / w``, so its divisor is ``w b`` (measured on the
    VGG-style CNN, float32, b = 8: mixtures 4 to 9% off fit cross-entropy to 1e-4, as a
    flat softmax barely changes, but their divisors were 0.8 to 5.1 instead of 8). Two
    rows that agree need only what every verified example needs
    (:func:`spear.inversion.checks.verified_indices`): the range, and the plain fit once
    the update has shown one. Updates whose divisors are neither (duplicates, clipping,
    sums over clients) peel no single row.
    """
    downstream = problem.downstream
    if downstream is None or problem.layer is None:
        return None

    def certify(coord: torch.Tensor, grad: torch.Tensor, alone: bool, tally: bool) -> bool:
        return certified_by(problem, downstream, coord, grad, alone, tally)

    return certify


def certified_by(
    problem: Problem,
    downstream: Downstream,
    coord: torch.Tensor,
    grad: torch.Tensor,
    alone: bool,
    tally: bool,
) -> bool:
    """:func:`certified_alone`'s test of the candidate at ``coord`` ``(b,)`` with its
    column ``grad`` ``(m,)`` against the model after the layer ``downstream`` (the
    problem's own, or one run with the example's Dropout mask)."""
    layer = problem.layer
    assert layer is not None
    x = (coord @ layer.right)[None]
    far, fit, divisor = downstream.checks(x, grad[:, None])
    if float(far[0]) > range_tolerance(problem.tol.zero_tol):
        return False
    rank, dtype = problem.rank, downstream.dtype
    found = float(fit[0]), float(divisor[0])
    shown = (
        problem.evidence.tally(*found, x[0], rank, dtype)
        if tally
        else implied_whole(*found, rank, dtype)
    )
    whole = problem.evidence.whole
    if alone:
        if whole is None:  # nothing established: a plain mean over the rank, or a sum
            return shown in (float(rank), 1.0)
        return shown == whole
    if whole is None:
        return True
    return bool(fits_whole(fit, divisor, whole, rank, dtype, copies=True)[0])


def unknown_subspace(state: Residual, rank: int) -> torch.Tensor:
    """Row-space coordinates where the examples of the missing directions must lie.

    The residual is ``L = sum_i g_i p_i^T`` over the ``r`` examples not peeled yet, and
    ``g_i = L q_i`` with ``P Q = I``: an example's coordinates ``p_u`` are orthogonal to the
    ``q_k`` of every other example. The pooled directions give those ``q_k`` exactly, so
    the examples whose directions are missing lie in the orthogonal complement of the
    pooled ``q_k`` within the residual's row space: a subspace of dimension ``r - k``.

    Returns
    -------
    torch.Tensor
        ``(b, d)`` orthonormal columns, ``d = r - len(state.directions)``, in the
        example coordinates (those of ``state.left``'s rows).
    """
    return unknown_subspace_from(residual_svd(state, rank), state.directions)


def residual_svd(state: Residual, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD ``(u (m, r), s (r,), vh (r, b))`` of the residual ``state.left``."""
    r = rank - state.found
    u, s, vh = torch.linalg.svd(state.left, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def unknown_subspace_from(
    row_space: tuple[torch.Tensor, torch.Tensor, torch.Tensor], directions: DirectionPool
) -> torch.Tensor:
    """``(b, r - k)``: the row space orthogonal to the ``q_k`` of ``k`` pooled directions."""
    u, s, vh = row_space
    if not directions:
        return vh.T.contiguous()
    dirs = directions.stack(dim=1)  # (m, k)
    duals = (u.T @ dirs) / s[:, None]  # (r, k): q_k in the coordinates y = vh p
    _, _, wh = torch.linalg.svd(duals.T, full_matrices=True)
    comp = wh[duals.shape[1] :]  # (r - k, r), orthonormal, orthogonal to every q_k
    return (comp @ vh).T.contiguous()


def subspace_candidates(
    problem: Problem,
    state: Residual,
    *,
    patience: int = ROW_PATIENCE,
    direction_of: DirectionOf | None = None,
) -> int:
    """Pool missing directions from row candidates projected on the unknown subspace.

    When most directions are pooled, the examples still missing lie in a small known
    subspace of the row space (:func:`unknown_subspace`). Projecting each row candidate
    ``dW[j] / db[j]`` (a mixture of the examples that turn unit ``j`` on) on it removes
    most of the found examples from the mixture; the projection's own ReLU pattern then
    yields the exact direction of a missing example (:func:`spear.verify.direction_for`,
    which accepts only a one-dimensional kernel on the zero set). The subspace shrinks
    with every direction found. Returns the number of directions pooled.

    Candidates are projected in order of their row's norm, smallest first; the scan stops
    after ``patience`` of them in a row pool nothing, or at the problem's deadline.
    ``direction_of`` turns a projection into a direction (default
    :func:`agreeing_direction`).
    """
    fallback = direction_of is None
    if direction_of is None:
        direction_of = agreeing_direction
    layer = problem.layer
    if layer is None or state.bias is None or not state.directions:
        return 0
    tol, eps, delta, deadline = problem.tol, problem.eps, problem.delta, problem.deadline
    rank = problem.rank
    remaining = rank - state.found
    if len(state.directions) >= remaining:
        return 0
    idx, cand = row_ratios(state, tol)
    if cand.shape[0] == 0:
        return 0
    # rows on for few examples (small norm) first: their projections are the nearest to
    # single missing examples (measured: most hits within the first few hundred rows)
    cand = cand[torch.argsort(state.left[idx].norm(dim=1))]
    basis = orthonormal_basis(state.left, remaining)
    live = live_rows(basis, tol.zero_tol)
    row_space = residual_svd(state, rank)
    span = unknown_subspace_from(row_space, state.directions)
    extra = ChunkedDirections.when(
        fallback, problem, basis, lambda start, stop: cand[start:stop] @ span @ span.T, len(cand)
    )
    added = idle = 0
    for position, ratio in enumerate(cand):
        if time.perf_counter() > deadline or len(state.directions) >= remaining or idle >= patience:
            break
        idle += 1
        coord = span @ (span.T @ ratio)
        if float(coord.norm()) <= tol.zero_tol * float(ratio.norm()):
            continue
        unit = direction_of(layer, basis, coord, live, tol, eps, delta)
        if unit is None and extra is not None:
            unit = extra(position)
        if unit is not None and state.directions.add(unit):
            added += 1
            idle = 0
            span = unknown_subspace_from(row_space, state.directions)
            if extra is not None:
                extra.reset()
    return added


def row_ratios(
    state: Residual, tol: Tolerances, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row candidates ``L[j] / db[j]`` of the rows with a usable bias and norm.

    Returns the row indices ``(k,)`` and the candidates ``(k, b)``; ``rows`` (``(m,)``
    bool) restricts the rows considered. Needs ``state.bias``.
    """
    assert state.bias is not None
    bias = state.bias
    row_norm = state.left.norm(dim=1)
    usable = (bias.abs() > tol.zero_tol * bias.abs().max()) & (
        row_norm > tol.zero_tol * row_norm.max()
    )
    if rows is not None:
        usable &= rows
    idx = torch.nonzero(usable).flatten()
    return idx, state.left[idx] / bias[idx, None]


def agreeing_direction(
    layer: LayerView,
    basis: torch.Tensor,
    coord: torch.Tensor,
    live: torch.Tensor,
    tol: Tolerances,
    eps: float,
    delta: bool,
) -> torch.Tensor | None:
    """The exact unit direction ``(m,)`` a candidate ``coord`` ``(b,)`` yields, or ``None``.

    ``None`` also when the candidate's own ReLU pattern agrees with the direction's zero
    pattern on less than :data:`DIRECTION_AGREEMENT` of the units.

    Parameters
    ----------
    layer:
        The layer as the server knows it, projected on the row space of ``dW``.
    basis:
        ``(m, r)`` orthonormal basis of the residual's column space.
    coord:
        ``(b,)`` the candidate example in row-space coordinates.
    live:
        ``(m,)`` bool, the units on for at least one example (:func:`live_rows`).
    tol, eps:
        The problem's tolerances and the update dtype's machine epsilon.
    delta:
        A FedAvg delta (ReLU patterns may move between local steps).
    """
    direction = direction_for(layer, basis, coord, tol, eps)
    if direction is None:
        return None
    grad_zero = zero_mask(direction[:, None], tol.zero_tol)[:, 0]
    _, agreement = pattern_check(layer, coord, grad_zero, live, eps, delta)
    if agreement < DIRECTION_AGREEMENT:
        return None
    return direction / direction.norm()


class ChunkedDirections:
    """Directions from the model after the layer for scan candidates, computed a chunk at
    a time (:meth:`spear.downstream.Downstream.directions`; one batched Jacobian per chunk
    instead of one per candidate).

    ``coords_of`` gives the ``(k, b)`` candidates at scan positions ``[start, stop)``;
    :meth:`reset` drops what was computed (the candidates changed).
    """

    def __init__(
        self,
        downstream: Downstream,
        layer: LayerView,
        basis: torch.Tensor,
        tol: Tolerances,
        coords_of: Callable[[int, int], torch.Tensor],
        total: int,
    ) -> None:
        self.downstream, self.layer, self.basis = downstream, layer, basis
        self.limit = range_tolerance(tol.zero_tol)
        self.coords_of, self.total = coords_of, total
        self.found: dict[int, torch.Tensor | None] = {}

    @classmethod
    def when(
        cls,
        wanted: bool,
        problem: Problem,
        basis: torch.Tensor,
        coords_of: Callable[[int, int], torch.Tensor],
        total: int,
    ) -> ChunkedDirections | None:
        """The scan's fallback through :attr:`Problem.downstream` when ``wanted`` and the
        problem has the model after the layer and the weights; else ``None``."""
        if not wanted or problem.downstream is None or problem.layer is None:
            return None
        return cls(problem.downstream, problem.layer, basis, problem.tol, coords_of, total)

    def reset(self) -> None:
        """Forget the directions computed so far."""
        self.found.clear()

    def __call__(self, position: int) -> torch.Tensor | None:
        """The unit direction ``(m,)`` of the candidate at ``position``, or ``None``."""
        if position not in self.found:
            stop = min(self.total, position + SCAN_CHUNK)
            coords = self.coords_of(position, stop)
            units = self.downstream.directions(self.basis, coords @ self.layer.right, self.limit)
            for offset, unit in enumerate(units):
                self.found[position + offset] = None if unit is None else unit / unit.norm()
        return self.found.get(position)


def guided_weights(state: Residual, layer: LayerView, tol: Tolerances) -> torch.Tensor:
    """Row weights for sampling: estimated off-rate of each unit, to a power (fact 10).

    Proxies for the examples are the row ratios ``dW[j] / db[j]`` (bias-weighted mixtures
    of the examples that turn unit ``j`` on) and the examples already found.
    """
    proxies = list(state.coords)
    if state.bias is not None:
        usable = state.bias.abs() > tol.zero_tol * state.bias.abs().max()
        ratios = state.left[usable] / state.bias[usable, None]
        proxies.extend(ratios[: min(512, ratios.shape[0])])
    if not proxies:
        return torch.ones(state.left.shape[0], dtype=torch.float64, device=state.left.device)
    coords = torch.stack(proxies)  # (k, b)
    z = layer.weight_coords @ coords.T
    if layer.bias is not None:
        z = z + layer.bias[:, None]
    off_rate = (z <= 0).to(torch.float64).mean(dim=1)
    return off_rate.clamp(0.02, 1.0) ** GUIDED_WEIGHT_POWER
