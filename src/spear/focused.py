"""Focused sampling: row subsets steered by the unknown examples' predicted ReLU patterns.

Plain sampling (SPEAR) draws ``r - 1`` rows at random and succeeds when all of them are
zero in one gradient column: about ``2^-(r-1)`` per example. With the layer's weights the
odds can be made large. A row candidate ``dW[j] / db[j]`` projected on the subspace where
the missing examples lie (:func:`spear.candidates.unknown_subspace`) is a mixture of
missing examples, scaled so that ``p . s = 1`` like every example (``s = L^+ db``). The
units its ``W x + c`` puts furthest below zero are off for most of those examples, so
``r - 1 + e`` rows (``e = r / 5``, at most 25) drawn from the most negative ones often
lie in the zero sets of one or several missing examples at once. The kernel of those rows
then has dimension ``k >= 1`` and contains their exact directions (the ``e`` rows beyond
``r - 1`` rule out combinations of examples that are each on at a single drawn row, which
would otherwise fill it, see :data:`EXTRA_ROW_FRACTION`); ``k = 1`` gives one at once,
larger ``k`` (up to 32) are split by ``k - 1`` more units drawn the same way, from the
candidate's next most negative ones. Units are added to a subset until no direction
already found is zero on all of it, so found examples do not fill the kernel again. Every
direction goes through :func:`spear.solvers.polish.purify` (a pure one-dimensional kernel
on its zero set) and, for exact float64 patterns, :class:`spear.realizable.RealizabilityTest`
(some input switches off exactly that zero set: sparse combinations of several examples
that a softmax output creates fail it) before it is pooled; the examples are verified
against their own ReLU patterns after the complete solve, as always.

Measured on Fashion-MNIST, one thread beside a second run: ``784 -> 1000``, b = 128 (where
peeling, the sparse solver and the subspace step stall at about 20 of 125 directions),
the float32 model in 25 s (median; worst 41 s) per batch; at b = 256, ``784 -> 2000``,
the float64 layer in 549 s; float32 FedAvg deltas of 16 local steps at b = 128, 10 of 10
batches whole within 120 s (median 47 s; docs/benchmarks.md).
"""

from __future__ import annotations

import math
import time

import torch

from spear.candidates import residual_svd, unknown_subspace_from
from spear.inversion.checks import exact_patterns
from spear.inversion.pool import DirectionPool, same_direction_distance, same_direction_tolerance
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual
from spear.linalg import (
    Tolerances,
    least_squares,
    low_singular_basis,
    null_vectors,
    orthonormal_basis,
    pure_kernels,
    zero_mask,
)
from spear.realizable import RealizabilityTest
from spear.solvers.base import SearchSpec
from spear.solvers.polish import live_rows, purify
from spear.solvers.sampling import SPAN_TOL, in_span

__all__ = ["break_known", "focused_sampling"]

#: Rows in the pool beyond those drawn.
POOL_EXTRA = 25
#: Rows drawn beyond ``r - 1``, as a fraction of ``r``. A kernel of ``r - 1`` steered rows
#: holds, besides the examples zero on all of them, exact combinations of examples that
#: are on at a single drawn row (one dimension for each such example beyond the first at
#: that row). Similar examples fill large kernels with those, and splitting the kernel
#: then proposes combinations instead of examples. Each extra row removes every
#: combination whose examples are on there. Measured on float32 FedAvg deltas
#: (``784 -> 1000 -> 128 -> 10``, b = 128, one epoch in mini-batches of 8, 120 s): with
#: no extra rows the search had pooled 81 and 57 of the missing directions at seeds 1 and
#: 5; with 16 extra rows (pool 60 beyond ``r - 1``) it solved seed 1 in 89 s and pooled
#: 117 at seed 5; with 24 (pool 80), 126 at seed 5; with 32 (pool 100), 98. With
#: ``e = r / 5`` extra rows drawn from ``2 e + POOL_EXTRA`` units beyond ``r - 1``, 10 of
#: 10 such batches come back whole within 120 s (none with ``r - 1`` rows).
EXTRA_ROW_FRACTION = 0.2
#: At most this many extra rows: the measurements above reach ``r = 128``, and 32 extra
#: rows there already found fewer kernels than 16 or 24.
MAX_EXTRA_ROWS = 25
#: Largest kernel dimension split by sampling inside it (cost ``~ k 2^(k-1)`` subsets).
MAX_SPLIT_DIM = 8
#: Subsets drawn inside a ``k``-dimensional kernel, times ``k 2^(k-1)``.
SPLIT_SAMPLES = 8
#: Largest kernel dimension split by subsets steered like the outer draw.
MAX_STEERED_SPLIT_DIM = 32
#: Units beyond ``k - 1`` that steered subsets inside a kernel are drawn from.
SPLIT_POOL_EXTRA = 8
#: Steered subsets drawn inside a ``k``-dimensional kernel, times ``k``.
SPLIT_STEERED = 16
#: Stop after this many draws in a row that pool nothing new.
PATIENCE = 400
#: A kernel vector of the drawn rows is zero on them by construction; it goes on to the
#: (costly) purification only when it is zero on at least this fraction of ``r`` live
#: units beyond them. Measured on float32 FedAvg deltas (``784 -> 1000 -> 128 -> 10``,
#: b = 128, one epoch in mini-batches of 8): true directions were zero on 428 to 498
#: units, the other candidates on 123 to 145 (90th percentile) from about 127 drawn rows;
#: purifying those took half the search's time.
EXTRA_ZERO_FRACTION = 0.25
#: Hand back to the driver once this few directions are missing: the subspace step
#: (:func:`spear.candidates.subspace_candidates`) finishes small remainders quickly.
HANDOFF_MISSING = 8
#: On a FedAvg delta the subspace step's direction fit fails for most examples (units
#: that moved between local steps spoil it), so focused sampling goes on until one
#: direction is missing, which the last-direction step gives at once. Measured on float32
#: FedAvg deltas (``784 -> 1000 -> 128 -> 10``, b = 128, one epoch in mini-batches of 8,
#: seed 5): with the hand-off at 8 missing, the last 8 directions took 27 s, in rounds of
#: a 2 s subspace scan that pooled one direction in four and a focused draw that pooled
#: one in about 1.5 s.
HANDOFF_MISSING_DELTA = 1


