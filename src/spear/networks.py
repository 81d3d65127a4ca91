"""The networks the demo, the benchmark and the tests attack: fully connected ReLU
networks, and convolutional image classifiers (Flower's tutorial CNN, a VGG-style CNN with
and without BatchNorm).

Examples
--------
>>> model = build_model(32, seed=0)
>>> [tuple(p.shape) for p in model.parameters()]
[(32, 784), (32,), (128, 32), (128,), (10, 128), (10,)]
>>> torch.equal(model[1].weight, build_model(32, seed=0)[1].weight)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "CNNS",
    "CNN_INPUT_SHAPE",
    "DEMO_INPUT_SHAPE",
    "HIDDEN_WIDTH",
    "FlowerCnn",
    "VggCnn",
    "build_cnn",
    "build_model",
    "pretrain",
]

#: Shape of one input of the default network: a 28x28 grey image (MNIST, Fashion-MNIST).
DEMO_INPUT_SHAPE: tuple[int, ...] = (1, 28, 28)
#: Units of every hidden layer after the first.
HIDDEN_WIDTH = 128
#: Shape of one input of the convolutional networks: a 32x32 RGB image (CIFAR-10).
CNN_INPUT_SHAPE: tuple[int, int, int] = (3, 32, 32)


def build_model(
    width: int,
    seed: int,
    num_classes: int = 10,
    *,
    input_shape: tuple[int, ...] = DEMO_INPUT_SHAPE,
    depth: int = 2,
) -> nn.Module:
    """``Flatten -> Linear(in, width) -> ReLU -> [Linear(., 128) -> ReLU] * (depth - 1)
    -> Linear(., num_classes)`` in float64, initialised from ``seed``.

    The layers are created in that order right after ``torch.manual_seed(seed)``, so a seed
    always gives the same weights; torch's global random state is restored afterwards.
    The defaults give ``784 -> width -> 128 -> 10``.

    Parameters
    ----------
    width:
        Units of the first linear layer (the one :func:`spear.attack` inverts).
    seed:
        Seed of the initialisation.
    num_classes:
        Outputs of the last layer.
    input_shape:
        Shape of one input, e.g. ``(1, 28, 28)``; the model takes ``(b, *input_shape)``.
    depth:
        Number of hidden ReLU layers (at least 1).

    Returns
    -------
    torch.nn.Module
        An ``nn.Sequential`` in float64 mapping ``(b, *input_shape)`` to ``(b, num_classes)``.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for index in range(depth):
        units = width if index == 0 else HIDDEN_WIDTH
        layers.extend([nn.Linear(features, units), nn.ReLU()])
        features = units
    layers.append(nn.Linear(features, num_classes))
    model = nn.Sequential(*layers).double()
    torch.random.set_rng_state(generator_state)
    return model


class FlowerCnn(nn.Module):
    """Flower's PyTorch tutorial network: ``(B, 3, 32, 32)`` -> ``(B, 10)``.

    ``conv1 (3->6, 5x5) -> ReLU -> max-pool 2 -> conv2 (6->16, 5x5) -> ReLU -> max-pool 2
    -> flatten (400) -> fc1 (120) -> ReLU -> fc2 (84) -> ReLU -> fc3 (10)``; the attack
    inverts ``fc1``, whose inputs are the 400 pooled features.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` images -> ``(B, 400)`` inputs of ``fc1``."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` -> ``(B, num_classes)`` logits."""
        x = torch.relu(self.fc1(self.features(x)))
        return self.fc3(torch.relu(self.fc2(x)))


class VggCnn(nn.Module):
    """A small VGG-style CIFAR network: ``(B, 3, 32, 32)`` -> ``(B, 10)``.

    Three blocks of 3x3 convolutions with ReLU, each ending in a 2x2 max-pool
    (``3 -> 16 -> 16``, pool, ``16 -> 32 -> 32``, pool, ``32 -> 64``, pool: 64 x 4 x 4),
    then ``flatten (1024) -> fc1 (width) -> ReLU -> fc2 (num_classes)``. The attack inverts
    ``fc1``. With ``batch_norm`` a ``BatchNorm2d`` follows each convolution (VGG-BN): a
    client trains in training mode, where it normalises with the batch's own statistics.
    """

    def __init__(
        self, width: int = 256, num_classes: int = 10, *, batch_norm: bool = False
    ) -> None:
        super().__init__()

        def conv(channels_in: int, channels_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(channels_in, channels_out, 3, padding=1)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels_out))
            return [*layers, nn.ReLU()]

        self.conv = nn.Sequential(
            *conv(3, 16),
            *conv(16, 16),
            nn.MaxPool2d(2),
            *conv(16, 32),
            *conv(32, 32),
            nn.MaxPool2d(2),
            *conv(32, 64),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 4 * 4, width)
        self.fc2 = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` images -> ``(B, 1024)`` inputs of ``fc1``."""
        return torch.flatten(self.conv(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` -> ``(B, num_classes)`` logits."""
        return self.fc2(torch.relu(self.fc1(self.features(x))))


def vgg_bn_cnn() -> VggCnn:
    """:class:`VggCnn` with a ``BatchNorm2d`` after each convolution, in training mode."""
    return VggCnn(batch_norm=True)


#: The convolutional networks by name (``spear demo --model``): name -> builder.
CNNS: dict[str, Callable[[], nn.Module]] = {
    "flower-cnn": FlowerCnn,
    "vgg": VggCnn,
    "vgg-bn": vgg_bn_cnn,
}


def build_cnn(name: str, seed: int, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The convolutional network called ``name`` (``"flower-cnn"``, ``"vgg"`` or
    ``"vgg-bn"``), initialised from ``seed`` (torch's global random state is restored
    afterwards).

    Returns
    -------
    torch.nn.Module
        Maps ``(b, 3, 32, 32)`` images to ``(b, 10)`` logits, in ``dtype``.

    Raises
    ------
    ValueError
        When ``name`` is not a key of :data:`CNNS`.
    """
    if name not in CNNS:
        raise ValueError(f"unknown network {name!r}; available: {', '.join(sorted(CNNS))}.")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = CNNS[name]().to(dtype)
    torch.random.set_rng_state(generator_state)
    return model


def pretrain(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 0.05,
    batch_size: int = 32,
    seed: int = 0,
) -> nn.Module:
    """``steps`` SGD steps of softmax cross-entropy on random mini-batches, in place.

    A trained network's features and ReLU patterns differ from an untrained one's (the
    attack's benchmarks cover both). The mini-batches are drawn with a generator seeded
    by ``seed``; torch's global random state is not touched.

    Parameters
    ----------
    model:
        Maps ``images`` to logits; trained in place (and returned).
    images, labels:
        ``(N, ...)`` in the model's dtype (converted when not) and ``(N,)`` int64.
    steps, lr, batch_size:
        SGD steps, learning rate and mini-batch size (at most ``N``).

    Returns
    -------
    torch.nn.Module
        ``model``, with its gradients cleared.
    """
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    size = min(batch_size, images.shape[0])
    for _ in range(steps):
        index = torch.randperm(images.shape[0], generator=generator)[:size]
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(images[index].to(dtype)), labels[index])
        loss.backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model
