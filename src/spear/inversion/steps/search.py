"""Direction search (facts 3-4, 9-10): a registered solver finds the sparse directions of
the residual (:mod:`spear.solvers`), optionally steered by the weights."""

from __future__ import annotations

import time

from spear.candidates import guided_weights
from spear.errors import NoReluSparsityError
from spear.inversion.pool import same_direction
from spear.inversion.problem import UNLIMITED_SAMPLES, Problem
from spear.inversion.state import SearchState
from spear.inversion.steps.base import StepReport
from spear.linalg import unit_rows
from spear.results import SolverStats
from spear.solvers import get_solver
from spear.solvers.base import Budget, Directions, SearchSpec
from spear.solvers.sampling import expected_samples

__all__ = ["DirectionSearch"]

#: Largest rank the plain sampling solver is asked to handle alone under ``solver="auto"``.
AUTO_SAMPLING_MAX_RANK = 20
#: Largest rank sampling still takes on when the sparse solver stalls (about H_r 2^(r-1)
#: samples: some 10^8 at 28, minutes on a laptop CPU).
SAMPLING_AFFORDABLE_RANK = 28
#: When no direction at all is found after this many times the samples expected for the
#: first one, the gradient is declared free of ReLU zeros.
NO_SPARSITY_FACTOR = 30.0
#: The first, capped sampling search draws at least this many samples (four of the
#: sampling solver's default chunks), however small the rank.
MIN_EVIDENCE_SAMPLES = 4 * 8192
#: Where the weights guide the search, one round's solver call gets at most this share of
#: the time left, so that the steps after it (subspace completion, the last direction,
#: the complete solve) run in every round. Sparsity alone cannot single out an example
#: whose zero set leaves a kernel of several dimensions (small inputs dominated by the
#: bias: conv features entering fc1); measured on Flower's CNN at b = 8, sampling spent
#: a 30 s budget on the one direction the last-direction step then found at once. A
#: solver that finds what it is asked for returns long before its share is spent.
GUIDED_SEARCH_SHARE = 0.25


