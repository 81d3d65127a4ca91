"""Exact features of a small conv net whose first linear layer sees bias-dominated inputs."""

from __future__ import annotations

import torch

import spear
from spear.client import fedsgd_update
from spear.data import rgb_patches, sample_batch
from spear.networks import FlowerCnn


def test_flower_cnn_features_exact_at_b4() -> None:
    # features of norm 1-2 over 400 entries: |W x| is the size of the bias, 103 of the
    # 120 units are on (or off) for the whole batch, true columns have 6 to 11 zeros
    # among the 72 live units
    torch.manual_seed(0)
    net = FlowerCnn().to(torch.float64)
    images, labels = sample_batch(rgb_patches(1000, seed=0), 4, seed=1)
    images = images.to(torch.float64)
    update = fedsgd_update(net, images, labels)
    rec = spear.attack(net, update, time_budget=30, progress=False, image_budget=0)
    truth = net.features(images).detach()
    assert rec.feature_space
    assert rec.inputs.shape[0] == 4
    assert spear.metrics.exact_rate(rec.inputs.reshape(4, -1), truth, rel_tol=1e-8) == 1.0
    # feature space: no end-to-end certificate; the layer's own verification holds
    assert rec.layer_result is not None
    assert rec.layer_result.verified
