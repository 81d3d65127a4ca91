"""The interface of a step: ``run(problem, state) -> StepReport``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.results import SolverStats

__all__ = ["Step", "StepReport"]


@dataclass
class StepReport:
    """What one run of a step did.

    Attributes
    ----------
    stats:
        Its record for the result (directions pooled as ``candidates``, examples peeled
        as ``found``, ``samples``, ``seconds``), or ``None`` when it leaves none.
    progressed:
        It pooled a direction or peeled an example.
    end_search:
        The search stops here (done, out of time, or given up).
    searching:
        It made no progress but has not given up either (a solver that returned early
        with candidates for a later step): the round does not count as stalled.
    """

    stats: SolverStats | None = None
    progressed: bool = False
    end_search: bool = False
    searching: bool = False


class Step(Protocol):
    """One step of the attack; it reads the problem and advances the state."""

    name: str

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Do the step once; say what it did."""
        ...
