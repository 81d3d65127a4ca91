"""Focused sampling: row subsets steered by the missing examples' predicted ReLU patterns
(:func:`spear.focused.focused_sampling`), for residuals too large to sample blindly."""

from __future__ import annotations

import time

from spear.focused import focused_sampling
from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.inversion.steps.search import AUTO_SAMPLING_MAX_RANK
from spear.inversion.steps.subspace import examples_known
from spear.results import SolverStats

__all__ = ["FocusedSampling"]


class FocusedSampling:
    """Steered row subsets on residuals above :data:`AUTO_SAMPLING_MAX_RANK` (exact
    updates only); always leaves a record when it runs."""

    name = "focused"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Draw steered subsets until the pool is (nearly) complete or patience ends."""
        if (
            problem.layer is None
            or problem.noisy
            or state.remaining <= AUTO_SAMPLING_MAX_RANK
            or not examples_known(problem, state)
        ):
            return StepReport()
        t0 = time.perf_counter()
        pooled, draws = focused_sampling(problem, state.residual)
        record = SolverStats(
            self.name, samples=draws, candidates=pooled, seconds=time.perf_counter() - t0
        )
        return StepReport(stats=record, progressed=bool(pooled))