class DirectionSearch:
    """Ask a solver for the directions the pool lacks; pool what it finds.

    Under ``solver="auto"``: sampling for small residuals, the sparse solver beyond; when
    the sparse solver has stalled on a residual sampling can still afford, sampling.
    """

    name = "search"

    def run(self, problem: Problem, state: SearchState) -> StepReport:
        """One solver call on the round's basis; raises :class:`NoReluSparsityError` when a
        first search finds nothing where ReLU zeros would be found many times over."""
        remaining = state.remaining
        if len(state.pool) >= remaining:
            return StepReport()
        if state.pool and len(state.pool) != state.known.shape[0]:
            # a step before this one pooled a direction (the last one, say)
            state.known = unit_rows(state.pool.stack() @ state.basis)
        name = self._solver_name(problem, state)
        spec = self._spec(problem, state)
        t0 = time.perf_counter()
        search_budget = self._budget(problem, state, name)
        dirs: Directions = get_solver(name)(spec, search_budget)
        record = SolverStats(
            name,
            samples=dirs.samples,
            candidates=int(dirs.vectors.shape[0]),
            seconds=time.perf_counter() - t0,
        )
        budget = problem.budget
        if budget.max_samples < UNLIMITED_SAMPLES:
            budget.max_samples = max(0, budget.max_samples - dirs.samples)
        usable = dirs.vectors
        if (problem.layer is None or problem.downstream is not None) and dirs.weak:
            # weak directions need the layer's ReLU patterns to be confirmed; where the
            # model after the layer is known they are tentatives, settled by its
            # Jacobians (pooled, the mixtures among them spoil the unknown subspace of
            # the completion steps: measured 10 of 11 on Flower's CNN at b = 16)
            strong = dirs.vectors.shape[0] - dirs.weak
            if problem.downstream is not None:
                for v in unit_rows(dirs.vectors[strong:]):
                    unit = state.basis @ v
                    if not any(same_direction(unit, t) for t in state.tentatives):
                        state.tentatives.append(unit)
            usable = dirs.vectors[:strong]
        added = sum(state.pool.add(state.basis @ v) for v in unit_rows(usable))
        if name == "sparse" and not added:
            state.sparse_stalled = True
        if not added and self._no_sparsity(problem, state, name, dirs, search_budget):
            state.bar.close()
            raise NoReluSparsityError(_no_sparsity_message(dirs.samples, remaining))
        # a solver cut short by its share of the time has not given up either
        cut = search_budget.deadline < problem.deadline and search_budget.expired()
        return StepReport(stats=record, progressed=bool(added), searching=dirs.early or cut)

    @staticmethod
    def _solver_name(problem: Problem, state: SearchState) -> str:
        """The solver asked this round."""
        solver = problem.request.solver
        if solver != "auto":
            return solver
        small = state.remaining <= AUTO_SAMPLING_MAX_RANK
        affordable = state.remaining <= SAMPLING_AFFORDABLE_RANK and state.sparse_stalled
        return "sampling" if small or affordable else "sparse"

    @staticmethod
    def _spec(problem: Problem, state: SearchState) -> SearchSpec:
        """What the solver is asked: the round's basis, the directions still missing."""
        tol, layer = problem.tol, problem.layer
        weights = (
            guided_weights(state.residual, layer, tol)
            if layer is not None and problem.guided
            else None
        )
        bar = state.bar
        return SearchSpec(
            basis=state.basis,
            target=state.remaining - state.known.shape[0],
            zero_tol=tol.zero_tol,
            degeneracy_tol=tol.degeneracy_tol,
            separation=tol.separation,
            min_zero_fraction=problem.min_zero_fraction,
            row_weights=weights,
            known=state.known,
            generator=problem.generator,
            on_progress=lambda k: bar.set_postfix_str(f"directions {k}"),
            tentative=problem.downstream is not None,
        )

    @staticmethod
    def _first(problem: Problem, state: SearchState, name: str) -> bool:
        """A first sampling search on an exact update: nothing found or pooled yet."""
        return name == "sampling" and state.found == 0 and not state.pool and not problem.noisy

    def _budget(self, problem: Problem, state: SearchState, name: str) -> Budget:
        """The shared budget, or for a first search a capped one: enough samples to find
        a direction many times over when ReLU zeros exist (none found means none exist)."""
        budget = problem.budget
        deadline = budget.deadline
        if problem.layer is not None and problem.guided:
            share = GUIDED_SEARCH_SHARE * budget.seconds_left()
            deadline = min(deadline, time.perf_counter() + share)
        if not self._first(problem, state, name):
            return Budget(deadline=deadline, max_samples=budget.max_samples)
        evidence = int(NO_SPARSITY_FACTOR * expected_samples(state.remaining) / state.remaining)
        cap = min(budget.max_samples, max(evidence, MIN_EVIDENCE_SAMPLES))
        return Budget(deadline=deadline, max_samples=cap)

    def _no_sparsity(
        self,
        problem: Problem,
        state: SearchState,
        name: str,
        dirs: Directions,
        search_budget: Budget,
    ) -> bool:
        """A first search spent its capped budget and found nothing."""
        return self._first(problem, state, name) and dirs.samples >= search_budget.max_samples


def _no_sparsity_message(samples: int, remaining: int) -> str:
    """Why the attack cannot proceed when no sparse direction exists."""
    return (
        f"no sparse direction in {samples} samples (about "
        f"{expected_samples(remaining) / remaining:.0f} find the first one when a "
        "ReLU zeroes about half of each example's units): the gradient has no "
        "exact zeros where a ReLU after the layer would put them. The attack "
        "needs a ReLU (smooth activations such as GELU, tanh or sigmoid leave "
        "none) and a noise-free update; for noisy (DP) updates pass batch_size= "
        "and a larger zero_tol."
    )
