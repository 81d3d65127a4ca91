"""Subspace completion: row candidates projected on the subspace where the missing
examples lie give their exact directions (:func:`spear.candidates.subspace_candidates`)."""

from __future__ import annotations

import time

from spear.candidates import subspace_candidates
from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.results import SolverStats

__all__ = ["SubspaceCompletion", "directions_missing", "examples_known"]


def directions_missing(problem: Problem, state: SearchState) -> bool:
    """Some directions pooled but not all of the round's, and time left."""
    return bool(state.pool) and len(state.pool) < state.remaining and problem.time_left()


def examples_known(problem: Problem, state: SearchState) -> bool:
    """Some examples pooled or peeled, not all of them, and time left.

    Peeled examples are known as well as pooled ones: the residual they leave is the
    subspace where the missing examples lie, with nothing of theirs left in it.
    """
    known = bool(state.pool) or state.found > 0
    return known and len(state.pool) < state.remaining and problem.time_left()


class SubspaceCompletion:
    """Pool missing directions from projected row candidates; a record when any."""

    name = "subspace"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """One scan of the rows on the unknown subspace."""
        if problem.layer is None or not directions_missing(problem, state):
            return StepReport()
        t0 = time.perf_counter()
        pooled = subspace_candidates(problem, state.residual)
        if not pooled:
            return StepReport()
        record = SolverStats(self.name, candidates=pooled, seconds=time.perf_counter() - t0)
        return StepReport(stats=record, progressed=True)
