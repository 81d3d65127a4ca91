"""Turn an approximate sparse direction into exact, pure ones.

Shared by every solver. Given a unit vector ``q`` with ``v = basis @ q`` approximately
sparse, take the rows where ``v`` is zero and compute the kernel of the basis restricted to
them (docs/algorithm.md, facts 4 and 10):

* a one-dimensional kernel gives the exact direction of one column of ``G`` ("pure");
* a ``d``-dimensional kernel means the rows lie in the zero sets of ``d`` examples at once
  and ``q`` is a mixture of them: the ``d``-dimensional subproblem is solved by sampling
  ``d - 1`` rows at a time among the rows that are not all zero there.
"""

from __future__ import annotations

import torch

from spear.inversion.pool import same_direction
from spear.linalg import beyond_span, kernel, null_vectors, pure_kernel, zero_mask
from spear.solvers.base import SearchSpec

__all__ = ["live_rows", "purify"]

#: Largest kernel dimension that is split into its pure directions.
MAX_SUBPROBLEM_DIM = 5
#: Samples per sought direction when splitting a subproblem of dimension d: this many
#: times 2^(d-1) (the chance that d-1 random rows are all zero for one example).
SUBPROBLEM_SAMPLES_PER_DIRECTION = 8
#: At most this many candidates per sought direction are purified inside a subproblem.
SPLIT_ATTEMPTS_PER_DIRECTION = 3
#: Rounds of "zero set -> kernel -> zero set" before a direction is taken as settled.
POLISH_ROUNDS = 3


def live_rows(basis: torch.Tensor, zero_tol: float) -> torch.Tensor:
    """Rows that are not zero for every example (units on for at least one example).

    Parameters
    ----------
    basis:
        ``(m, r)`` orthonormal columns.
    zero_tol:
        Relative tolerance (to the largest row norm).

    Returns
    -------
    torch.Tensor
        ``(m,)`` bool.
    """
    norms = basis.norm(dim=1)
    return norms > zero_tol * norms.max()


def _settle(
    basis: torch.Tensor, q: torch.Tensor, spec: SearchSpec, live: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Iterate zero set -> kernel until it stops changing.

    Returns the kernel basis ``(r, d)`` of the final zero set and that zero set ``(m,)``,
    or ``None`` when the direction is not sparse enough.
    """
    m_live = int(live.sum())
    zeros = torch.zeros(basis.shape[0], dtype=torch.bool, device=basis.device)
    ker = q[:, None]
    for _ in range(POLISH_ROUNDS):
        v = basis @ q
        new_zeros = zero_mask(v[:, None], spec.zero_tol)[:, 0] & live
        if int(new_zeros.sum()) < max(basis.shape[1] - 1, 1):
            return None
        if int(new_zeros.sum()) < spec.min_zero_fraction * m_live:
            return None
        ker, _ = kernel(basis[new_zeros], spec.degeneracy_tol)
        if ker.shape[1] == 0:
            return None
        if ker.shape[1] > 1 or bool((new_zeros == zeros).all()):
            return ker, new_zeros
        zeros = new_zeros
        q = ker[:, 0]
    return ker, zeros


def purify(
    basis: torch.Tensor,
    q: torch.Tensor,
    spec: SearchSpec,
    depth: int = 0,
    weak: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Exact pure directions obtainable from an approximate direction ``q``.

    Parameters
    ----------
    basis:
        ``(m, r)`` float64 with orthonormal columns.
    q:
        ``(r,)`` approximate direction (any norm).
    spec:
        Tolerances, sparsity threshold and random generator.
    depth:
        Recursion depth (internal).
    weak:
        When given, receives directions whose zero set has a one-dimensional kernel but
        an essential row: a true column whose zero set barely differs from another
        example's (common in small residual problems) or a mixture fitted to cancel on
        that row. Sparsity alone cannot tell them apart; the layer's ReLU patterns can.
        It also receives, from a zero set whose kernel reaches exactly one dimension
        beyond the directions already known (``spec.known``), that dimension: the
        example's direction up to known ones (where the bias dominates small inputs,
        another example's zero set often contains this one's, and its direction then
        shares the kernel).

    Returns
    -------
    list[torch.Tensor]
        Unit vectors ``(r,)``, each making ``basis @ q`` exactly zero on at least
        ``spec.min_zero_fraction`` of the live rows with a one-dimensional kernel there.
    """
    live = live_rows(basis, spec.zero_tol)
    settled = _settle(basis, q / q.norm(), spec, live)
    if settled is None:
        return []
    ker, zeros = settled
    d = ker.shape[1]
    if d == 1:
        pure = pure_kernel(basis[zeros], spec.degeneracy_tol, spec.separation)
        if pure is None and weak is not None:
            weak.append(ker[:, 0])
        return [pure] if pure is not None else []
    if weak is not None and spec.tentative and depth == 0 and spec.known.shape[0]:
        known = torch.linalg.qr(spec.known.T).Q  # (r, k)
        beyond = beyond_span(ker, known, spec.degeneracy_tol)
        if beyond is not None:
            weak.append(beyond)
    if d > MAX_SUBPROBLEM_DIM or depth > 1:
        return []
    return _split(basis, ker, zeros, spec, live, depth, weak)


def _split(
    basis: torch.Tensor,
    ker: torch.Tensor,
    zeros: torch.Tensor,
    spec: SearchSpec,
    live: torch.Tensor,
    depth: int,
    weak: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Pure directions inside a ``d``-dimensional kernel ``ker`` (r, d)."""
    d = ker.shape[1]
    sub = basis @ ker  # (m, d), orthonormal columns
    rows = torch.nonzero(live & ~zeros).flatten()
    if rows.numel() < d - 1:
        return []
    samples = SUBPROBLEM_SAMPLES_PER_DIRECTION * d * 2 ** (d - 1)
    keys = torch.rand(
        samples, rows.numel(), generator=spec.generator, dtype=torch.float64, device=basis.device
    )
    pick = rows[keys.topk(d - 1, dim=1).indices]  # (samples, d-1)
    if d - 1 == 0:
        return []
    mats = sub[pick]  # (samples, d-1, d)
    cand = null_vectors(mats)  # (samples, d): kernel vector of each (d-1)-row subset
    vals = sub @ cand.T  # (m, samples)
    nz = (zero_mask(vals, spec.zero_tol) & live[:, None]).sum(dim=0)
    order = torch.argsort(nz, descending=True)
    found: list[torch.Tensor] = []
    tried: list[torch.Tensor] = []
    for idx in order.tolist():
        if len(found) >= d or len(tried) >= SPLIT_ATTEMPTS_PER_DIRECTION * d:
            break
        if int(nz[idx]) < spec.min_zero_fraction * int(live.sum()):
            break
        q = ker @ cand[idx]
        if any(same_direction(q, f) for f in found + tried):
            continue
        tried.append(q / q.norm())
        for p in purify(basis, q, spec, depth + 1, weak):
            if not any(same_direction(p, f) for f in found):
                found.append(p)
    return found
