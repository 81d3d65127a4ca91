"""Found examples solved again from the original update when peels have compounded."""

from __future__ import annotations

import time

import torch

from spear.inversion.problem import Problem
from spear.inversion.rebase import needs_rebase, rebase
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.results import SolverStats

__all__ = ["Rebase"]


class Rebase:
    """Replace the found examples and the residual by :func:`spear.inversion.rebase.rebase`
    where the residual's noise has grown (:func:`~spear.inversion.rebase.needs_rebase`),
    once per count of examples found; every row is scanned again afterwards."""

    name = "rebase"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Rebase when it is due; a record when the residual was replaced."""
        if state.rebased_at == state.found or not needs_rebase(problem, state.residual):
            return StepReport()
        state.rebased_at = state.found
        t0 = time.perf_counter()
        rebased = rebase(problem, state.residual)
        if rebased is None:
            return StepReport()
        state.residual = rebased
        state.dirty = torch.ones(problem.m, dtype=torch.bool, device=problem.device)
        return StepReport(stats=SolverStats(self.name, seconds=time.perf_counter() - t0))
