"""The interface every disaggregation solver implements.

A solver looks for the sparsest directions in a subspace: given an orthonormal basis
``B`` (m x r) of the column space of the (residual) weight gradient, it returns unit
vectors ``q`` (r,) such that ``B @ q`` is (exactly, up to the tolerance) zero on at least a
fraction ``min_zero_fraction`` of its ``m`` entries. Those are the columns of ``G`` (the
gradient at the layer's pre-activations), one per example, up to scale (docs/algorithm.md,
facts 2-4 and 9). The layer driver (:mod:`spear.inversion`) deduplicates, selects, scales and
verifies them; a solver never sees the truth and never needs the layer's weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Budget", "DirectionSolver", "Directions", "SearchSpec"]


@dataclass
class Budget:
    """When to stop searching.

    Attributes
    ----------
    deadline:
        ``time.perf_counter()`` value after which a solver must return what it has.
    max_samples:
        Upper bound on samples (row subsets, starting points) a solver may draw.
    """

    deadline: float
    max_samples: int

    def expired(self) -> bool:
        """True when the time is up."""
        return time.perf_counter() >= self.deadline

    def seconds_left(self) -> float:
        """Seconds until the deadline (never negative)."""
        return max(0.0, self.deadline - time.perf_counter())


@dataclass
class SearchSpec:
    """What a solver is asked to find.

    Attributes
    ----------
    basis:
        ``(m, r)`` float64 with orthonormal columns spanning the sought columns.
    target:
        How many distinct directions are sought (``r`` unless some are already known).
    zero_tol:
        An entry ``v_j`` of a unit vector ``v = basis @ q`` counts as zero when
        ``|v_j| <= zero_tol * max_j |v_j|``.
    degeneracy_tol:
        A singular value ``s`` of a row subset of ``basis`` counts as zero when
        ``s <= degeneracy_tol`` (the basis is orthonormal, so this is relative).
    min_zero_fraction:
        ``tau``: a direction is kept only when at least this fraction of ``basis @ q`` is
        zero.
    row_weights:
        ``(m,)`` non-negative sampling weights for rows (rows likely to be zero for many
        examples get more), or ``None`` for uniform.
    known:
        ``(k, r)`` unit directions already found; solvers should not spend effort on
        them (they may still return them; the driver deduplicates).
    generator:
        The random generator to draw from (determinism given a seed).
    on_progress:
        Called with the number of distinct directions found so far, or ``None``.
    separation:
        A zero set's kernel counts as one-dimensional only when its second-smallest
        singular value is at least this fraction of the one expected of random rows
        (:func:`spear.linalg.pure_kernel`; ``Tolerances.separation``, 0 for float64).
    tentative:
        Also return, as weak directions, every direction known only up to ``known`` ones
        (a zero set whose kernel reaches one dimension beyond them) and every weak one,
        not only as many as the target lacks: the caller settles them with the model
        after the layer (:class:`spear.inversion.steps.TentativeCompletion`).
    """

    basis: torch.Tensor
    target: int
    zero_tol: float
    degeneracy_tol: float
    min_zero_fraction: float
    row_weights: torch.Tensor | None
    known: torch.Tensor
    generator: torch.Generator
    on_progress: Callable[[int], None] | None = None
    separation: float = 0.0
    tentative: bool = False


@dataclass
class Directions:
    """Candidate directions a solver found.

    Attributes
    ----------
    vectors:
        ``(k, r)`` float64 unit vectors in basis coordinates, distinct up to sign.
    zero_fraction:
        ``(k,)`` fraction of zero entries of ``basis @ vectors[i]``.
    samples:
        How many samples the solver drew.
    weak:
        How many of the last rows of ``vectors`` are weak: sparse with a one-dimensional
        kernel, but with an essential row, so only the layer's ReLU patterns can confirm
        them (see :func:`spear.solvers.polish.purify`). They are offered only when the
        strong ones fall short of the target.
    early:
        The solver returned before its budget was spent and without its target, to let
        the caller settle weak directions (``spec.tentative``); it has not given up.
    """

    vectors: torch.Tensor
    zero_fraction: torch.Tensor
    samples: int
    weak: int = 0
    early: bool = False


class DirectionSolver(Protocol):
    """A way to find sparse directions; see the module docstring."""

    name: str

    def __call__(self, spec: SearchSpec, budget: Budget) -> Directions:
        """Search until ``spec.target`` directions are found or the budget runs out."""
        ...
