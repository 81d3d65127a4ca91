"""Weight decay: updates that are a low-rank gradient plus a multiple of the sent weights."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import assert_exact, fashion

import spear
from spear.decay import Decay, find_decay, without_decay
from spear.layer import MIN_RANK_GAP


def _mlp(hidden: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    ).to(dtype)


def _l2_gradient(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, biases: bool
) -> dict[str, torch.Tensor]:
    """Mean cross-entropy plus ``1e-3 * sum(p ** 2)`` (weights only unless ``biases``)."""
    names = [n for n, _ in model.named_parameters()]
    penalty = sum(
        (p**2).sum() for n, p in model.named_parameters() if biases or n.endswith("weight")
    )
    loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-3 * penalty
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {n: g.detach() for n, g in zip(names, grads, strict=True)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("biases", [True, False])
def test_an_l2_penalty_is_taken_out_and_the_batch_verified(
    dtype: torch.dtype, biases: bool
) -> None:
    model = _mlp(256, dtype)
    x, y = fashion(16, seed=1)
    x = x.reshape(16, -1).to(dtype)
    update = _l2_gradient(model, x, y, biases)
    rec = spear.attack(model, update, input_shape=(784,), time_budget=60.0)
    # float32: every pixel within 1e-3 on the [0, 1] scale (what 8 bits round back)
    rel = 1e-3 if dtype == torch.float32 else 1e-8
    assert_exact(rec.inputs.to(torch.float64), x.to(torch.float64), rel=rel)
    assert rec.verified, rec.notes
    note = next(n for n in rec.notes if n.startswith("weight decay"))
    assert "plus 0.002 times" in note
    assert ("biases too" if biases else "biases left out") in note


def test_fedavg_with_momentum_and_weight_decay_gives_its_examples() -> None:
    model = _mlp(1000, torch.float64)
    x, y = fashion(16, seed=2)
    x = x.reshape(16, -1).to(torch.float64)
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        for i in range(0, 16, 8):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(client(x[i : i + 8]), y[i : i + 8]).backward()
            opt.step()
    delta = {
        n: (after - before).detach()
        for (n, before), after in zip(model.named_parameters(), client.parameters(), strict=True)
    }
    rec = spear.attack(model, delta, update_kind="delta", input_shape=(784,), time_budget=60.0)
    assert_exact(rec.inputs, x)
    assert rec.examples_verified
    assert any(n.startswith("weight decay") for n in rec.notes), rec.notes


def test_noise_is_not_taken_for_weight_decay() -> None:
    # a full-rank update with no decay in it: no multiple of the weights leaves a rank gap
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 300, generator=gen, dtype=torch.float64)
    low = torch.randn(200, 8, generator=gen, dtype=torch.float64) @ torch.randn(
        8, 300, generator=gen, dtype=torch.float64
    )
    noisy = low + 1e-3 * torch.randn(200, 300, generator=gen, dtype=torch.float64)
    assert find_decay(noisy, None, weight, None, MIN_RANK_GAP) is None
    found = find_decay(low + 0.01 * weight, None, weight, None, MIN_RANK_GAP)
    assert found is not None and found.rank == 8
    assert found.weights == pytest.approx(0.01, rel=1e-9)


def test_without_decay_takes_the_multiple_out_of_weights_and_biases() -> None:
    params = {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(2)}
    update = {"a.weight": torch.full((2, 3), 5.0), "a.bias": torch.full((2,), 5.0)}
    out = without_decay(update, params, Decay(weights=2.0, biases=0.0, rank=1))
    assert torch.equal(out["a.weight"], torch.full((2, 3), 3.0))
    assert torch.equal(out["a.bias"], update["a.bias"])
