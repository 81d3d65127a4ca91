"""Tests for spear.baselines: the analytic attack, gradient matching and the registry."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from torch import nn

from spear.baselines import ATTACKS, analytic_attack, get_attack, gradient_matching_attack
from spear.baselines.gradient_matching import (
    learning_rate,
    planned_steps,
    total_variation,
)
from spear.baselines.labels import infer_labels
from spear.errors import InputError, NotAttackableError

torch.set_num_threads(1)


def _mlp(sizes: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype)


def _update(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    loss = nn.functional.cross_entropy(model(inputs), labels, reduction=reduction)
    grads = torch.autograd.grad(loss, params)
    return {name: grad.detach() for name, grad in zip(names, grads, strict=True)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_analytic_exact_for_one_example(reduction: str, seed: int) -> None:
    model = _mlp((64, 32, 10), torch.float64, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand((1, 1, 8, 8), generator=generator, dtype=torch.float64)
    labels = torch.tensor([seed + 3])
    before = _state(model)
    rec = analytic_attack(
        model, _update(model, inputs, labels, reduction), batch_size=1, input_shape=(1, 8, 8)
    )
    _assert_same_state(before, model)
    assert rec.inputs.shape == (1, 1, 8, 8)
    assert rec.inputs.dtype == torch.float64
    error = (rec.inputs - inputs).abs().max() / inputs.abs().max()
    assert error < 1e-10
    assert rec.labels is not None and rec.labels.tolist() == labels.tolist()
    assert rec.complete and not rec.verified and rec.certificate is None
    assert rec.layer == "1" and not rec.feature_space
    assert any("certify" in note for note in rec.notes)


def test_analytic_best_row_and_delta() -> None:
    model = _mlp((64, 32, 10), torch.float64)
    inputs = torch.rand((1, 64), dtype=torch.float64)
    update = _update(model, inputs, torch.tensor([7]))
    delta = {name: -0.05 * grad for name, grad in update.items()}
    rec = analytic_attack(
        model, delta, batch_size=1, input_shape=(64,), update_kind="delta", rows=1
    )
    assert torch.allclose(rec.inputs, inputs, rtol=0, atol=1e-10)
    assert rec.labels is not None and rec.labels.tolist() == [7]


def test_analytic_batch_is_a_mixture() -> None:
    model = _mlp((64, 32, 10), torch.float64)
    inputs = torch.rand((4, 64), dtype=torch.float64)
    rec = analytic_attack(
        model, _update(model, inputs, torch.tensor([0, 1, 2, 3])), batch_size=4, input_shape=(64,)
    )
    assert rec.inputs.shape == (1, 64)
    assert not rec.complete and rec.labels is None and rec.batch_size == 4
    assert any("mixture" in note for note in rec.notes)
    # Not any single example, but (weights summing to one) close to their span.
    distances = (rec.inputs - inputs).abs().max(dim=1).values
    assert distances.min() > 1e-3


def test_analytic_feature_space_and_not_attackable() -> None:
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    update = _update(model, torch.rand(1, 8), torch.tensor([1]))
    rec = analytic_attack(model, update, batch_size=1, input_shape=(8,))
    assert rec.feature_space and rec.inputs.shape == (1, 6) and rec.layer == "2"
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    grads = {name: torch.ones_like(p) for name, p in conv.named_parameters()}
    with pytest.raises(NotAttackableError, match="gradient-matching"):
        analytic_attack(conv, grads, batch_size=1, input_shape=(1, 5, 5))


def test_update_checks() -> None:
    model = _mlp((8, 4, 3), torch.float64)
    update = _update(model, torch.rand(1, 8, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(InputError, match="not parameters"):
        analytic_attack(model, {"nope": torch.zeros(1)}, batch_size=1, input_shape=(8,))
    with pytest.raises(InputError, match="shape"):
        bad = dict(update, **{"1.bias": torch.zeros(5, dtype=torch.float64)})
        analytic_attack(model, bad, batch_size=1, input_shape=(8,))
    with pytest.raises(InputError, match="update_kind"):
        analytic_attack(model, update, batch_size=1, input_shape=(8,), update_kind="weights")


def test_label_inference_batch() -> None:
    model = _mlp((20, 16, 10), torch.float64)
    labels = torch.tensor([4, 1, 8, 4, 6])
    inputs = torch.rand((5, 20), dtype=torch.float64)
    inference = infer_labels(model, _update(model, inputs, labels), batch_size=5)
    assert inference.labels is not None and inference.source == "bias"
    assert sorted(inference.labels.tolist()) == sorted(labels.tolist())


def test_gradient_matching_improves_on_init() -> None:
    model = _mlp((64, 32, 10), torch.float64)
    generator = torch.Generator().manual_seed(5)
    truth = torch.rand((2, 1, 8, 8), generator=generator, dtype=torch.float64)
    labels = torch.tensor([3, 8])
    update = _update(model, truth, labels)
    before = _state(model)
    init = gradient_matching_attack(
        model, update, batch_size=2, input_shape=(1, 8, 8), iterations=0, seed=1
    )
    rec = gradient_matching_attack(
        model, update, batch_size=2, input_shape=(1, 8, 8), iterations=150, seed=1, box=(0, 1)
    )
    _assert_same_state(before, model)
    assert rec.inputs.shape == (2, 1, 8, 8) and rec.inputs.dtype == torch.float64
    assert rec.labels is not None and sorted(rec.labels.tolist()) == [3, 8]
    assert rec.certificate is None and not rec.verified and rec.layer == ""

    def mse(found: torch.Tensor) -> float:
        # Best of the two pairings (the attack returns examples in some order).
        straight = (found - truth).pow(2).mean()
        swapped = (found.flip(0) - truth).pow(2).mean()
        return float(torch.minimum(straight, swapped))

    assert mse(rec.inputs) < 0.2 * mse(init.inputs)
    assert rec.inputs.min() >= 0 and rec.inputs.max() <= 1


def test_gradient_matching_with_known_examples_held() -> None:
    """Examples known by other means are held fixed: only the missing one is optimised,
    labelled with the batch's labels less the known ones, and it comes out closer to the
    truth than when the whole batch is free."""
    model = _mlp((64, 32, 10), torch.float64)
    generator = torch.Generator().manual_seed(7)
    truth = torch.rand((3, 1, 8, 8), generator=generator, dtype=torch.float64)
    labels = torch.tensor([5, 2, 5])
    update = _update(model, truth, labels)
    rec = gradient_matching_attack(
        model,
        update,
        batch_size=1,
        input_shape=(1, 8, 8),
        iterations=150,
        seed=1,
        box=(0, 1),
        known=(truth[:2], labels[:2]),
    )
    assert rec.inputs.shape == (1, 1, 8, 8)
    assert rec.labels is not None and rec.labels.tolist() == [5]
    assert any("2 known examples held fixed" in note for note in rec.notes)
    free = gradient_matching_attack(
        model, update, batch_size=3, input_shape=(1, 8, 8), iterations=150, seed=1, box=(0, 1)
    )
    best_free = min(float((x - truth[2]).pow(2).mean()) for x in free.inputs)
    assert float((rec.inputs[0] - truth[2]).pow(2).mean()) < best_free
    with pytest.raises(InputError, match="known must be"):
        gradient_matching_attack(
            model, update, batch_size=1, input_shape=(1, 8, 8), known=(truth[:2], labels)
        )


def test_gradient_matching_starts_from_given_inputs() -> None:
    """``initial`` replaces the Gaussian start (clamped into the box); a wrong shape is
    refused with the shape expected."""
    model = _mlp((64, 32, 10), torch.float64)
    generator = torch.Generator().manual_seed(5)
    truth = torch.rand((2, 1, 8, 8), generator=generator, dtype=torch.float64)
    labels = torch.tensor([3, 8])
    update = _update(model, truth, labels)
    start = truth + 0.5
    kept = gradient_matching_attack(
        model,
        update,
        batch_size=2,
        input_shape=(1, 8, 8),
        iterations=0,
        box=(0, 1),
        initial=start,
        labels=labels,
    )
    assert torch.equal(kept.inputs, start.clamp(0, 1))
    near = gradient_matching_attack(
        model,
        update,
        batch_size=2,
        input_shape=(1, 8, 8),
        iterations=50,
        lr=0.01,
        initial=truth + 0.01,
        labels=labels,
    )
    far = gradient_matching_attack(
        model, update, batch_size=2, input_shape=(1, 8, 8), iterations=50, lr=0.01, seed=1
    )
    assert float((near.inputs - truth).abs().max()) < float((far.inputs - truth).abs().max())
    with pytest.raises(InputError, match=r"initial must have shape \(2, 1, 8, 8\)"):
        gradient_matching_attack(
            model, update, batch_size=2, input_shape=(1, 8, 8), initial=truth[:1]
        )


def test_gradient_matching_float32_flat_and_time_budget() -> None:
    model = _mlp((16, 8, 4), torch.float32)
    update = _update(model, torch.rand(1, 16), torch.tensor([2]))
    start = time.perf_counter()
    rec = gradient_matching_attack(
        model, update, batch_size=1, input_shape=(16,), iterations=10**6, time_budget=0.3
    )
    assert time.perf_counter() - start < 1.5
    assert rec.inputs.dtype == torch.float32 and rec.inputs.shape == (1, 16)
    assert rec.labels is not None and rec.labels.tolist() == [2]
    assert any("time budget" in note for note in rec.notes)


def test_gradient_matching_schedule_follows_the_steps_that_fit_the_budget() -> None:
    # 10 steps took 1 s: 0.9 of 4 s more allow 36 more, within the 2000 asked for.
    assert planned_steps(2000, 10, 1.0, 4.0) == 46
    assert planned_steps(2000, 10, 1.0, 1e6) == 2000
    assert planned_steps(2000, 10, 1.0, -1.0) == 10
    assert planned_steps(2000, 0, 0.0, 4.0) == 2000
    rates = [learning_rate(0.1, step, 80) for step in range(80)]
    assert rates[0] == rates[29] == 0.1
    assert rates[30] == pytest.approx(0.01) and rates[49] == pytest.approx(0.01)
    assert rates[50] == pytest.approx(1e-3) and rates[70] == pytest.approx(1e-4)
    assert rates[-1] == pytest.approx(1e-4)


def test_gradient_matching_without_label_layer() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    update = _update(model, torch.rand(1, 6), torch.tensor([1]))
    # A frozen head (no gradient in the update): labels must be optimised (DLG fallback).
    first = {name: update[name] for name in ("0.weight", "0.bias")}
    assert infer_labels(model, first, batch_size=1).labels is None
    rec = gradient_matching_attack(model, first, batch_size=1, input_shape=(6,), iterations=5)
    assert rec.labels is not None and rec.labels.shape == (1,)
    assert any("soft labels" in note for note in rec.notes)


def test_total_variation() -> None:
    flat = torch.ones((2, 1, 4, 4))
    assert float(total_variation(flat)) == 0.0
    stripes = torch.zeros((1, 1, 2, 2))
    stripes[..., 1] = 1.0
    assert float(total_variation(stripes)) == pytest.approx(1.0)


def test_registry() -> None:
    assert ATTACKS["analytic"] is analytic_attack
    assert get_attack("gradient-matching") is gradient_matching_attack
    with pytest.raises(InputError, match="'analytic', 'breaching-ig', 'gradient-matching'"):
        get_attack("dlg")
