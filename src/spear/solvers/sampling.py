"""SPEAR's sampling solver (docs/algorithm.md, fact 4).

Draw many random ``(r-1)``-row subsets ``S`` of the basis at once, take the kernel
direction ``q`` of each ``basis[S]`` with one batched solve, and keep ``q`` only when
``basis @ q`` is sparse. Cheap rejection first: sparsity is tested on a few probe rows
outside the subsets, and only survivors are checked on all rows and polished
(:func:`spear.solvers.polish.purify`). Rows can be weighted so that rows which are zero for
many examples are drawn more often (fact 10).

The expected cost is about ``H_r * 2^(r-1)`` samples for uniform rows with half of the
entries zero, so this solver is for small ``r`` (up to about 24) or for finishing the
residual left by other solvers.
"""

from __future__ import annotations

import itertools
import math

import torch

from spear.inversion.pool import same_direction
from spear.solvers.base import Budget, Directions, SearchSpec
from spear.solvers.polish import live_rows, purify

__all__ = ["SPAN_TOL", "SamplingSolver", "expected_samples", "in_span"]

#: Probe rows used for the cheap sparsity test of every sampled direction.
PROBE_ROWS = 64
#: A sampled direction survives the probe test when at least this fraction of the zeros
#: its sparsity threshold asks for (``min_zero_fraction`` of the probe rows) is among the
#: probe rows, and at least :data:`MIN_PROBE_ZEROS`. Directions that are not in a zero
#: set's kernel have no zero at all; a true column with just ``min_zero_fraction`` zeros
#: has half that many among the probes at least about 9 times in 10 (64 probe rows, 0.1).
PROBE_ZERO_SHARE = 0.5
MIN_PROBE_ZEROS = 2
#: With ``spec.tentative``, return once strong and weak directions together number this
#: many times the target: the caller settles weak ones far faster than sampling finds
#: strong ones where zero sets are too small to single out every example.
TENTATIVE_SURPLUS = 3
#: Enumerate every row subset instead of sampling when there are at most this many.
EXHAUSTIVE_LIMIT = 50_000
#: Fewer probe rows than this make the probe test meaningless: check in full instead.
MIN_PROBE_ROWS = 16
#: At most this many sampled directions per chunk go on to the (costly) purification.
MAX_PURIFY_PER_CHUNK = 64
#: A unit vector lies in a span when its distance to it is below this.
SPAN_TOL = 1e-8
#: Uniform draws are clamped to at least this before the Gumbel transform
#: ``-log(-log(u))``: ``torch.rand`` can return exactly 0, whose logarithm is ``-inf``.
MIN_UNIFORM = 1e-300


def expected_samples(rank: int) -> float:
    """Coupon-collector estimate ``H_r * 2^(r-1)`` of uniform samples for ``r`` directions.

    Examples
    --------
    >>> round(expected_samples(4), 1)
    16.7
    """
    harmonic = sum(1.0 / k for k in range(1, rank + 1))
    return harmonic * 2.0 ** (rank - 1)


