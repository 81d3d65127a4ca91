"""Model, data and local training shared by the client and the server.

The data are the 1000 Fashion-MNIST test images that ship with spear (no download): the
first 900 are split between the clients, the last 100 are the server's test set.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from torch import nn

from spear.data import builtin_images

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Images split between the clients; the rest is the server's test set.
TRAIN_IMAGES = 900
#: The app's folder (its pyproject.toml holds the default run config).
APP_DIR = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    with (APP_DIR / "pyproject.toml").open("rb") as handle:
        config: dict[str, Any] = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    return config


def settings(context: Context) -> dict[str, Any]:
    """The run config: ``[tool.flwr.app.config]`` of pyproject.toml, then the run's own.

    ``flwr run`` passes every key; ``flwr.simulation.run_simulation`` passes none, and the
    defaults apply.
    """
    return {**_defaults(), **dict(context.run_config)}


def make_net(hidden: int, seed: int = 0) -> nn.Module:
    """``Flatten -> Linear(784, hidden) -> ReLU -> Linear(hidden, 10)``, float32."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's images ``(n, 1, 28, 28)`` float32 in [0, 1] and labels ``(n,)``."""
    data = builtin_images()
    index = np.array_split(np.arange(TRAIN_IMAGES), num_partitions)[partition_id]
    chosen = torch.from_numpy(index)
    return data.images[chosen].float(), data.labels[chosen]


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The server's 100 held-out images and labels."""
    data = builtin_images()
    return data.images[TRAIN_IMAGES:].float(), data.labels[TRAIN_IMAGES:]


def local_batch(
    images: torch.Tensor, labels: torch.Tensor, count: int, seed: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct examples of a partition, drawn from ``seed``."""
    rng = np.random.default_rng(list(seed))
    pick = torch.from_numpy(rng.choice(len(images), size=min(count, len(images)), replace=False))
    return images[pick], labels[pick]


def train(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Plain SGD on the examples in shuffled mini-batches; returns the last loss."""
    optimiser = torch.optim.SGD(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(net(images[index]), labels[index])
            loss.backward()
            optimiser.step()
    return float(loss.detach())


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correctly classified examples."""
    net.eval()
    with torch.no_grad():
        return float((net(images).argmax(1) == labels).double().mean())