def focused_sampling(problem: Problem, state: Residual) -> tuple[int, int]:
    """Pool missing directions by steered row subsets (module docstring).

    Parameters
    ----------
    problem:
        The layer's weights (nothing is drawn without them), tolerances, batch size
        ``b``, random source, deadline and sparsity threshold. Where its gradient's zero
        pattern is exactly the ReLU pattern (:func:`spear.inversion.checks.exact_patterns`),
        a direction is pooled only when some input realizes its zero set
        (:class:`spear.realizable.RealizabilityTest`), which rejects the sparse
        combinations of several examples that a softmax output creates.
    state:
        The residual (rank ``b - state.found``); found directions are appended to
        ``state.directions``. Something must be known: pooled directions, or peeled
        examples (the residual is then the subspace of the missing ones).

    Returns
    -------
    pooled:
        Directions added to ``state.directions``.
    draws:
        Row subsets drawn.
    """
    layer = problem.layer
    tol, rank, generator = problem.tol, problem.rank, problem.generator
    remaining = rank - state.found
    known_any = bool(state.directions) or state.found > 0
    if layer is None or state.bias is None or not known_any or remaining < 2:
        return 0, 0
    basis = orthonormal_basis(state.left, remaining)  # (m, r)
    _m, r = basis.shape
    live = live_rows(basis, tol.zero_tol)
    usable = (state.bias.abs() > tol.zero_tol * state.bias.abs().max()) & live
    idx = torch.nonzero(usable).flatten()
    extra = min(MAX_EXTRA_ROWS, int(EXTRA_ROW_FRACTION * r))
    pool_size = min(int(live.sum()), r - 1 + 2 * extra + POOL_EXTRA)
    drawn = min(pool_size, r - 1 + extra)
    if idx.numel() == 0 or pool_size < r:
        return 0, 0
    cand = state.left[idx] / state.bias[idx, None]  # (k, b) mixtures, p . s = 1
    s = least_squares(state.left, state.bias[:, None])[:, 0]  # (b,)
    spec = SearchSpec(
        basis=basis,
        target=r,
        zero_tol=tol.zero_tol,
        degeneracy_tol=tol.degeneracy_tol,
        separation=tol.separation,
        min_zero_fraction=problem.min_zero_fraction,
        row_weights=None,
        known=torch.zeros(0, r, dtype=basis.dtype, device=basis.device),
        generator=generator,
    )
    pooled = draws = idle = 0
    svd = residual_svd(state, rank)  # fixed: nothing is peeled in here
    span = unknown_subspace_from(svd, state.directions)
    known = _known_basis(state, basis)
    known_zero = _zero_sets(state, tol)  # (m, k) where each pooled direction is zero
    realizable = RealizabilityTest(layer, live, generator) if exact_patterns(problem) else None
    # a draw inside a known example's zero set gives its direction again, up to the noise
    # floor (float32): skip it before the costly purification
    near = max(SPAN_TOL, same_direction_distance(tol.zero_tol))
    handoff = HANDOFF_MISSING_DELTA if problem.delta else HANDOFF_MISSING
    while len(state.directions) < remaining and idle < PATIENCE:
        if time.perf_counter() > problem.deadline:
            break
        pick = int(torch.randint(cand.shape[0], (1,), generator=generator))
        p = span @ (span.T @ cand[pick])
        scale = float(p @ s)
        if not math.isfinite(scale) or abs(scale) <= tol.zero_tol * float(p.norm() * s.norm()):
            idle += 1
            draws += 1
            continue
        z = layer.weight_coords @ (p / scale)
        if layer.bias is not None:
            z = z + layer.bias
        z = torch.where(live, z, torch.full_like(z, math.inf))
        order = torch.argsort(z)
        pool = order[:pool_size]
        rows = pool[torch.randperm(pool_size, generator=generator, device=pool.device)[:drawn]]
        rows = break_known(rows, order, known_zero, r)
        draws += 1
        idle += 1
        for q in _kernel_candidates(basis, basis[rows], order, tol, generator):
            if in_span(q, known, near) or not _sparse_beyond(basis, q, live, rows, tol):
                continue
            for pure in purify(basis, q, spec):
                if in_span(pure, known, near):
                    continue
                unit = basis @ pure
                if realizable is not None and not realizable(
                    zero_mask(unit[:, None], tol.zero_tol)[:, 0]
                ):
                    continue
                if state.directions.add(unit):
                    pooled += 1
                    idle = 0
                    if remaining - len(state.directions) <= handoff:
                        return pooled, draws
                    known = _known_basis(state, basis)
                    known_zero = _zero_sets(state, tol)
                    span = unknown_subspace_from(svd, state.directions)
    return pooled, draws


