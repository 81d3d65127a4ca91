"""Row peeling (fact 8): rows of the residual as example candidates, agreeing pairs peeled."""

from __future__ import annotations

import time

import torch

from spear.candidates import row_candidates
from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.linalg import zero_mask
from spear.results import SolverStats

__all__ = ["RowPeeling"]


class RowPeeling:
    """Scan rows, pool their exact directions, peel examples two rows agree on; again on
    the rows the new examples changed, until a scan peels nothing, and on every row once
    the examples establish the update's divisor (a single row is peeled alone only at
    that divisor, so before it rows whose divisor exceeds the rank wait). Needs the
    weights and the bias gradient."""

    name = "peeling"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """One pass of scans; a record when something was pooled or peeled."""
        if problem.layer is None or state.residual.bias is None:
            return StepReport()
        t0 = time.perf_counter()
        before, pooled = state.found, len(state.pool)
        if problem.evidence.whole != state.scanned_whole:
            state.dirty = torch.ones(problem.m, dtype=torch.bool, device=problem.device)
        while True:
            added = row_candidates(problem, state.residual, state.dirty)
            state.bar.update(added)
            if added == 0:
                break
            new = torch.stack(state.residual.grads[-added:], dim=1)
            state.dirty = ~zero_mask(new, problem.tol.zero_tol).all(dim=1)
        state.dirty = torch.zeros(problem.m, dtype=torch.bool, device=problem.device)
        state.scanned_whole = problem.evidence.whole
        peeled = state.found - before
        gained = peeled + len(state.pool) - pooled
        if gained <= 0:
            return StepReport()
        record = SolverStats(
            self.name,
            candidates=len(state.pool) - pooled + peeled,
            found=peeled,
            seconds=time.perf_counter() - t0,
        )
        return StepReport(stats=record, progressed=True)
