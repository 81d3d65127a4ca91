"""Focused sampling: row subsets steered by the missing examples' predicted patterns."""

from __future__ import annotations

import time

import torch
from tests.conftest import LayerCase, layer_case

from spear.candidates import Residual
from spear.focused import _break_known, focused_sampling
from spear.linalg import Factorisation, Tolerances, factorise, zero_mask
from spear.verify import LayerView, zero_set_realizable

EPS = float(torch.finfo(torch.float64).eps)


def _problem(case: LayerCase) -> tuple[Factorisation, LayerView, Tolerances]:
    """The factorisation, the layer as the server sees it, and the tolerances."""
    fac = factorise(case.weight_grad, EPS)
    layer = LayerView(
        weight_coords=case.weight @ fac.right.T,
        weight_abs_coords=case.weight.abs(),
        bias=case.bias,
        right=fac.right,
    )
    return fac, layer, Tolerances.derive(torch.float64, fac.condition)


def test_focused_sampling_pools_true_missing_directions() -> None:
    """20 of 64 directions known: the steered subsets find most of the other 44 exactly."""
    case = layer_case(1000, 784, 64, real=True, seed=2)
    fac, layer, tol = _problem(case)
    cols = case.output_grads / case.output_grads.norm(dim=0)
    state = Residual(
        left=fac.left.clone(),
        bias=case.bias_grad.clone(),
        coords=[],
        grads=[],
        directions=[cols[:, i] for i in range(20)],
    )
    gen = torch.Generator().manual_seed(0)
    pooled, draws = focused_sampling(state, layer, tol, 64, gen, time.perf_counter() + 30, 0.1)
    assert draws > 0
    assert pooled >= 30, f"only {pooled} of 44 missing directions in {draws} subsets"
    new = torch.stack(state.directions[20:], dim=1)
    best = (cols.T @ new).abs().max(dim=0)
    true_new = best.values > 1 - 1e-10
    # every pooled direction is an exact true column: mixtures fail the realizability test
    assert int(true_new.sum()) == pooled
    assert all(int(i) >= 20 for i in best.indices[true_new])


def test_focused_sampling_needs_a_bias_and_pooled_directions() -> None:
    case = layer_case(300, 100, 30, real=True)
    fac, layer, tol = _problem(case)
    state = Residual(left=fac.left, bias=case.bias_grad, coords=[], grads=[], directions=[])
    gen = torch.Generator().manual_seed(0)
    assert focused_sampling(state, layer, tol, 30, gen, time.perf_counter() + 5, 0.1) == (0, 0)
    state.bias = None
    state.directions = [case.output_grads[:, 0] / case.output_grads[:, 0].norm()]
    assert focused_sampling(state, layer, tol, 30, gen, time.perf_counter() + 5, 0.1) == (0, 0)


def test_zero_set_realizable_accepts_true_columns_and_rejects_softmax_mixtures() -> None:
    """The deltas of any 5 examples (5 classes) are dependent: one of their combinations
    vanishes where all 5 are off and where all 5 are on, yet no input has that pattern."""
    case = layer_case(300, 100, 30, real=True, seed=1)
    _fac, layer, tol = _problem(case)
    g = case.output_grads  # (m, b)
    gen = torch.Generator().manual_seed(0)
    live = ~(g == 0).all(dim=1)
    for i in range(5):
        assert zero_set_realizable(layer, g[:, i] == 0, live, gen)
    on = g != 0
    rejected = 0
    for start in range(0, 25, 5):
        group = torch.arange(start, start + 5)
        all_on = on[:, group].all(dim=1)
        assert int(all_on.sum()) >= 5
        coef = torch.linalg.svd(g[all_on][:, group]).Vh[-1]  # (5,) the dependent delta mix
        mix = g[:, group] @ coef
        zeros = zero_mask(mix[:, None], tol.zero_tol)[:, 0]
        # sparser than the intersection of the five zero sets: the all-on units cancel
        assert int(zeros.sum()) > int((~on[:, group]).all(dim=1).sum())
        rejected += not zero_set_realizable(layer, zeros, live, gen)
    assert rejected == 5


def test_break_known_leaves_no_pooled_direction_on_all_rows() -> None:
    known_zero = torch.zeros(12, 2, dtype=torch.bool)
    known_zero[:6, 0] = True  # direction 0 is zero on units 0-5
    known_zero[[0, 1, 2, 7], 1] = True  # direction 1 on units 0-2 and 7
    rows = torch.tensor([0, 1, 2])
    order = torch.arange(12).flip(0)  # unit 11 most promising
    out = _break_known(rows, order, known_zero, r=8)
    assert out[:3].tolist() == [0, 1, 2]
    assert not bool(known_zero[out].all(dim=0).any())
    assert out.numel() == 4  # unit 11 is non-zero for both directions
    assert _break_known(rows, order, torch.zeros(12, 0, dtype=torch.bool), r=8) is rows
