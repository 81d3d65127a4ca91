"""Tentative completion: directions known only up to pooled ones become exact through the
model after the layer (:mod:`spear.downstream`).

Where the bias dominates small inputs, an example's zero set can leave a kernel of
several dimensions: another example whose zero set contains this one's, or a
combination of several, vanishes there too. When every such example is pooled, the
kernel reaches one dimension beyond the pool, and that dimension ``w_m = q_m + sum_f
beta_f q_f`` is the example's direction up to pooled ones (fact 12). A complete solve
with the pool and such tentatives gives the tentatives' examples *exactly*: ``p_m`` is
orthogonal to every pooled ``q_f`` and to every other tentative (each mixes only pooled
directions), and ``p_m . w_m = 1``; only the pooled examples' coordinates are shifted.
With one direction still missing, a filler column completes the solve and that
example comes out exact too (as in :func:`spear.inversion.solve.complete_last`). The
Jacobian at an exact example gives its exact direction
(:meth:`spear.downstream.Downstream.directions`), which is pooled; the complete solve
verifies everything as always. Weak directions (a one-dimensional kernel with an
essential row) go the same way: the true ones among them are exact.
"""

from __future__ import annotations

import time

import torch

from spear.downstream import range_tolerance
from spear.inversion.problem import Problem
from spear.inversion.settle import settle
from spear.inversion.solve import solve_complete
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.linalg import beyond_span
from spear.results import SolverStats

__all__ = ["MAX_TENTATIVE_SETS", "TentativeCompletion"]

#: Sets of tentatives tried per round (the first greedy, the others shuffled).
MAX_TENTATIVE_SETS = 32


class TentativeCompletion:
    """Complete solves with the pool and tentatives; the Jacobians at the tentatives'
    examples give exact directions. Needs the model after the layer."""

    name = "tentative"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Try sets of tentatives until one yields exact directions, or none is left."""
        downstream, layer, res = problem.downstream, problem.layer, state.residual
        missing = state.remaining - len(state.pool)
        if (
            downstream is None
            or layer is None
            or res.bias is None
            or missing < 1
            or not state.tentatives
            or not problem.time_left()
        ):
            return StepReport()
        t0 = time.perf_counter()
        basis = state.basis  # (m, r)
        tol = range_tolerance(problem.tol.zero_tol)
        pooled = added = tried = 0
        while tried < MAX_TENTATIVE_SETS and problem.time_left():
            missing = state.remaining - len(state.pool)
            if missing < 1:
                break
            known = _coords(state, basis)  # (r, k) orthonormal
            fresh = [
                t
                for t in state.tentatives
                if beyond_span(
                    (basis.T @ t)[:, None] / float((basis.T @ t).norm()),
                    known,
                    problem.tol.degeneracy_tol,
                )
                is not None
            ]
            state.tentatives = fresh
            if len(fresh) < missing - 1:
                break
            order = list(range(len(fresh)))
            if tried:
                perm = torch.randperm(len(fresh), generator=problem.generator).tolist()
                order = perm
            tried += 1
            chosen = _independent([fresh[i] for i in order], basis, known, missing)
            if len(chosen) < missing - 1:
                break
            cols = [*state.pool.stack(dim=1).T, *chosen] if state.pool else list(chosen)
            if len(chosen) < missing:
                span = torch.linalg.qr(torch.stack([basis.T @ c for c in cols], dim=1)).Q
                filler = torch.linalg.svd(span.T, full_matrices=True).Vh[-1]
                cols.append(basis @ filler)
            solved = solve_complete(res.left, res.bias, torch.stack(cols, dim=1))
            if solved is None:
                continue
            coords = solved[0][len(state.pool) :]
            found = downstream.directions(basis, coords @ layer.right, tol)
            if not any(unit is not None for unit in found):
                # no single intersection: the examples' own cross-entropy columns, from
                # this start, settle them when it holds their patterns (fact 12)
                start = torch.stack(cols, dim=1)
                settled = settle(problem, res, basis, start, len(state.pool))
                if settled is not None:
                    found = list(settled[:, len(state.pool) :].T)
            added = 0
            for unit in found:
                if unit is None or not bool(torch.isfinite(unit).all()):
                    continue
                now = _coords(state, basis)
                if beyond_span((basis.T @ unit)[:, None], now, problem.tol.degeneracy_tol) is None:
                    continue
                if state.pool.add(unit / unit.norm()):
                    added += 1
            pooled += added
            if added:
                tried = 0  # progress: the next set starts from a smaller gap
        if not pooled:
            return StepReport()
        record = SolverStats(
            self.name, samples=tried, candidates=pooled, seconds=time.perf_counter() - t0
        )
        return StepReport(stats=record, progressed=True)


def _coords(state: SearchState, basis: torch.Tensor) -> torch.Tensor:
    """``(r, k)`` orthonormal basis of the pooled directions in ``basis`` coordinates."""
    if not state.pool:
        return torch.zeros(basis.shape[1], 0, dtype=basis.dtype, device=basis.device)
    return torch.linalg.qr(basis.T @ state.pool.stack(dim=1)).Q


def _independent(
    candidates: list[torch.Tensor], basis: torch.Tensor, known: torch.Tensor, limit: int
) -> list[torch.Tensor]:
    """Up to ``limit`` of ``candidates`` ``(m,)`` that add a dimension each beyond
    ``known`` ``(r, k)`` and one another, in order."""
    chosen: list[torch.Tensor] = []
    span = known
    for unit in candidates:
        if len(chosen) >= limit:
            break
        c = basis.T @ unit
        rest = c - span @ (span.T @ c)
        if float(rest.norm()) <= 1e-6 * float(c.norm()):
            continue
        chosen.append(unit)
        span = torch.cat([span, (rest / rest.norm())[:, None]], dim=1)
    return chosen
