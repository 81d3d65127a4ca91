"""The result record assembled from a finished search: inputs, columns, checks, notes."""

from __future__ import annotations

import time

import torch

from spear.inversion.identifiability import identifiability_note
from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.linalg import TINY_NORM, zero_mask
from spear.results import LayerReconstruction
from spear.solvers.polish import live_rows
from spear.verify import exact_precision, pattern_check

__all__ = ["PARTIAL_RECOVERY", "finish"]

#: How the note on a partial result begins (callers that replace the result drop it).
PARTIAL_RECOVERY = "partial recovery:"
#: The note on a result solved with ``dropout=True``.
DROPOUT_UNVERIFIED = (
    "solved for an active Dropout after the layer's ReLU: each example's gradient column was "
    "checked only on the units its ReLU pattern turns off (a unit it turns on may have been "
    "dropped), so the layer alone verifies nothing; spear.attack checks the whole update "
    "with the dropout masks read off the columns."
)


def finish(problem: Problem, state: SearchState) -> LayerReconstruction:
    """Assemble the result record from what the search verified."""
    fac, tol, rank = problem.fac, problem.tol, problem.rank
    dev, m, n = problem.device, problem.m, fac.right.shape[1]
    res = state.residual
    k = res.found
    if k:
        coords = torch.stack(res.coords)
        grads = torch.stack(res.grads, dim=1)
        inputs = coords @ fac.right
    else:
        inputs = torch.zeros(0, n, dtype=torch.float64, device=dev)
        grads = torch.zeros(m, 0, dtype=torch.float64, device=dev)
        coords = torch.zeros(0, rank, dtype=torch.float64, device=dev)
    full = fac.left @ fac.right
    denom = float(full.norm()) or 1.0
    residual = float((full - grads @ inputs).norm()) / denom
    zeros = zero_mask(grads, tol.zero_tol) if k else torch.zeros(m, 0, dtype=torch.bool)
    sparsity = zeros.to(torch.float64).mean(dim=0) if k else torch.zeros(0)
    consistency: torch.Tensor | None = None
    verified = problem.layer is not None and k > 0
    if verified:
        consistency, strict = _pattern_checks(problem, coords, zeros)
        if strict is not None and sum(strict) < k:
            verified = False
            state.notes.append(_loose_note(k - sum(strict), k, problem.in_dtype))
    _closing_notes(problem, state, residual)
    verified = verified and k == rank  # a partial result is never verified
    if problem.request.dropout and k:
        # the check saw only the units each example turns off: a unit it turns on may
        # have been dropped
        verified = False
        state.notes.append(DROPOUT_UNVERIFIED)
    return LayerReconstruction(
        inputs=inputs,
        batch_size=rank,
        complete=k == rank,
        verified=verified,
        output_grads=grads,
        singular_values=fac.singular_values,
        rank_gap=fac.gap,
        sparsity=sparsity,
        consistency=consistency,
        residual=residual,
        precision=problem.eps,
        solvers=state.stats,
        seconds=time.perf_counter() - problem.start,
        notes=state.notes,
        found_by=state.found_by[:k],
        dropout=problem.request.dropout,
    )


def _pattern_checks(
    problem: Problem, coords: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, list[bool] | None]:
    """Pattern agreement ``(k,)`` of each example, and for float32 deltas whether each
    passes the single-step pattern check (``None`` otherwise).

    ``coords`` ``(k, b)`` are the examples' coordinates, ``zeros`` ``(m, k)`` the zero
    sets of their columns. The delta tolerances let ReLU masks move between local steps;
    under float32's coarser zero test a mixture of similar examples is pooled as a
    direction and can pass them too (measured: one-step float32 deltas, 784 -> 512,
    b = 32, four of twelve batches held 1 to 21 such examples, 0.4 to 0.7 off): verified
    only where every pattern holds as for a single step.
    """
    layer, eps, delta = problem.layer, problem.eps, problem.delta
    assert layer is not None
    left = problem.fac.left
    live_all = live_rows(left / left.norm(dim=0).clamp_min(TINY_NORM), problem.tol.zero_tol)
    k = coords.shape[0]
    consistency = torch.tensor(
        [pattern_check(layer, coords[i], zeros[:, i], live_all, eps, delta)[1] for i in range(k)],
        dtype=torch.float64,
    )
    if not (delta and not exact_precision(eps)):
        return consistency, None
    strict = [
        pattern_check(layer, coords[i], zeros[:, i], live_all, eps, False)[0] for i in range(k)
    ]
    return consistency, strict


def _loose_note(loose: int, k: int, in_dtype: torch.dtype) -> str:
    """Why examples matching only the multi-step tolerance are returned unverified."""
    return (
        f"{loose} of the {k} examples match their ReLU patterns only within the "
        "tolerance for masks that move between local steps (multi-step FedAvg); "
        f"in {in_dtype} a mixture of similar examples can match that as well, so the "
        "examples are returned unverified."
    )


def _closing_notes(problem: Problem, state: SearchState, residual: float) -> None:
    """Notes on partial recovery, missing weights or bias, and the update's dtype."""
    k, rank, notes = state.found, problem.rank, state.notes
    complete = k == rank
    if not complete:
        notes.append(
            f"{PARTIAL_RECOVERY} {k} of {rank} examples recovered; {rank - k} "
            "remain (raise time_budget, or try another solver)."
        )
        if problem.layer is not None and not problem.noisy:
            notes.append(identifiability_note(problem, state))
    if problem.layer is None and k:
        notes.append(
            "the layer's weight and bias were not given: examples are backed by the sparsity "
            "of their gradient columns only, not checked against their own ReLU patterns "
            "(.verified is False); on real images sparsity alone can accept mixtures."
        )
    if state.residual.bias is None and k:
        notes.append(
            "no bias gradient: each example is recovered only up to a scale factor (and, "
            "without the layer's weights, a sign); the rows of .inputs are those directions."
        )
    if problem.in_dtype != torch.float64 and complete:
        notes.append(
            f"the update arrived as {problem.in_dtype}: exact means to that precision "
            f"(relative residual of the factorisation {residual:.1e}, machine epsilon "
            f"{problem.eps:.1e})."
        )
