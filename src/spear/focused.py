"""Focused sampling: row subsets steered by the unknown examples' predicted ReLU patterns.

Plain sampling (SPEAR) draws ``r - 1`` rows at random and succeeds when all of them are
zero in one gradient column: about ``2^-(r-1)`` per example. With the layer's weights the
odds can be made large. A row candidate ``dW[j] / db[j]`` projected on the subspace where
the missing examples lie (:func:`spear.candidates.unknown_subspace`) is a mixture of
missing examples, scaled so that ``p . s = 1`` like every example (``s = L^+ db``). The
units its ``W x + c`` puts furthest below zero are off for most of those examples, so
``r - 1`` rows drawn from the ``r - 1 + extra`` most negative ones often lie in the zero
sets of one or several missing examples at once. The kernel of those rows then has
dimension ``k >= 1`` and contains their exact directions; ``k = 1`` gives one at once,
small ``k`` are split by sampling ``k - 1`` rows inside the kernel. Every direction goes
through :func:`spear.solvers.polish.purify` (a pure one-dimensional kernel on its zero
set) before it is pooled, and the examples are verified against their own ReLU patterns
after the complete solve, as always.

Measured on Fashion-MNIST, ``784 -> 1000`` untrained, b = 128 (where peeling, the sparse
solver and the subspace step stall at about 20 of 125 directions): all 125 directions in
about 1,100 subsets (35 s), of which 2 were mixtures that the
complete solve's verification set aside.
"""

from __future__ import annotations

import math
import time

import torch

from spear.candidates import Residual, pool_add, residual_svd, unknown_subspace_from
from spear.linalg import Tolerances, orthonormal_basis, zero_mask
from spear.solvers.base import SearchSpec
from spear.solvers.polish import live_rows, purify
from spear.verify import LayerView

__all__ = ["focused_sampling"]

#: Rows in the pool beyond the ``r - 1`` drawn.
POOL_EXTRA = 25
#: Largest kernel dimension split by sampling inside it (cost ``~ k 2^(k-1)`` subsets).
MAX_SPLIT_DIM = 8
#: Subsets drawn inside a ``k``-dimensional kernel, times ``k 2^(k-1)``.
SPLIT_SAMPLES = 8
#: Stop after this many draws in a row that pool nothing new.
PATIENCE = 400
#: Hand back to the driver once this few directions are missing: the subspace step
#: (:func:`spear.candidates.subspace_candidates`) finishes small remainders quickly.
HANDOFF_MISSING = 8


def focused_sampling(
    state: Residual,
    layer: LayerView,
    tol: Tolerances,
    rank: int,
    generator: torch.Generator,
    deadline: float,
    min_zero_fraction: float,
) -> tuple[int, int]:
    """Pool missing directions by steered row subsets (module docstring).

    Parameters
    ----------
    state:
        The residual; found directions are appended to ``state.directions``.
    layer:
        The layer's weights in row-space coordinates.
    tol:
        Zero and degeneracy tolerances.
    rank:
        The batch size ``b`` (the residual has rank ``b - state.found``).
    generator:
        Random source (deterministic given the seed).
    deadline:
        ``time.perf_counter()`` value at which to stop.
    min_zero_fraction:
        Fraction of zeros a direction needs.

    Returns
    -------
    pooled:
        Directions added to ``state.directions``.
    draws:
        Row subsets drawn.
    """
    remaining = rank - state.found
    if state.bias is None or not state.directions or remaining < 2:
        return 0, 0
    basis = orthonormal_basis(state.left, remaining)  # (m, r)
    _m, r = basis.shape
    live = live_rows(basis, tol.zero_tol)
    usable = (state.bias.abs() > tol.zero_tol * state.bias.abs().max()) & live
    idx = torch.nonzero(usable).flatten()
    pool_size = min(int(live.sum()), r - 1 + POOL_EXTRA)
    if idx.numel() == 0 or pool_size < r:
        return 0, 0
    cand = state.left[idx] / state.bias[idx, None]  # (k, b) mixtures, p . s = 1
    s = torch.linalg.lstsq(state.left, state.bias[:, None]).solution[:, 0]  # (b,)
    spec = SearchSpec(
        basis=basis,
        target=r,
        zero_tol=tol.zero_tol,
        degeneracy_tol=tol.degeneracy_tol,
        min_zero_fraction=min_zero_fraction,
        row_weights=None,
        known=torch.zeros(0, r, dtype=basis.dtype, device=basis.device),
        generator=generator,
    )
    pooled = draws = idle = 0
    svd = residual_svd(state, rank)  # fixed: nothing is peeled in here
    span = unknown_subspace_from(svd, state.directions)
    known = _known_basis(state, basis)
    while len(state.directions) < remaining and idle < PATIENCE:
        if time.perf_counter() > deadline:
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
        pool = torch.argsort(z)[:pool_size]
        rows = pool[torch.randperm(pool_size, generator=generator, device=pool.device)[: r - 1]]
        draws += 1
        idle += 1
        for q in _kernel_candidates(basis, basis[rows], tol, generator):
            if _in_span(q, known):
                continue
            for pure in purify(basis, q, spec):
                if _in_span(pure, known):
                    continue
                if pool_add(state.directions, basis @ pure):
                    pooled += 1
                    idle = 0
                    if remaining - len(state.directions) <= HANDOFF_MISSING:
                        return pooled, draws
                    known = _known_basis(state, basis)
                    span = unknown_subspace_from(svd, state.directions)
    return pooled, draws


