"""The fully connected ReLU networks the demo, the benchmark and the tests attack.

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

import torch
from torch import nn

__all__ = ["DEMO_INPUT_SHAPE", "HIDDEN_WIDTH", "build_model"]

#: Shape of one input of the default network: a 28x28 grey image (MNIST, Fashion-MNIST).
DEMO_INPUT_SHAPE: tuple[int, ...] = (1, 28, 28)
#: Units of every hidden layer after the first.
HIDDEN_WIDTH = 128


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
