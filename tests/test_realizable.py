"""Realizability of zero sets: Ho-Kashyap witnesses and refutations, LP fallback."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import layer_case, server_view

import spear.realizable as realizable
from spear.linalg import Tolerances, zero_mask
from spear.realizable import RealizabilityTest, margin_by_lp, zero_set_realizable
from spear.verify import LayerView


def _hand_layer() -> LayerView:
    """Units ``x1 > 0``, ``-x1 > 0`` and ``x2 + 1 > 0`` in two coordinates."""
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    return LayerView(
        weight_coords=w,
        weight_abs_coords=w.abs(),
        bias=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
        right=torch.eye(2, dtype=torch.float64),
    )


def test_hand_patterns_get_a_witness_or_a_refutation() -> None:
    layer = _hand_layer()
    live = torch.ones(3, dtype=torch.bool)
    test = RealizabilityTest(layer, live, torch.Generator().manual_seed(0))
    # x1 > 0 and x2 < -1: units 1 and 2 off
    assert test(torch.tensor([False, True, True]))
    assert test.last == "witness"
    # units 0 and 1 both on would need x1 > 0 and x1 < 0
    assert not test(torch.tensor([False, False, True]))
    assert test.last == "refuted"
    # nothing or everything off: nothing to decide
    assert test(torch.zeros(3, dtype=torch.bool))
    assert test.last == "trivial"


def _mixture_case() -> tuple[LayerView, Tolerances, torch.Tensor, list[torch.Tensor]]:
    """A real-image layer, its true columns and five 5-class softmax mixtures' zero sets.

    The deltas of any 5 examples (5 classes) are dependent: one combination vanishes where
    all 5 are off and where all 5 are on, yet no input has that pattern.
    """
    case = layer_case(300, 100, 30, real=True, seed=1)
    _fac, layer, tol = server_view(case)
    g = case.output_grads  # (m, b)
    on = g != 0
    mixtures = []
    for start in range(0, 25, 5):
        group = torch.arange(start, start + 5)
        all_on = on[:, group].all(dim=1)
        assert int(all_on.sum()) >= 5
        coef = torch.linalg.svd(g[all_on][:, group]).Vh[-1]  # (5,) the dependent delta mix
        mix = g[:, group] @ coef
        zeros = zero_mask(mix[:, None], tol.zero_tol)[:, 0]
        # sparser than the intersection of the five zero sets: the all-on units cancel
        assert int(zeros.sum()) > int((~on[:, group]).all(dim=1).sum())
        mixtures.append(zeros)
    return layer, tol, g, mixtures


def test_true_columns_get_witnesses_and_softmax_mixtures_refutations() -> None:
    layer, _tol, g, mixtures = _mixture_case()
    live = ~(g == 0).all(dim=1)
    test = RealizabilityTest(layer, live, torch.Generator().manual_seed(0))
    for i in range(g.shape[1]):
        assert test(g[:, i] == 0), f"true column {i} rejected"
        assert test.last == "witness"
    for zeros in mixtures:
        assert not test(zeros)
        assert test.last == "refuted"
    # the one-off form agrees
    gen = torch.Generator().manual_seed(0)
    assert zero_set_realizable(layer, g[:, 0] == 0, live, gen)
    assert not zero_set_realizable(layer, mixtures[0], live, gen)


def test_linear_programme_decides_when_ho_kashyap_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer, _tol, g, mixtures = _mixture_case()
    live = ~(g == 0).all(dim=1)
    gen = torch.Generator().manual_seed(0)
    assert margin_by_lp(layer, g[:, 0] == 0, live, gen) > realizable.LP_MARGIN
    assert all(margin_by_lp(layer, z, live, gen) < 0 for z in mixtures)
    monkeypatch.setattr(realizable, "MAX_ITERATIONS", 0)
    test = RealizabilityTest(layer, live, gen)
    assert test(g[:, 1] == 0)
    assert test.last == "lp"
    assert not test(mixtures[1])
