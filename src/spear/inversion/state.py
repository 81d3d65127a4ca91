"""What one run of the search has found and where it stands (mutable, one per run)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from spear.inversion.pool import DirectionPool, same_direction_tolerance
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual
from spear.results import SolverStats

__all__ = ["SearchState", "Taken"]

#: A vertex of the input cone taken below float64 (:mod:`spear.inversion.steps.cone`):
#: its unit row-space coordinates ``(b,)``, its peel, ``coord`` ``(b,)`` and ``grad``
#: ``(m,)``, and whether ``grad`` is its exact column (from its ReLU pattern; else its
#: own cross-entropy column at its rough scale).
Taken = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]


@dataclass
class SearchState:
    """The residual problem, the pool, the record of steps, and the round's basis.

    Attributes
    ----------
    residual:
        Residual factor and bias gradient, examples found, pooled directions.
    bar:
        Progress bar of examples recovered.
    stats:
        One record per step that did something, in order (the result's ``solvers``).
    notes:
        Plain-language findings so far.
    dirty:
        ``(m,)`` bool: rows changed since the last row scan (the next scan's rows).
    remaining:
        Examples not yet found, at the start of the round.
    basis:
        ``(m, remaining)`` orthonormal basis of the residual, this round.
    known:
        ``(k, remaining)`` pooled directions in :attr:`basis` coordinates, this round.
    sparse_stalled:
        The sparse solver found nothing in some round (sampling takes over where it can).
    failed_solves:
        Complete solves in a row that peeled nothing.
    loose_from:
        Number of examples found before the first solve peeled only its verified part
        (examples from there on are checked again as a whole at the end), or ``None``.
    found_by:
        For each example found, the name of the step that peeled it.
    step:
        Name of the step running (or last run).
    round_start:
        Examples found and directions pooled when the current round began.
    cone_taken:
        Below float64, the input side's vertices taken so far (:data:`Taken`), valid while
        ``cone_taken_at`` examples are found (:mod:`spear.inversion.steps.cone`).
    cone_rows:
        In float64, the units whose rows of the residual are still to start the input
        side's trimmed search (:func:`spear.input_cone.row_starts`), valid while
        ``cone_rows_at`` examples are found: a later run of the step goes on where the
        last one stopped.
    rebased_at:
        Examples found when the found examples were last solved again from the original
        update (:mod:`spear.inversion.rebase`), or -1.
    scanned_whole:
        The update's divisor the evidence had established when rows were last scanned
        (:attr:`spear.inversion.problem.Evidence.whole`): rows a lone example's divisor
        kept out are scanned again once it changes.
    """

    residual: Residual
    bar: tqdm  # type: ignore[type-arg]
    dirty: torch.Tensor
    stats: list[SolverStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    remaining: int = 0
    basis: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    known: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    sparse_stalled: bool = False
    failed_solves: int = 0
    loose_from: int | None = None
    found_by: list[str] = field(default_factory=list)
    step: str = ""
    tentatives: list[torch.Tensor] = field(default_factory=list)
    tentatives_at: int = 0
    round_start: tuple[int, int] = (0, 0)
    cone_taken: list[Taken] = field(default_factory=list)
    cone_taken_at: int = -1
    cone_rows: list[int] = field(default_factory=list)
    cone_rows_at: int = -1
    scanned_whole: float | None = None
    rebased_at: int = -1

    @classmethod
    def begin(cls, problem: Problem) -> SearchState:
        """Nothing found yet: the residual is the whole update."""
        fac = problem.fac
        residual = Residual(
            left=fac.left.clone(),
            bias=problem.bias_grad,
            coords=[],
            grads=[],
            directions=DirectionPool(same_tol=same_direction_tolerance(problem.tol.zero_tol)),
        )
        progress = problem.request.progress
        show = progress if progress is not None else sys.stderr.isatty()
        bar = tqdm(total=problem.rank, desc="examples recovered", disable=not show, leave=False)
        dirty = torch.ones(problem.m, dtype=torch.bool, device=problem.device)
        return cls(residual=residual, bar=bar, dirty=dirty, notes=list(problem.notes))

    @property
    def found(self) -> int:
        """Examples found (verified and peeled) so far."""
        return self.residual.found

    @property
    def pool(self) -> DirectionPool:
        """The pooled directions not yet peeled."""
        return self.residual.directions

    def credit(self, step: str) -> None:
        """Match :attr:`found_by` to the examples found: new ones are ``step``'s."""
        found = self.found
        del self.found_by[found:]
        self.found_by.extend([step] * (found - len(self.found_by)))

    def keep_verified(self) -> int:
        """Trim found coordinates and columns to matching pairs (a peel cut short may have
        added its coordinates only); returns how many are kept."""
        res = self.residual
        kept = min(len(res.coords), len(res.grads))
        res.coords, res.grads = res.coords[:kept], res.grads[:kept]
        del self.found_by[kept:]
        return kept

    def keep(self, indices: list[int]) -> int:
        """Keep only the examples at ``indices`` (in order); returns how many were dropped."""
        res = self.residual
        dropped = res.found - len(indices)
        res.coords = [res.coords[i] for i in indices]
        res.grads = [res.grads[i] for i in indices]
        self.found_by[:] = [self.found_by[i] for i in indices if i < len(self.found_by)]
        return dropped

    def withhold_from(self, count: int) -> int:
        """Keep only the first ``count`` examples found; returns how many were dropped."""
        res = self.residual
        dropped = res.found - count
        res.coords, res.grads = res.coords[:count], res.grads[:count]
        del self.found_by[count:]
        return dropped
