"""Why examples were not recovered: how many units separate the batch, how many rows one
example alone turns on, and what the input side showed (docs/algorithm.md,
"Identifiability" and fact 13).

An example's gradient direction is fixed by the layer's update when its zero set (the
live units it turns off) holds ``b - 1`` independent rows, or when one unit is on for it
alone (a single-example row). Where the bias dominates ``W x`` (small inputs: conv
features entering ``fc1``), most units are on, or off, for the whole batch; only the
units that *separate* the batch (on for some examples, off for others) can be in a zero
set, and with few of them the zero sets are too small: the update then holds a
continuum of batches that pass every check of the layer (fact 12), and the model after
the layer has to single out the true one. The note says how far the attack got and
what the update shows.

What the update shows exactly: the live units (rows of ``dW`` that are not zero), the
units the recovered examples turn off (each separates the batch: some example is on
there), and the units on for recovered examples only. Which of the units every
recovered example turns on separate the batch depends on the missing examples, so the
count of separating units is a lower bound while examples are missing.
"""

from __future__ import annotations

import torch

from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.inversion.steps.cone import has_input_side
from spear.linalg import TINY_NORM, zero_mask
from spear.solvers.polish import live_rows
from spear.verify import exact_precision

__all__ = ["NEAR_FULL_RANK", "identifiability_note", "near_full_rank_note"]

#: A rank of at least this share of the live units is named in the note: an example of a
#: batch that large would have to turn off nearly every live unit, which real inputs do
#: not, so the update is rather not a sum of one low-rank term per example (local
#: training with Adam, RMSprop or Adagrad rescales each coordinate and leaves a delta of
#: full rank on its live units: 220 of 234 measured, b = 16, ``784 -> 256``), or the
#: batch is as large as the layer is wide.
NEAR_FULL_RANK = 0.9


def identifiability_note(problem: Problem, state: SearchState) -> str:
    """The note of a result that misses examples: what separates the batch, and why the
    rest could not be singled out (the numbers the update and the recovered examples
    give)."""
    b, m, k = problem.rank, problem.m, state.found
    tol = problem.tol.zero_tol
    left = problem.fac.left
    live = live_rows(left / left.norm(dim=0).clamp_min(TINY_NORM), tol)
    n_live = int(live.sum())
    res = state.residual.left
    res_norm = res.norm(dim=1)
    residual_live = res_norm > tol * float(left.norm(dim=1).max())
    missing = b - k
    text = (
        f"{missing} of the {b} examples could not be identified: of the {m} units, "
        f"{n_live} are on for some example"
    )
    if k:
        grads = torch.stack(state.residual.grads, dim=1)  # (m, k)
        on = ~zero_mask(grads, tol) & live[:, None]
        off = live[:, None] & ~on
        separating = int((off.any(dim=1)).sum())
        alone = int(((on.sum(dim=1) == 1) & ~residual_live).sum())
        sizes = off.sum(dim=0)
        text += (
            f"; at least {separating} separate the batch (on for some examples and off "
            f"for others) and {alone} are single-example rows (on for one example alone) "
            f"of the {k} recovered examples, whose zero sets hold {int(sizes.min())} to "
            f"{int(sizes.max())} live units"
        )
    else:
        text += (
            "; with no example recovered, how many of them separate the batch (on for "
            "some examples and off for others) is not known"
        )
    text += (
        f". An example is singled out by a single-example row, or by its zero set when "
        f"that holds {b - 1} independent live units ({missing - 1} once the others are "
        f"found); the {missing} missing examples, on at {int(residual_live.sum())} "
        "units, have no single-example row that passed its checks and no zero set that "
        "singled one out. Where the bias dominates W x (small inputs, such as pooled "
        "conv features) most units are on, or off, for the whole batch, zero sets are "
        "small, and the update holds many batches that pass every check of the layer."
    )
    text += _input_side(problem, state)
    pooled = len(state.residual.directions)
    if pooled:
        text += (
            f" The search had found the gradient directions of {pooled} of the {missing} "
            "missing examples when it stopped; examples are solved from directions only "
            "once every direction is found, so these are not returned."
        )
    # units with a row of the update that is not exactly zero (the basis above blurs a
    # dead unit's row at the roundoff of the smallest singular value)
    units = int((problem.request.weight_grad != 0).any(dim=1).sum())
    full = near_full_rank_note(b, units) if not k else None
    return text if full is None else f"{text} {full}"


def _input_side(problem: Problem, state: SearchState) -> str:
    """What the input side showed: the vertices of the input cone tried, and the zeros
    of the recovered examples' inputs (fact 13); empty when the step did not run."""
    tries = sum(record.samples for record in state.stats if record.name == "input-cone")
    layer = problem.layer
    if (
        not tries
        and has_input_side(problem)
        and not exact_precision(problem.eps)
        and problem.bias_grad is None
    ):
        return (
            " The input side (examples singled out by the zeros of nonnegative inputs, "
            f"such as pooled conv features) needs the layer's bias gradient on "
            f"{problem.in_dtype} updates (it fixes the examples' scales there), and this "
            "layer has none."
        )
    if not tries or layer is None:
        return ""
    text = (
        f" Inputs that are nonnegative (the output of a ReLU or a max-pool) also single an "
        f"example out when they are zero on {problem.rank - 1} independent coordinates: "
        f"{tries} vertices of the cone of nonnegative inputs were tried"
    )
    if state.residual.coords:
        inputs = torch.stack(state.residual.coords) @ layer.right  # (k, n)
        zeros = zero_mask(inputs.T, problem.tol.zero_tol).sum(dim=0)
        text += (
            f", and the recovered examples' inputs are zero on {int(zeros.min())} to "
            f"{int(zeros.max())} of the {inputs.shape[1]} coordinates"
        )
    return text + "."


def near_full_rank_note(rank: int, live: int) -> str | None:
    """What a ``rank`` of at least :data:`NEAR_FULL_RANK` of the ``live`` units (rows of the
    weight update that are not zero) says about the update; ``None`` below that."""
    if live < 1 or rank < NEAR_FULL_RANK * live:
        return None
    return (
        f"The update's rank ({rank}) is close to its number of live units ({live}), so it "
        "is probably not one low-rank term per example. A FedAvg delta of local training "
        "with Adam, RMSprop or Adagrad (which rescale each coordinate) looks like this, "
        "and so does a batch as large as the layer is wide; spear needs updates of "
        "plain SGD (with or without momentum) and batches smaller than the layer."
    )