def _kernel_candidates(
    basis: torch.Tensor, rows: torch.Tensor, tol: Tolerances, generator: torch.Generator
) -> list[torch.Tensor]:
    """Candidate directions ``(r,)`` in the kernel of ``rows`` ``(r - 1, r)``."""
    r = basis.shape[1]
    _, sv, vh = torch.linalg.svd(rows, full_matrices=True)
    rank = int((sv > tol.degeneracy_tol * math.sqrt(r)).sum())
    ker = vh[rank:].T  # (r, k)
    k = ker.shape[1]
    if k == 1:
        return [ker[:, 0]]
    if k > MAX_SPLIT_DIM:
        return []
    sub = basis @ ker  # (m, k) orthonormal columns; rows zero for all k are useless
    norms = sub.norm(dim=1)
    useful = torch.nonzero(norms > tol.zero_tol * norms.max()).flatten()
    if useful.numel() < k - 1:
        return []
    draws = SPLIT_SAMPLES * k * 2 ** (k - 1)
    keys = torch.rand(
        draws, useful.numel(), generator=generator, dtype=basis.dtype, device=basis.device
    )
    pick = useful[keys.topk(k - 1, dim=1).indices]  # (draws, k - 1)
    _, _, vv = torch.linalg.svd(sub[pick], full_matrices=True)
    w = vv[:, -1, :]  # (draws, k)
    zeros = zero_mask(sub @ w.T, tol.zero_tol).sum(dim=0)
    out: list[torch.Tensor] = []
    for i in torch.argsort(zeros, descending=True).tolist():
        if len(out) >= 3 * k or int(zeros[i]) < basis.shape[0] // 10:
            break
        q = ker @ w[i]
        if all(abs(float(q @ f)) <= 1 - 1e-8 for f in out):
            out.append(q / q.norm())
    return out


def _known_basis(state: Residual, basis: torch.Tensor) -> torch.Tensor:
    """``(r, k)`` orthonormal basis of the pooled directions in basis coordinates."""
    if not state.directions:
        return torch.zeros(basis.shape[1], 0, dtype=basis.dtype, device=basis.device)
    coords = basis.T @ torch.stack(state.directions, dim=1)
    return torch.linalg.qr(coords).Q


def _in_span(q: torch.Tensor, span: torch.Tensor) -> bool:
    """Whether unit ``q`` ``(r,)`` lies in the column span of orthonormal ``span``."""
    if span.shape[1] == 0:
        return False
    return float((q - span @ (span.T @ q)).norm()) <= 1e-8
