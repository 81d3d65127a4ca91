"""Round set-up: stop when done, prune the pool, fix the residual's basis for the round."""

from __future__ import annotations

import torch

from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.linalg import orthonormal_basis, unit_rows

__all__ = ["PrunePool", "RoundSetup"]


class RoundSetup:
    """Stop when every example is found or time is up; otherwise drop dependent pooled
    directions and set ``state.basis`` ``(m, r)`` and ``state.known`` ``(k, r)``."""

    name = "setup"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Set the round's residual rank, basis and known directions."""
        remaining = problem.rank - state.found
        if remaining == 0 or not problem.time_left():
            return StepReport(end_search=True)
        state.pool.drop_dependent(state.residual.left, remaining, problem.tol.zero_tol)
        if state.tentatives_at != state.found:
            state.tentatives.clear()  # they belong to a residual with more examples
            state.tentatives_at = state.found
        state.remaining = remaining
        state.basis = orthonormal_basis(state.residual.left, remaining)
        state.known = (
            unit_rows(state.pool.stack() @ state.basis)
            if state.pool
            else torch.zeros(0, remaining, dtype=torch.float64, device=problem.device)
        )
        return StepReport()


class PrunePool:
    """Drop pooled directions that are combinations of other pooled ones
    (:meth:`spear.inversion.pool.DirectionPool.drop_dependent`)."""

    name = "prune"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Prune the pool against the residual."""
        remaining = problem.rank - state.found
        state.pool.drop_dependent(state.residual.left, remaining, problem.tol.zero_tol)
        return StepReport()
