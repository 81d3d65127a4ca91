"""Last-direction completion: with one direction missing, its example is exact in a solve
with any filler column, and its own ReLU pattern gives the direction (fact 5)."""

from __future__ import annotations

from spear.inversion.problem import Problem
from spear.inversion.solve import complete_last
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport

__all__ = ["LastDirection"]


class LastDirection:
    """Pool the one missing direction (sparsity alone may not single it out)."""

    name = "last"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """Complete the pool when exactly one direction of the round is missing."""
        layer, bias = problem.layer, state.residual.bias
        remaining = state.remaining
        if (
            layer is None
            or bias is None
            or problem.noisy
            or remaining < 2
            or len(state.pool) != remaining - 1
        ):
            return StepReport()
        others = state.pool.stack(dim=1)  # (m, r - 1)
        last = complete_last(
            state.residual.left,
            bias,
            state.basis,
            others,
            layer,
            problem.tol,
            problem.downstream,
            problem.original[0],
        )
        added = last is not None and state.pool.add(last / last.norm())
        return StepReport(progressed=added)
