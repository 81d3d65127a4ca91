"""Complete solve and peel: with every direction of the residual pooled, solve for all
examples at once, verify each, and peel the verified ones (facts 5-7).

Exact float64 one-step gradients are all or nothing (``problem.strict``): a wrong
direction in the solve damages the coordinates of the examples mixed into it, and a
damage smaller than their units' margins still passes verification (measured on 32x32
RGB, b = 25: two such examples 6e-3 and 6e-4 off were returned, and the residual they
left held no sparse direction any more). So when some fail, nothing is peeled; the
directions of the failed examples leave the pool and the verified ones stay, for the
search to find the missing ones. float32 and FedAvg deltas peel the verified part (their
true examples can fail on blurred or moved patterns; measured: strict float32 solves
stall at b = 64) and are checked as a whole at the end
(:func:`spear.inversion.solve.joint_check`).
"""

from __future__ import annotations

import time

import torch

from spear.inversion.checks import verified_indices, whole_batch_solve
from spear.inversion.problem import Problem
from spear.inversion.solve import refine_columns, repair_one_direction, solve_complete
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.linalg import least_squares, orthonormal_basis, unit_rows
from spear.results import SolverStats
from spear.solvers.polish import live_rows

__all__ = ["MAX_FAILED_SOLVES", "CompleteSolve", "peel_verified"]

#: Complete solves in a row that peel nothing before the search gives up on the rest.
MAX_FAILED_SOLVES = 3

#: A solve: ``(coords (r, b), grads (m, r))``.
Solve = tuple[torch.Tensor, torch.Tensor]


class CompleteSolve:
    """Solve with the round's pooled directions and peel what verifies; after
    :data:`MAX_FAILED_SOLVES` failures in a row, give up (a note says why)."""

    name = "solve"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Peel a complete solve when the pool holds every direction of the round."""
        remaining, basis = state.remaining, state.basis
        if len(state.pool) < remaining:
            return StepReport()
        t0 = time.perf_counter()
        dirs_now = torch.stack(state.pool[:remaining]) @ basis  # (r, r)
        peeled = peel_verified(problem, state, basis @ unit_rows(dirs_now).T)
        if peeled:
            state.failed_solves = 0
            state.dirty = torch.ones(problem.m, dtype=torch.bool, device=problem.device)
            record = SolverStats(self.name, found=peeled, seconds=time.perf_counter() - t0)
            return StepReport(stats=record, progressed=True)
        # a wrong pooled direction: drop it (strict: the failed examples' ones; otherwise
        # the newest) and search again, a few times in a row
        state.failed_solves += 1
        state.pool.keep_first(remaining - 1)
        if state.failed_solves < MAX_FAILED_SOLVES:
            return StepReport()
        state.notes.append(
            "the directions found did not yield verifiable examples for the "
            f"last {remaining}; the sparsity pattern is ambiguous there."
        )
        return StepReport(end_search=True)


def peel_verified(problem: Problem, state: SearchState, cols: torch.Tensor) -> int:
    """Solve with all remaining directions ``cols`` ``(m, r)``; peel the examples that
    verify. Returns how many were peeled.

    A solve with one wrong direction is repaired from the others first. When some still
    fail, every direction is refined against the original factorisation
    (:func:`_solve_from_original`). What verifies is then peeled, unless the problem is
    strict (module docstring): then the failed examples' directions leave the pool.
    """
    res, tol, layer = state.residual, problem.tol, problem.layer
    r = cols.shape[1]
    solved = solve_complete(res.left, res.bias, cols)
    live = live_rows(orthonormal_basis(res.left, r), tol.zero_tol)
    accepted = verified_indices(problem, *solved, live) if solved is not None else []
    if solved is not None and layer is not None and res.bias is not None:
        repaired = repair_one_direction(
            res.left,
            res.bias,
            cols,
            sorted(set(range(r)) - set(accepted)),
            layer,
            tol,
            lambda c, g: len(verified_indices(problem, c, g, live)) == r,
            problem.deadline,
        )
        if repaired is not None:
            solved, accepted = repaired, list(range(r))
    if layer is not None and len(accepted) < r:
        outcome = _solve_from_original(problem, state, cols, solved, accepted, live)
        if isinstance(outcome, int):
            return outcome
        solved, accepted = outcome
    if solved is None:
        return 0
    if problem.strict and len(accepted) < r:
        for i in sorted(set(range(r)) - set(accepted)):
            state.pool.remove(cols[:, i] / cols[:, i].norm())
        return 0
    coords, grads = solved
    if len(accepted) < r and state.loose_from is None:
        state.loose_from = state.found
    if problem.downstream is not None:
        # the model after the layer finds directions again; a failed example's direction
        # left in the pool (a mixture, say) would spoil every later solve of the rest
        for i in sorted(set(range(r)) - set(accepted)):
            state.pool.remove(cols[:, i] / cols[:, i].norm())
    for i in accepted:
        state.pool.remove(grads[:, i] / grads[:, i].norm())
        res.peel(coords[i], grads[:, i])
    state.bar.update(len(accepted))
    return len(accepted)


def _solve_from_original(
    problem: Problem,
    state: SearchState,
    cols: torch.Tensor,
    solved: Solve | None,
    accepted: list[int],
    live: torch.Tensor,
) -> int | tuple[Solve | None, list[int]]:
    """Refine every direction against the original factorisation and solve again.

    Every direction (of the examples found so far and of ``cols`` ``(m, r)``) is refined
    (:func:`spear.inversion.solve.refine_columns`), which removes the roundoff that peels
    leave in the residual. With the bias gradient the whole batch is solved from the
    original factorisation; when every example verifies, that solve replaces everything
    found, and the number of new examples is returned. Otherwise (a wrong direction
    among these damages the examples mixed into it, fact 5, and may spoil the others'
    coordinates slightly) the residual is solved again with the refined directions, and
    the solve that verifies more examples is returned with its verified indices.
    """
    assert problem.layer is not None
    res, fac, db = state.residual, problem.fac, problem.bias_grad
    full_basis, _ = problem.original
    old = state.found
    coords_new = least_squares(cols, res.left) if solved is None else solved[0]
    cols_all, coords_all = cols, coords_new  # (m, old + r), (old + r, b)
    if old:
        found_grads = torch.stack(res.grads, dim=1)
        cols_all = torch.cat([found_grads / found_grads.norm(dim=0), cols], dim=1)
        coords_all = torch.cat([torch.stack(res.coords), coords_new])
    refined = refine_columns(problem.layer, full_basis, coords_all, cols_all, problem.tol)
    joint = whole_batch_solve(problem, refined)
    if joint is not None and db is not None:
        coords, grads = joint
        res.left, res.bias = fac.left.clone(), db.clone()
        res.coords, res.grads = [], []
        for i in range(problem.rank):
            if i >= old:
                state.pool.remove(grads[:, i] / grads[:, i].norm())
            res.peel(coords[i], grads[:, i])
        state.bar.update(problem.rank - old)
        return problem.rank - old
    again = solve_complete(res.left, res.bias, refined[:, old:])
    if again is not None:
        accepted_again = verified_indices(problem, *again, live)
        if len(accepted_again) > len(accepted):
            return again, accepted_again
    return solved, accepted
