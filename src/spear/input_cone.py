"""Examples from the input side: nonnegative inputs are extreme rays of a cone
(docs/algorithm.md, fact 13).

Where the attacked layer's inputs come out of a ReLU or a max-pool of one (the features a
CNN hands to its first linear layer, or the hidden units a deeper layer reads), every
example ``x_i`` ``(n,)`` is nonnegative and zero on many coordinates. The row space of the
update holds every ``x_i``: in row-space coordinates ``c`` (``x = c @ right``) the
residual's examples span an ``r``-dimensional subspace, and within it the cone
``{c : c @ right >= 0}`` contains every example. An example that vanishes on ``r - 1``
independent coordinates is an extreme ray of that cone; other extreme rays vanish on
about ``r - 1`` coordinates only, an example on far more. :func:`cone_vertex` finds
sparse vertices of the cone's cross-section ``sum(c @ right) = 1`` by linear programs.
This needs nothing from the output side: it works where the gradient columns' zero sets
leave whole groups of examples undetermined.

A direction gives the example up to its scale ``t``, which the model after the layer
fixes: at the example's scale its own cross-entropy column ``J^T (softmax - e_y)`` lies
in the column space of the update. :func:`scale_candidates` finds scales near which it
does; the inversion step (:mod:`spear.inversion.steps.cone`) fixes the scale by the
cross-entropy divisor and peels the example only once it passes the checks a row-peeled
example passes (its pattern, the range of its Jacobian, and the divisor of a plain mean
or sum). Below float64 those checks are too coarse to fix a scale, and one vertex per
missing example gives their gradient directions instead (:func:`directions_from_inputs`),
whose scales the bias gradient fixes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linprog

from spear.downstream import Downstream, label_columns, nearest_directions
from spear.linalg import (
    GRAM_THRESHOLD,
    kernel,
    orthonormal_basis,
    smallest_singular_vector,
    zero_mask,
)

__all__ = [
    "CONE_DELTA",
    "CONE_REWEIGHTS",
    "SCALE_DECADES",
    "SCALE_START_MISS",
    "SCALE_STEP",
    "cone_vertex",
    "directions_from_inputs",
    "face_vertex",
    "ray_at_zeros",
    "residual_row_space",
    "row_starts",
    "scale_candidates",
    "trimmed_vertex",
]

#: Reweighting rounds of :func:`cone_vertex` (it stops earlier once the zero count stops
#: growing).
CONE_REWEIGHTS = 6
#: The reweighting's floor ``delta``, relative to the largest entry of the current vertex.
CONE_DELTA = 1e-2
#: The first objective's weights are ``exp(CONE_SPREAD * z)``, ``z`` standard normal.
CONE_SPREAD = 2.0
#: :func:`trimmed_vertex`: the sizes of the coordinate subsets it fits, as offsets past
#: the row space's dimension ``r``, tried in turn from the smallest.
TRIM_OFFSETS = (4, 8, 12, 16, 20, 25, 30, 36, 42, 50, 60)
#: :func:`face_vertex`: the largest face (dimensions of the kernel of its zero set) whose
#: vertices are searched.
FACE_DIMENSIONS = 4
#: Refits at one subset size before the subset must have settled.
TRIM_REFITS = 50
#: The scale of an example is searched over this many decades either side of the
#: reference scale (the typical norm of the row candidates ``dW[j] / db[j]``).
SCALE_DECADES = 3
#: Grid points per decade of that search (a ReLU pattern can hold for a few percent of
#: the scale only: pooled features entering a layer whose bias dominates).
SCALE_STEPS_PER_DECADE = 48
#: The grid's step in ``log t``.
SCALE_STEP = math.log(10.0) / SCALE_STEPS_PER_DECADE
#: Grid points (the best of distinct ReLU patterns) around which a finer grid of
#: :data:`SCALE_ZOOM` points a step either side is searched.
SCALE_WINDOWS = 8
SCALE_ZOOM = 64
#: Grid points refined, at most (the best, with distinct ReLU patterns), and the largest
#: distance of their column from the column space, on the finer grid, for which they
#: are (relative). Measured on Flower's CNN (b = 32, float64): examples' best points on
#: the finer grid lie 6e-8 to 2e-5 from it, the vertices that are not examples 3e-2 and
#: farther (an example whose patterns hold on a range narrower than the finer grid's
#: step is missed, and found again from another vertex once others are peeled).
SCALE_STARTS = 4
SCALE_START_MISS = 1e-3
#: Largest Gauss-Newton step, relative to the scale.
SCALE_TRUST = 0.05
#: Gauss-Newton steps of the scale within one ReLU pattern.
SCALE_ROUNDS = 30
#: Relative change of the scale below which it has settled.
SCALE_SETTLED = 1e-13


def residual_row_space(left: torch.Tensor, rank: int) -> torch.Tensor:
    """``(b, rank)`` orthonormal basis of the row space of the residual ``left`` ``(m, b)``:
    the span of the coordinates of the examples not yet peeled."""
    return orthonormal_basis(left.T, rank)


def cone_vertex(
    rows: torch.Tensor, generator: torch.Generator, zero_tol: float
) -> torch.Tensor | None:
    """A sparse extreme ray of ``{w : rows @ w >= 0}``, refitted exactly.

    Solves ``min rho^T rows w`` subject to ``rows w >= 0`` and ``sum(rows w) = 1``
    (HiGHS), then again with ``rho`` reweighted to ``1 / (x + delta)`` at the solution
    ``x = rows w`` (reweighted l1, :data:`CONE_REWEIGHTS` rounds at most): each round
    moves to a vertex with more zeros, and examples, which vanish on far more coordinates
    than the ``r - 1`` of a generic vertex, are where it settles. The first ``rho`` is
    random (log-normal). The rows within the zero tolerance are then the vertex's zero
    set, and the direction is the kernel of that set (:func:`ray_at_zeros`); a kernel of
    more dimensions is a face several examples vanish on together (roundoff can put a
    vertex there), not a ray.

    Parameters
    ----------
    rows:
        ``(n, r)`` float64: the row space's basis at each live input coordinate.
    generator:
        The run's random source (the first objective).
    zero_tol:
        Relative zero tolerance of the update.

    Returns
    -------
    torch.Tensor | None
        ``(r,)`` unit vector with ``rows @ w`` nonnegative to the tolerance and zero on
        more than ``r - 1`` coordinates, or ``None`` (no bounded solution, a generic
        vertex, or a face).
    """
    n, r = rows.shape
    if r == 0 or n < r:
        return None
    a = rows.detach().cpu().numpy()
    total = a.sum(axis=0)[None, :]
    rho = torch.randn(n, generator=generator, dtype=torch.float64, device=generator.device)
    weights = torch.exp(CONE_SPREAD * rho).cpu().numpy()
    count = -1
    for _ in range(CONE_REWEIGHTS):
        solved = linprog(
            weights @ a,
            A_ub=-a,
            b_ub=np.zeros(n),
            A_eq=total,
            b_eq=np.ones(1),
            bounds=[(None, None)] * r,
            method="highs",
        )
        if solved.status != 0 or solved.x is None:
            return None
        x = a @ solved.x
        zeros = int((np.abs(x) <= zero_tol * np.abs(x).max()).sum())
        if zeros <= count:
            break
        count = zeros
        w = solved.x
        weights = 1.0 / (np.maximum(x, 0.0) + CONE_DELTA * x.max())
    if count < r:
        return None
    vertex = torch.as_tensor(w, dtype=torch.float64, device=rows.device)
    return ray_at_zeros(rows, rows @ vertex, zero_tol)


def trimmed_vertex(
    rows: torch.Tensor,
    generator: torch.Generator,
    zero_tol: float,
    start: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """A sparse extreme ray of ``{w : rows @ w >= 0}`` by trimmed least squares, refitted
    exactly.

    Each coordinate's row of ``rows`` is a point in ``R^r``; an example is a direction
    ``w`` orthogonal to far more of them than the ``r - 1`` a generic vertex is. From a
    random ``w`` (or ``start``: a row of the update, :func:`row_starts`), the ``k``
    coordinates where ``rows @ w`` is smallest (most negative
    first) are taken and ``w`` moved to the direction they come closest to vanishing on
    (their smallest right singular vector), until the subset settles; ``k`` grows from
    ``r + 4`` (:data:`TRIM_OFFSETS`). A direction that vanishes on ``r`` or more
    coordinates and is nonnegative on the rest is refitted at its zeros
    (:func:`ray_at_zeros`); from a ``start``, where those zeros hold a face of a few
    examples rather than a ray, a vertex of that face (:func:`face_vertex`). No linear
    program: cheaper than :func:`cone_vertex` per try,
    and measured on Flower's CNN at ``b = 32`` (float64, batches where the programs' vertices
    almost never are examples) one try in 5 gave an example where none of 200 programs
    did.

    Parameters
    ----------
    rows:
        ``(n, r)`` float64: the row space's basis at each live input coordinate.
    generator:
        The run's random source (the first direction, where ``start`` is ``None``).
    zero_tol:
        Relative zero tolerance of the update.
    start:
        ``(r,)`` the first direction, or ``None`` for a random one.

    Returns
    -------
    torch.Tensor | None
        ``(r,)`` unit vector, or ``None`` (no subset size gave a sparse nonnegative
        direction, or the zeros found hold a face).
    """
    n, r = rows.shape
    if r == 0 or n <= r:
        return None
    if start is None:
        w = torch.randn(r, generator=generator, dtype=torch.float64, device=generator.device)
    else:
        w = start.to(torch.float64)
    w = w.to(rows.device)
    x = rows @ w
    if start is not None and float(x.sum()) < 0:
        w, x = -w, -x  # a row's sign is its gradient entry's: the example's is positive
    for offset in TRIM_OFFSETS:
        k = min(n - 1, r + offset)
        subset: torch.Tensor | None = None
        for _ in range(TRIM_REFITS):
            chosen = torch.sort(torch.topk(x, k, largest=False).indices).values
            if subset is not None and torch.equal(chosen, subset):
                break
            subset = chosen
            w = _least_vanishing(rows[subset])
            x = rows @ w
            if float(x.sum()) < 0:
                w, x = -w, -x
        top = float(x.abs().max())
        zeros = int((x.abs() <= zero_tol * top).sum())
        if zeros >= r and float(x.min()) >= -zero_tol * top:
            ray = ray_at_zeros(rows, x, zero_tol)
            if ray is None and start is not None:
                return face_vertex(rows, x, generator, zero_tol)
            return ray
    return None


def face_vertex(
    rows: torch.Tensor, values: torch.Tensor, generator: torch.Generator, zero_tol: float
) -> torch.Tensor | None:
    """An extreme ray of the face of ``{w : rows @ w >= 0}`` where ``values`` ``(n,)``
    vanish, where that face is a cone of a few dimensions: the few examples its zero set
    is shared by (a row of the update that mixes two examples zero on the same
    coordinates vanishes there, and so does every mixture of the two, so the trimmed
    search settles on the face, not on a ray).

    The face is the kernel of ``rows`` ``(n, r)`` at the zeros of ``values``; where it has
    2 to :data:`FACE_DIMENSIONS` dimensions, a linear program in its coordinates
    (:func:`cone_vertex`) finds a vertex of the face, which is an extreme ray of the
    whole cone, refitted at its own zeros (:func:`ray_at_zeros`).

    Returns
    -------
    torch.Tensor | None
        ``(r,)`` unit vector, or ``None`` (the face is a line or larger than
        :data:`FACE_DIMENSIONS`, or its vertex is no ray).
    """
    mask = zero_mask(values[:, None], zero_tol)[:, 0]
    null, _ = kernel(rows[mask], zero_tol)  # (r, d)
    if not 2 <= null.shape[1] <= FACE_DIMENSIONS:
        return None
    inside = cone_vertex(rows @ null, generator, zero_tol)
    if inside is None:
        return None
    w = null @ inside
    return ray_at_zeros(rows, rows @ w, zero_tol)


def row_starts(left: torch.Tensor, right: torch.Tensor, zero_tol: float) -> list[int]:
    """The units whose rows of the residual start :func:`trimmed_vertex`, those with the
    most zeros first.

    Row ``j`` of the residual ``left @ right`` is ``sum_i g_ij x_i`` over the examples on
    at unit ``j``: a vector of the row space that mixes only those examples and vanishes
    wherever all of them do, so the trimmed search from it settles on one of the
    examples it mixes far more often than from a random direction (measured on Flower's
    untrained CNN at ``b = 64``, float64, seed 0: the 120 rows gave 13 distinct
    examples, 150 random starts 1, 150 linear programs none).

    Parameters
    ----------
    left:
        ``(m, b)`` the residual's left factor.
    right:
        ``(b, n)`` the update's right factor.
    zero_tol:
        Relative zero tolerance of the update.

    Returns
    -------
    list[int]
        The units whose rows are not zero, by the number of zero inputs of their row,
        most first.
    """
    rows = left @ right  # (m, n)
    norms = rows.norm(dim=1)
    top = float(norms.max()) if norms.numel() else 0.0
    if top <= 0.0:
        return []
    live = norms > zero_tol * top
    zeros = zero_mask(rows.T, zero_tol).sum(dim=0)  # (m,) zeros of each unit's row
    order = torch.argsort(-zeros, stable=True)
    return [int(j) for j in order if bool(live[j])]


def _least_vanishing(rows: torch.Tensor) -> torch.Tensor:
    """``(r,)`` unit vector that ``rows`` ``(k, r)`` come closest to vanishing on: the
    smallest right singular vector, from an SVD, or from the Gram matrix where the SVD
    does not converge."""
    try:
        return smallest_singular_vector(rows, 0.0)
    except RuntimeError:
        return smallest_singular_vector(rows, GRAM_THRESHOLD)


def ray_at_zeros(rows: torch.Tensor, values: torch.Tensor, zero_tol: float) -> torch.Tensor | None:
    """The ray of the cone ``{w : rows @ w >= 0}`` that vanishes where ``values`` does,
    refitted exactly: the kernel of ``rows`` ``(n, r)`` at the zeros of ``values``
    ``(n,)`` (a least-squares fit, so roundoff does not bend it), oriented along
    ``values``.

    Returns
    -------
    torch.Tensor | None
        ``(r,)`` unit vector, or ``None`` when that kernel is not one line (a face
        several examples vanish on together, where roundoff can put a vertex: a
        mixture) or ``rows`` times it is not nonnegative to the tolerance.
    """
    mask = zero_mask(values[:, None], zero_tol)[:, 0]
    null, _ = kernel(rows[mask], zero_tol)
    if null.shape[1] != 1:
        return None
    refit = null[:, 0]
    if float((rows @ refit) @ values) < 0:
        refit = -refit
    out = rows @ refit
    if float(out.min()) < -zero_tol * float(out.abs().max()):
        return None
    return refit


def directions_from_inputs(left: torch.Tensor, vertices: list[torch.Tensor]) -> torch.Tensor:
    """``(m, r)``: the gradient columns, up to their scales, of the ``r`` examples whose
    row-space coordinates ``vertices`` ``(b,)`` are given up to theirs, from the residual
    ``left`` ``(m, b)`` of rank ``r``.

    ``left = G C`` with the coordinates ``C`` ``(r, b)`` as rows and the gradient columns
    ``G`` ``(m, r)``; scaling a row of ``C`` by ``s`` scales its column of ``G`` by
    ``1 / s``, so ``left C^+`` has the exact directions of ``G``'s columns whatever the
    vertices' scales.
    """
    return left @ torch.linalg.pinv(torch.stack(vertices))


def scale_candidates(
    downstream: Downstream,
    basis: torch.Tensor,
    direction: torch.Tensor,
    reference: float,
) -> list[float]:
    """Scales ``t`` near which ``t * direction`` may be an example, most likely first.

    At the example's scale its own cross-entropy column ``J^T (softmax - e_y)`` lies in
    the column space of the update; a log grid (:data:`SCALE_STEPS_PER_DECADE` points a
    decade, :data:`SCALE_DECADES` decades either side of ``reference``) is ranked by the
    distance of that column from ``span(basis)``, and the best
    :data:`SCALE_STARTS` points with distinct ReLU patterns are refined by Gauss-Newton
    on the softmax's shape within their patterns (:func:`_refine_scale`). The result is
    a start: the caller fixes the scale to the update's precision by the cross-entropy
    divisor and checks the example.

    Parameters
    ----------
    downstream:
        The layer and the model after it.
    basis:
        ``(m, r)`` orthonormal basis of the residual's column space.
    direction:
        ``(n,)`` the example's input up to a positive scale.
    reference:
        A typical example norm.

    Returns
    -------
    list[float]
        Scales of ``direction`` (not of its unit vector).
    """
    norm = float(direction.norm())
    unit_x = direction / norm
    steps = 2 * SCALE_DECADES * SCALE_STEPS_PER_DECADE + 1
    grid = reference * torch.logspace(
        -SCALE_DECADES, SCALE_DECADES, steps, dtype=torch.float64, device=direction.device
    )
    logits, jac = downstream.logits_and_jacobians(grid[:, None] * unit_x[None, :])
    miss = label_columns(basis, logits, jac)[2].amin(dim=1)
    pushed = downstream.weight.to(torch.float64) @ unit_x.to(torch.float64)  # (m,) dz/dt
    windows: list[int] = []
    for k in torch.argsort(miss).tolist():
        if len(windows) >= SCALE_WINDOWS:
            break
        if not any(torch.equal(jac[k], jac[j]) for j in windows):
            windows.append(k)  # the best point of each ReLU pattern
    if not windows:
        return []
    # an example's patterns can hold on a far narrower range of scales than a step
    offsets = torch.linspace(
        -SCALE_STEP, SCALE_STEP, SCALE_ZOOM, dtype=torch.float64, device=unit_x.device
    )
    fine = (grid[windows][:, None] * torch.exp(offsets)[None, :]).reshape(-1)
    logits, jac = downstream.logits_and_jacobians(fine[:, None] * unit_x[None, :])
    miss = label_columns(basis, logits, jac)[2].amin(dim=1).reshape(len(windows), SCALE_ZOOM)
    best = miss.argmin(dim=1) + SCALE_ZOOM * torch.arange(len(windows), device=miss.device)
    best = best[torch.argsort(miss.amin(dim=1))]
    starts: list[float] = []
    for k in best.tolist()[:SCALE_STARTS]:
        if float(miss.reshape(-1)[k]) > SCALE_START_MISS:
            break
        t = float(fine[k])
        meet = _meeting(downstream, basis, jac[k])
        refined = _refine_scale(logits[k], jac[k], pushed, t, meet) if meet is not None else None
        # Gauss-Newton leaves the grid point's patterns only to drift (a flat softmax)
        near = refined is not None and abs(math.log(refined / t)) <= SCALE_STEP
        starts.append((refined if near else t) / norm)  # type: ignore[operator]
    return starts


def _meeting(downstream: Downstream, basis: torch.Tensor, jac: torch.Tensor) -> torch.Tensor | None:
    """``(m, 1)``: the unit vector of ``span(basis)`` nearest ``range(jac^T)`` (``jac``
    ``(C, m)``), or ``None`` when the range is empty."""
    span = downstream.ranges_at(jac[None])[0]  # (m, c)
    if span.shape[1] == 0:
        return None
    return nearest_directions(basis, span)[0][:, :1]


def _refine_scale(
    logits: torch.Tensor,
    jac: torch.Tensor,
    pushed: torch.Tensor,
    t0: float,
    meet: torch.Tensor,
) -> float | None:
    """Gauss-Newton on ``t`` so that ``J^T (softmax(l(t)) - e_y)`` lies in ``span(meet)``.

    The logits are affine in ``t`` within one ReLU pattern: ``l(t) = l0 + (t - t0) J w``
    (``w`` = ``pushed``, the layer's weights times the unit input). Steps are limited to
    :data:`SCALE_TRUST` of ``t`` (a flat softmax barely depends on ``t``). Each label is
    tried; the scale of the label whose column ends nearest ``span(meet)`` is returned.
    """
    slope = jac @ pushed  # (C,)
    jt = jac.T  # (m, C)
    best: tuple[float, float] | None = None
    for label in range(jac.shape[0]):
        t = t0
        for _ in range(SCALE_ROUNDS):
            column, deriv = _label_column(jt, logits + (t - t0) * slope, slope, label)
            res = column - meet @ (meet.T @ column)
            dres = deriv - meet @ (meet.T @ deriv)
            denom = float(dres @ dres)
            if denom == 0.0:
                break
            step = float(res @ dres) / denom
            step = max(-SCALE_TRUST * t, min(SCALE_TRUST * t, step))
            t -= step
            if abs(step) <= SCALE_SETTLED * t:
                break
        column, _ = _label_column(jt, logits + (t - t0) * slope, slope, label)
        size = float(column.norm())
        if size == 0.0 or not math.isfinite(t):
            continue
        miss = float((column - meet @ (meet.T @ column)).norm()) / size
        if best is None or miss < best[1]:
            best = (t, miss)
    return best[0] if best is not None else None


def _label_column(
    jt: torch.Tensor, logits: torch.Tensor, slope: torch.Tensor, label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy column ``J^T (p - e_y)`` ``(m,)`` at ``logits`` ``(C,)`` and its
    derivative along the logits' ``slope`` ``(C,)`` (``jt`` = ``J^T`` ``(m, C)``)."""
    p = torch.softmax(logits, dim=0)
    target = p.clone()
    target[label] -= 1.0
    return jt @ target, jt @ (p * slope - p * float(p @ slope))