class SamplingSolver:
    """Batched random row subsets -> kernel directions -> sparsity filter.

    Parameters
    ----------
    chunk:
        Subsets drawn per batched step.
    """

    name = "sampling"

    def __init__(self, chunk: int = 8192) -> None:
        self.chunk = chunk

    def __call__(self, spec: SearchSpec, budget: Budget) -> Directions:
        """Search until ``spec.target`` directions are found or the budget ends."""
        basis = spec.basis
        _m, r = basis.shape
        found: list[torch.Tensor] = []
        known = list(spec.known)
        rejected: list[torch.Tensor] = []
        weak: list[torch.Tensor] = []
        samples = 0
        early = False
        if r == 0:
            return _pack(basis, found, samples, spec)
        if r == 1:
            # one direction left: it is the whole space (its zeros may all be rows that are
            # zero for every example, so there is nothing to test it against)
            found.append(torch.ones(1, dtype=basis.dtype, device=basis.device))
            return _pack(basis, found, 1, spec)
        live = torch.nonzero(live_rows(basis, spec.zero_tol)).flatten()
        if live.numel() < r + 1:
            return _pack(basis, found, samples, spec)
        weights = torch.ones(live.numel(), dtype=torch.float64, device=basis.device)
        if spec.row_weights is not None:
            weights = spec.row_weights[live].to(torch.float64).clamp_min(1e-6)
        log_w = weights.log()
        # probe rows must leave enough rows to draw subsets from; with few rows the
        # probe test is skipped (n_probe == 0) and every sample is checked in full
        n_probe = min(PROBE_ROWS, (live.numel() - (r - 1)) // 2)
        if n_probe < MIN_PROBE_ROWS:
            n_probe = 0
        # small problems: every subset once, in order, instead of random draws
        every: torch.Tensor | None = None
        if math.comb(live.numel(), r - 1) <= EXHAUSTIVE_LIMIT:
            every = _subsets(live.numel(), r - 1, basis.device)
            n_probe = 0
        while len(found) < spec.target and samples < budget.max_samples:
            if budget.expired():
                break
            if spec.tentative and len(found) + len(weak) >= TENTATIVE_SURPLUS * spec.target:
                early = True  # enough for the caller to settle (the next call draws afresh)
                break
            k = min(self.chunk, budget.max_samples - samples)
            if every is not None:
                if samples >= every.shape[0]:
                    break
                pick = live[every[samples : samples + k]]
                k = pick.shape[0]
                probe = live[:0]
            else:
                # probe rows: uniform, excluded from the subsets of this chunk
                perm = torch.randperm(live.numel(), generator=spec.generator, device=basis.device)
                probe = live[perm[:n_probe]]
                pool = perm[n_probe:]
                uniform = torch.rand(
                    k,
                    pool.numel(),
                    generator=spec.generator,
                    dtype=torch.float64,
                    device=basis.device,
                )
                gumbel = -torch.log(-torch.log(uniform.clamp_min(MIN_UNIFORM)))
                pick = live[pool[(log_w[pool] + gumbel).topk(r - 1, dim=1).indices]]
            mats = basis[pick]  # (k, r-1, r)
            sol, info = torch.linalg.solve_ex(mats[:, :, :-1], -mats[:, :, -1:])
            cand = torch.cat(
                [sol[:, :, 0], torch.ones(k, 1, dtype=basis.dtype, device=basis.device)], dim=1
            )
            ok = (info == 0) & torch.isfinite(cand).all(dim=1)
            cand = cand / cand.norm(dim=1, keepdim=True)
            if n_probe:
                pv = basis[probe] @ cand.T  # (n_probe, k)
                scale = pv.abs().amax(dim=0, keepdim=True)
                # the probe maximum stands in for the column's maximum (a lower bound of
                # it); the zero tolerance keeps orders of magnitude of head room for that
                nz = (pv.abs() <= spec.zero_tol * scale).sum(dim=0)
                need = math.floor(PROBE_ZERO_SHARE * spec.min_zero_fraction * n_probe)
                keep = ok & (nz >= max(MIN_PROBE_ZEROS, need))
            else:
                full = basis[live] @ cand.T
                zeros = (full.abs() <= spec.zero_tol * full.abs().amax(dim=0, keepdim=True)).sum(0)
                nz = zeros
                need = max(r, math.ceil(spec.min_zero_fraction * live.numel()))
                keep = ok & (zeros >= need)
            samples += k
            order = torch.argsort(nz * keep, descending=True)[: int(keep.sum())]
            explained = _span_basis(found + known, r, basis)  # rebuilt when found grows
            tried = 0
            for idx in order.tolist():
                if tried >= MAX_PURIFY_PER_CHUNK or len(found) >= spec.target:
                    break
                if budget.expired():
                    break
                q = cand[idx]
                # skip what is already explained: a direction found before, or a mixture of
                # found directions (it lies in their span), or one that failed before
                if in_span(q, explained) or _seen(q, rejected):
                    continue
                tried += 1
                pure = purify(basis, q, spec, weak=weak)
                if not pure:
                    rejected.append(q)
                for p in pure:
                    if not _seen(p, found) and not _seen(p, known):
                        found.append(p)
                        explained = _span_basis(found + known, r, basis)
                        if spec.on_progress is not None:
                            spec.on_progress(len(found))
        extra: list[torch.Tensor] = []
        for q in weak:
            if len(found) + len(extra) >= spec.target and not spec.tentative:
                break
            if not in_span(q, _span_basis(found + known + extra, r, basis)):
                extra.append(q)
        packed = _pack(basis, found + extra, samples, spec)
        packed.weak = len(extra)
        packed.early = early
        return packed


def _span_basis(among: list[torch.Tensor], r: int, like: torch.Tensor) -> torch.Tensor:
    """``(r, k)`` orthonormal basis of the span of the ``k`` vectors ``among`` ``(r,)``."""
    if not among:
        return torch.zeros(r, 0, dtype=like.dtype, device=like.device)
    return torch.linalg.qr(torch.stack(among, dim=1)).Q


def in_span(q: torch.Tensor, span: torch.Tensor, tol: float = SPAN_TOL) -> bool:
    """Whether unit ``q`` ``(r,)`` lies in the span of orthonormal ``span`` ``(r, k)``:
    within ``tol`` of it (roundoff, unless the caller derives its own)."""
    if span.shape[1] == 0:
        return False
    return float((q - span @ (span.T @ q)).norm()) <= tol


def _seen(q: torch.Tensor, among: list[torch.Tensor]) -> bool:
    """Whether ``q`` equals one of ``among`` up to sign (unit vectors)."""
    return any(same_direction(q, f) for f in among)


def _pack(
    basis: torch.Tensor, found: list[torch.Tensor], samples: int, spec: SearchSpec
) -> Directions:
    """Directions record with the zero fractions of the found vectors."""
    r = basis.shape[1]
    if not found:
        return Directions(
            vectors=torch.zeros(0, r, dtype=basis.dtype),
            zero_fraction=torch.zeros(0, dtype=basis.dtype),
            samples=samples,
        )
    vec = torch.stack(found)
    vals = basis @ vec.T
    live = live_rows(basis, spec.zero_tol)
    scale = vals.abs().amax(dim=0, keepdim=True)
    zeros = (vals.abs() <= spec.zero_tol * scale) & live[:, None]
    frac = zeros.sum(dim=0).to(basis.dtype) / max(1, int(live.sum()))
    return Directions(vectors=vec, zero_fraction=frac, samples=samples)


def _subsets(n: int, k: int, device: torch.device) -> torch.Tensor:
    """``(comb(n, k), k)`` every ``k``-subset of ``range(n)``, in lexicographic order.

    Built row by row: ``torch.combinations`` allocates an ``n ** k`` intermediate (64 TB for
    11 of 20 rows, though there are only 167,960 subsets).
    """
    rows = list(itertools.combinations(range(n), k))
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), k)
