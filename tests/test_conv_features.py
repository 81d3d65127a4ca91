"""Exact features of a small conv net whose first linear layer sees bias-dominated inputs."""

from __future__ import annotations

import torch
from torch import nn

import spear
from spear.client import fedsgd_update
from spear.data import rgb_patches, sample_batch


class FlowerCnn(nn.Module):
    """Flower's PyTorch tutorial network (32x32 RGB -> 10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` images -> ``(B, 400)`` inputs of ``fc1``."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` -> ``(B, 10)`` logits."""
        x = torch.relu(self.fc1(self.features(x)))
        return self.fc3(torch.relu(self.fc2(x)))


def test_flower_cnn_features_exact_at_b4() -> None:
    # features of norm 1-2 over 400 entries: |W x| is the size of the bias, 103 of the
    # 120 units are on (or off) for the whole batch, true columns have 6 to 11 zeros
    # among the 72 live units
    torch.manual_seed(0)
    net = FlowerCnn().to(torch.float64)
    images, labels = sample_batch(rgb_patches(1000, seed=0), 4, seed=1)
    images = images.to(torch.float64)
    update = fedsgd_update(net, images, labels)
    rec = spear.attack(net, update, time_budget=30, progress=False)
    truth = net.features(images).detach()
    assert rec.feature_space
    assert rec.inputs.shape[0] == 4
    assert spear.metrics.exact_rate(rec.inputs.reshape(4, -1), truth, rel_tol=1e-8) == 1.0
    # feature space: no end-to-end certificate; the layer's own verification holds
    assert rec.layer_result is not None
    assert rec.layer_result.verified
