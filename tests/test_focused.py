"""Focused sampling: row subsets steered by the missing examples' predicted patterns."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import layer_case, problem_for, problem_from

from spear import metrics
from spear.focused import HANDOFF_MISSING, break_known, focused_sampling
from spear.inversion.driver import invert
from spear.inversion.pool import DirectionPool
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual
from spear.update import UpdateKind


def _residual_knowing(problem: Problem, known: torch.Tensor) -> Residual:
    """The whole update of ``problem`` as a residual with nothing peeled and the unit
    directions ``known`` ``(m, k)`` pooled."""
    assert problem.bias_grad is not None
    return Residual(
        left=problem.fac.left.clone(),
        bias=problem.bias_grad.clone(),
        coords=[],
        grads=[],
        directions=DirectionPool(known.T),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_focused_sampling_pools_true_missing_directions(dtype: torch.dtype) -> None:
    """20 of 64 directions known: the steered subsets find most of the other 44 exactly
    (float32: to its noise floor)."""
    case = layer_case(1000, 784, 64, real=True, seed=2, dtype=dtype)
    problem = problem_for(case, time_budget=30.0)
    cols = case.output_grads.double()
    cols = cols / cols.norm(dim=0)
    same = 1 - 1e-10 if dtype == torch.float64 else 1 - 1e-8
    state = _residual_knowing(problem, cols[:, :20])
    pooled, draws = focused_sampling(problem, state)
    assert draws > 0
    assert pooled >= 30, f"only {pooled} of 44 missing directions in {draws} subsets"
    new = torch.stack(state.directions[20:], dim=1)
    best = (cols.T @ new).abs().max(dim=0)
    true_new = best.values > same
    # every pooled direction is an exact true column: mixtures fail the realizability test
    assert int(true_new.sum()) == pooled
    assert all(int(i) >= 20 for i in best.indices[true_new])


def test_focused_sampling_starts_from_peeled_examples_alone() -> None:
    """20 of 64 examples peeled and nothing pooled (row peeling can leave the pool empty):
    the residual is the missing examples' subspace, and the steered subsets find them."""
    case = layer_case(1000, 784, 64, real=True, seed=2)
    problem = problem_for(case, time_budget=30.0)
    state = Residual(
        left=problem.fac.left.clone(),
        bias=case.bias_grad.clone(),
        coords=[],
        grads=[],
        directions=DirectionPool(),
    )
    for i in range(20):
        state.peel(problem.fac.right @ case.inputs[i], case.output_grads[:, i])
    pooled, draws = focused_sampling(problem, state)
    assert pooled >= 30, f"only {pooled} of 44 missing directions in {draws} subsets"
    cols = case.output_grads / case.output_grads.norm(dim=0)
    best = (cols.T @ torch.stack(list(state.directions), dim=1)).abs().max(dim=0)
    assert bool((best.values > 1 - 1e-10).all())  # every pooled direction a true column
    assert all(int(i) >= 20 for i in best.indices)


@pytest.mark.parametrize("update_kind", ["gradient", "delta"])
def test_focused_sampling_hands_back_with_few_missing_except_on_a_delta(
    update_kind: UpdateKind,
) -> None:
    """With 44 of 64 directions known, a one-step update hands back to the subspace step
    once HANDOFF_MISSING directions are missing; a FedAvg delta (whose subspace step
    rarely succeeds) goes on until one is missing, which the last-direction step gives.

    On a delta no realizability test runs (moved masks need not be realizable by one
    input), so a softmax mixture of the last few missing examples can be pooled (this
    one-step update, read as a delta, pools one here); the complete solve's pattern
    checks deal with those, and the whole batch comes back exact."""
    case = layer_case(1000, 784, 64, real=True, seed=2)
    problem = problem_from(
        case.weight_grad, case.bias_grad, case.weight, case.bias, update_kind=update_kind
    )
    cols = case.output_grads / case.output_grads.norm(dim=0)
    state = _residual_knowing(problem, cols[:, :44])
    pooled, draws = focused_sampling(problem, state)
    assert pooled == len(state.directions) - 44
    best = (cols.T @ torch.stack(state.directions[44:], dim=1)).abs().max(dim=0)
    true_new = best.values > 1 - 1e-10
    assert all(int(i) >= 44 for i in best.indices[true_new])
    missing = 64 - len(state.directions)
    if update_kind == "delta":
        assert missing == 1, f"{missing} missing after {draws} subsets"
        rec = invert(problem)
        assert rec.found == 64 and rec.inputs.shape == case.inputs.shape
        assert float(metrics.exact_rate(rec.inputs, case.inputs)) == 1.0
    else:
        assert missing == HANDOFF_MISSING, f"{missing} missing after {draws} subsets"
        assert bool(true_new.all())


def test_focused_sampling_needs_a_bias_and_something_known() -> None:
    case = layer_case(300, 100, 30, real=True)
    problem = problem_for(case, time_budget=5.0)
    state = Residual(
        left=problem.fac.left, bias=case.bias_grad, coords=[], grads=[], directions=DirectionPool()
    )
    assert focused_sampling(problem, state) == (0, 0)
    state.bias = None
    state.directions = DirectionPool([case.output_grads[:, 0] / case.output_grads[:, 0].norm()])
    assert focused_sampling(problem, state) == (0, 0)


def test_break_known_leaves_no_pooled_direction_on_all_rows() -> None:
    known_zero = torch.zeros(12, 2, dtype=torch.bool)
    known_zero[:6, 0] = True  # direction 0 is zero on units 0-5
    known_zero[[0, 1, 2, 7], 1] = True  # direction 1 on units 0-2 and 7
    rows = torch.tensor([0, 1, 2])
    order = torch.arange(12).flip(0)  # unit 11 most promising
    out = break_known(rows, order, known_zero, r=8)
    assert out[:3].tolist() == [0, 1, 2]
    assert not bool(known_zero[out].all(dim=0).any())
    assert out.numel() == 4  # unit 11 is non-zero for both directions
    assert break_known(rows, order, torch.zeros(12, 0, dtype=torch.bool), r=8) is rows


def test_the_note_of_a_stopped_search_counts_the_directions_it_had_found() -> None:
    """Directions pooled for missing examples give no example until every one is found;
    the note of a partial result says how many the search had."""
    from spear.inversion.identifiability import identifiability_note
    from spear.inversion.state import SearchState

    case = layer_case(300, 100, 12, real=True, seed=1)
    problem = problem_for(case, time_budget=5.0)
    state = SearchState.begin(problem)
    note = identifiability_note(problem, state)
    assert "could not be identified" in note and "directions" not in note
    cols = case.output_grads / case.output_grads.norm(dim=0)
    for i in range(5):
        state.residual.directions.add(cols[:, i])
    note = identifiability_note(problem, state)
    assert "found the gradient directions of 5 of the 12 missing examples" in note
