"""Exhaustive small-case solve: on small layers every row subset gives the candidate
directions, and a verified combination of them is the whole batch
(:mod:`spear.exhaustive`). All or nothing; it runs once, before the rounds."""

from __future__ import annotations

import time

import torch

from spear.exhaustive import (
    EXHAUSTIVE_MAX_SUBSETS,
    candidate_directions,
    exhaustive_subsets,
    verified_combination,
)
from spear.inversion.checks import not_refuted, verified_indices
from spear.inversion.problem import Problem
from spear.inversion.solve import complete_last, solve_complete
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.results import SolverStats

__all__ = ["ExhaustiveSolve"]


class ExhaustiveSolve:
    """Every row subset, then verified combinations; needs the weights and the bias
    gradient, an exact update, and few enough subsets."""

    name = "exhaustive"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Solve the whole batch at once when small enough; a record when it ran."""
        full_basis, full_live = problem.original
        db, layer, rank, tol = problem.bias_grad, problem.layer, problem.rank, problem.tol
        if db is None or layer is None or problem.noisy:
            return StepReport()
        if exhaustive_subsets(int(full_live.sum()), rank) > EXHAUSTIVE_MAX_SUBSETS:
            return StepReport()
        t0 = time.perf_counter()
        directions, _ = candidate_directions(
            full_basis,
            full_live,
            tol.zero_tol,
            tol.degeneracy_tol,
            None if problem.delta or problem.request.dropout else not_refuted(problem, full_live),
            problem.deadline,
        )

        def solve_and_verify(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            solved = solve_complete(problem.fac.left, db, cols)
            if solved is None or len(verified_indices(problem, *solved, full_live)) < rank:
                return None
            return solved

        def complete(others: torch.Tensor) -> torch.Tensor | None:
            assert db is not None and layer is not None
            return complete_last(problem.fac.left, db, full_basis, others, layer, tol)

        solved = verified_combination(
            full_basis,
            problem.fac.left,
            db,
            layer,
            full_live,
            directions,
            tol.zero_tol,
            complete,
            solve_and_verify,
            problem.deadline,
        )
        record = SolverStats(
            self.name,
            candidates=int(directions.shape[0]),
            found=rank if solved is not None else 0,
            seconds=time.perf_counter() - t0,
        )
        if solved is None:
            return StepReport(stats=record)
        coords, grads = solved
        state.pool.clear()
        for i in range(rank):
            state.residual.peel(coords[i], grads[:, i])
        state.bar.update(rank)
        return StepReport(stats=record, progressed=True)
