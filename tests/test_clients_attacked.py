"""spear.attack on what realistic clients send: FedAvg deltas, DP-SGD clipping, aggregation."""

from __future__ import annotations

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
