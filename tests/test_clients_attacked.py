"""spear.attack on what realistic clients send: FedAvg deltas, DP-SGD clipping, aggregation."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import assert_exact
from torch import nn

import spear
from spear import client
from spear.data import builtin_images, sample_batch
from spear.networks import build_model


def _batch(b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_batch(builtin_images(), b, seed=seed)


def _labels_match(rec: spear.Reconstruction, x: torch.Tensor, y: torch.Tensor) -> bool:
    assert rec.labels is not None
    flat_rec = rec.inputs.reshape(rec.inputs.shape[0], -1)
    flat = x.reshape(x.shape[0], -1)
    dist = torch.cdist(flat_rec, flat, compute_mode="donot_use_mm_for_euclid_dist")
    return bool((rec.labels == y[dist.argmin(dim=1)]).all())


def test_fedavg_three_epochs_of_mini_batches_is_exact() -> None:
    # 3 local epochs over 12 examples in mini-batches of 4
    x, y = _batch(12, seed=1)
    model = build_model(256, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta = client.fedavg_update(model, x, y, epochs=3, batch_size=4, lr=0.1, seed=1)
    rec = spear.attack(model, delta, update_kind="delta", time_budget=60)
    assert rec.complete and rec.batch_size == 12
    assert_exact(rec.inputs.reshape(12, -1), x.reshape(12, -1))
    assert _labels_match(rec, x, y)
    assert rec.certificate is not None and rec.certificate < 1e-9
    assert any("FedAvg" in note for note in rec.notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dp_clipping_alone_is_exact_and_certified() -> None:
    x, y = _batch(8, seed=2)
    model = build_model(256, seed=2)
    dp = client.dp_sgd_update(model, x, y, max_grad_norm=0.5, noise_multiplier=0.0, seed=0)
    rec = spear.attack(model, dp.update)
    assert rec.complete and rec.batch_size == 8
    assert_exact(rec.inputs.reshape(8, -1), x.reshape(8, -1))
    assert _labels_match(rec, x, y)
    # clipping rescales examples: the certificate fits per-example weights
    assert rec.verified, (rec.certificate, rec.notes)


def test_dp_noise_returns_no_wrong_examples() -> None:
    x, y = _batch(8, seed=3)
    model = build_model(128, seed=3)
    dp = client.dp_sgd_update(model, x, y, max_grad_norm=1.0, noise_multiplier=0.1, seed=0)
    rec = spear.attack(model, dp.update, batch_size=8, time_budget=3)
    assert any("noisy update" in note for note in rec.notes)
    assert not rec.verified
    if rec.inputs.shape[0]:
        # anything returned is an estimate; it must not be passed off as complete
        assert not rec.complete or rec.certificate is None or rec.certificate > 1e-6


def test_secure_aggregation_is_one_larger_batch() -> None:
    x, y = _batch(10, seed=4)
    model = build_model(256, seed=4)
    parts = [
        client.fedsgd_update(model, x[:4], y[:4], reduction="sum"),
        client.fedsgd_update(model, x[4:], y[4:], reduction="sum"),
    ]
    rec = spear.attack(model, client.aggregate(parts))
    assert rec.complete and rec.batch_size == 10
    assert_exact(rec.inputs.reshape(10, -1), x.reshape(10, -1))
    assert rec.verified


def test_exported_program_is_attacked_with_its_recorded_input_shape() -> None:
    x, y = _batch(6, seed=5)
    model = build_model(200, seed=5)
    program = torch.export.export(model, (x,))
    module = program.module()
    assert isinstance(module, nn.Module)
    update = client.fedsgd_update(module, x, y)
    rec = spear.attack(module, update)
    assert rec.inputs.shape == (6, 1, 28, 28)
    assert not any("guessed" in note for note in rec.notes)
    assert_exact(rec.inputs.reshape(6, -1), x.reshape(6, -1))


def _two_layer(width: int, seed: int) -> nn.Module:
    """``784 -> width -> 10``: the attacked layer's gradient feeds the head directly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))


def test_fedavg_moved_masks_are_measured_by_the_delta_itself() -> None:
    # eight local steps of one example each: the sent weights' ReLU patterns disagree with
    # the true columns' zero sets on up to half the units; leaving out the units the delta
    # itself moves by more than their margin, every true example passes
    from spear.linalg import factorise, zero_mask
    from spear.verify import LayerView, pattern_check

    x, y = _batch(8, seed=0)
    model = _two_layer(128, seed=0).double()
    delta = client.fedavg_update(model, x, y, epochs=1, batch_size=1, lr=0.1, seed=0)
    dw, dc = delta["1.weight"], delta["1.bias"]
    w, c = model[1].weight.detach(), model[1].bias.detach()
    flat = x.reshape(8, -1)
    right = factorise(dw, float(torch.finfo(torch.float64).eps)).right
    coords = flat @ right.T  # (8, 8)
    zeros = zero_mask(dw @ torch.linalg.pinv(flat), 1e-9)  # the true columns' zero sets
    live = torch.ones(128, dtype=torch.bool)
    eps = float(torch.finfo(torch.float64).eps)
    sent_only = LayerView(w @ right.T, w.abs(), c, right)
    with_delta = LayerView(w @ right.T, w.abs(), c, right, dw @ right.T, dc)
    passed_before = [
        pattern_check(sent_only, coords[i], zeros[:, i], live, eps, True)[0] for i in range(8)
    ]
    passed = [
        pattern_check(with_delta, coords[i], zeros[:, i], live, eps, True)[0] for i in range(8)
    ]
    assert not all(passed_before)
    assert all(passed)


@pytest.mark.parametrize("seed", [0, 2])
def test_fedavg_two_layer_network_returns_every_example(seed: int) -> None:
    # the head right after the attacked layer: eight local steps move many masks; a true
    # example failing its check would withhold the whole batch
    x, y = _batch(16, seed=seed)
    model = _two_layer(256, seed=seed).double()
    delta = client.fedavg_update(model, x, y, epochs=1, batch_size=2, lr=0.1, seed=seed)
    rec = spear.attack(model, delta, update_kind="delta", time_budget=60)
    assert rec.complete and rec.batch_size == 16, rec.notes
    assert_exact(rec.inputs.reshape(16, -1), x.reshape(16, -1))