def _sparse_beyond(
    basis: torch.Tensor, q: torch.Tensor, live: torch.Tensor, rows: torch.Tensor, tol: Tolerances
) -> bool:
    """Whether ``basis @ q`` (``(m, r)``, ``(r,)``) is zero on ``EXTRA_ZERO_FRACTION * r``
    live units beyond the ``rows`` ``(k,)`` its kernel was drawn from."""
    zeros = int((zero_mask((basis @ q)[:, None], tol.zero_tol)[:, 0] & live).sum())
    return zeros >= rows.numel() + EXTRA_ZERO_FRACTION * basis.shape[1]


def _kernel_candidates(
    basis: torch.Tensor,
    rows: torch.Tensor,
    order: torch.Tensor,
    tol: Tolerances,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Candidate directions ``(r,)`` in the kernel of ``rows`` ``(r - 1 + e, r)``.

    ``order`` ``(m,)`` ranks the units by the steering candidate's pre-activation, most
    negative first; a ``k``-dimensional kernel is split with ``(k - 1)``-unit subsets of
    its first useful units (and uniform ones for ``k <= MAX_SPLIT_DIM``), each candidate
    kept when its zero set has a pure one-dimensional kernel inside the ``k`` dimensions.
    """
    r = basis.shape[1]
    ker = low_singular_basis(rows, tol.degeneracy_tol * math.sqrt(r))  # (r, k)
    k = ker.shape[1]
    if k == 0:
        return []
    if k == 1:
        return [ker[:, 0]]
    if k > MAX_STEERED_SPLIT_DIM:
        return []
    sub = basis @ ker  # (m, k) orthonormal columns; rows zero for all k are useless
    norms = sub.norm(dim=1)
    is_useful = norms > tol.zero_tol * norms.max()
    useful = torch.nonzero(is_useful).flatten()
    if useful.numel() < k - 1:
        return []
    picks = []
    if k <= MAX_SPLIT_DIM:
        # uniform (k - 1)-row subsets: each lies in one example's zero set with odds ~2^-(k-1)
        # (drawn with replacement: a subset with a repeated row has a wider kernel, and its
        # vector few zeros, so the zero count below discards it)
        draws = SPLIT_SAMPLES * k * 2 ** (k - 1)
        slots = torch.randint(
            useful.numel(), (draws, k - 1), generator=generator, device=basis.device
        )
        picks.append(useful[slots])
    # steered ones: the steering candidate's next most negative units are off for most of
    # the k examples (the same reasoning as the outer draw, one level down)
    ranked = order[is_useful[order]][: k - 1 + SPLIT_POOL_EXTRA]
    if ranked.numel() >= k - 1:
        keys = torch.rand(
            SPLIT_STEERED * k,
            ranked.numel(),
            generator=generator,
            dtype=basis.dtype,
            device=basis.device,
        )
        picks.append(ranked[keys.topk(k - 1, dim=1).indices])
    if not picks:
        return []
    pick = torch.cat(picks)  # (draws, k - 1)
    w = null_vectors(sub[pick])  # (draws, k)
    vals = zero_mask(sub @ w.T, tol.zero_tol)  # (m, draws)
    zeros = vals.sum(dim=0)
    ranked_draws = torch.argsort(zeros, descending=True)
    sparse = ranked_draws[zeros[ranked_draws] >= basis.shape[0] // 10]
    return _pure_directions(sub, ker, w, vals, sparse, tol)


def _pure_directions(
    sub: torch.Tensor,
    ker: torch.Tensor,
    w: torch.Tensor,
    vals: torch.Tensor,
    ranked: torch.Tensor,
    tol: Tolerances,
) -> list[torch.Tensor]:
    """Up to ``k`` distinct directions inside a ``k``-dimensional kernel, one per example.

    ``ranked`` orders the draws' kernel vectors ``w`` ``(draws, k)`` sparsest first (their
    zero sets ``vals`` ``(m, draws)`` in ``sub`` ``(m, k)``); up to ``3 k`` of those not
    already found are tried. One example inside the kernel has a pure one-dimensional
    kernel on its zero set (cheap, ``k`` columns); mixtures fitted to cancel on a few rows
    fail there. Returns unit vectors ``(r,)`` (``ker`` is ``(r, k)``).
    """
    k = ker.shape[1]
    # copies of one direction differ by the update's noise floor (float32: measured 5e-4
    # to 8e-4 apart on FedAvg deltas, 784 -> 1000 -> 128 -> 10, b = 128), not by
    # roundoff: under the float64 rule a 15-dimensional kernel gave one direction 15 times
    out = DirectionPool(same_tol=same_direction_tolerance(tol.zero_tol))
    tried = pos = 0
    while len(out) < k and tried < 3 * k and pos < ranked.numel():
        chunk = ranked[pos : pos + 3 * k - tried]
        pos += chunk.numel()
        pure = pure_kernels(sub, vals[:, chunk], tol.degeneracy_tol, tol.separation)
        for j, i in enumerate(chunk.tolist()):
            if len(out) >= k:
                break
            q = ker @ w[i]
            if out.contains(q / q.norm()):
                continue
            tried += 1
            found = pure[j]
            if found is not None:
                q = ker @ found
                out.add(q / q.norm())
    return list(out)


def _zero_sets(state: Residual, tol: Tolerances) -> torch.Tensor:
    """``(m, k)`` bool: where each pooled direction is zero."""
    if not state.directions:
        return torch.zeros(state.left.shape[0], 0, dtype=torch.bool, device=state.left.device)
    return zero_mask(state.directions.stack(dim=1), tol.zero_tol)


def break_known(
    rows: torch.Tensor, order: torch.Tensor, known_zero: torch.Tensor, r: int
) -> torch.Tensor:
    """Add rows so that no pooled direction is zero on all of ``rows``.

    A subset inside a found example's zero set puts that example's direction in the
    kernel again. For each such direction, the first unit in ``order`` (the steering
    candidate's most negative units) where it is not zero is added, so the kernel keeps
    only examples not found yet. At most ``r // 2`` rows are added.

    Parameters
    ----------
    rows:
        ``(d,)`` the drawn units (``r - 1`` and the extra ones of
        :data:`EXTRA_ROW_FRACTION`).
    order:
        ``(m,)`` all units, most promising first.
    known_zero:
        ``(m, k)`` zero sets of the pooled directions.
    r:
        Residual rank.

    Returns
    -------
    torch.Tensor
        ``(d + a,)`` the units to take the kernel of, ``a`` of them added.
    """
    if known_zero.shape[1] == 0:
        return rows
    chosen = torch.zeros(known_zero.shape[0], dtype=torch.bool, device=rows.device)
    chosen[rows] = True
    covering = known_zero[rows].all(dim=0)
    extra: list[int] = []
    while bool(covering.any()) and len(extra) < r // 2:
        k = int(torch.nonzero(covering)[0])
        free = ~known_zero[order, k] & ~chosen[order]
        hits = torch.nonzero(free).flatten()
        if hits.numel() == 0:
            break
        j = int(order[hits[0]])
        chosen[j] = True
        extra.append(j)
        covering &= known_zero[j]
    if not extra:
        return rows
    return torch.cat([rows, torch.tensor(extra, dtype=rows.dtype, device=rows.device)])


def _known_basis(state: Residual, basis: torch.Tensor) -> torch.Tensor:
    """``(r, k)`` orthonormal basis of the pooled directions in basis coordinates."""
    if not state.directions:
        return torch.zeros(basis.shape[1], 0, dtype=basis.dtype, device=basis.device)
    coords = basis.T @ state.directions.stack(dim=1)
    return torch.linalg.qr(coords).Q
