"""Tests for spear.client: FedSGD, FedAvg, DP-SGD (Opacus) updates, aggregation, checks.

Every fast path is compared with a slow reference written with plain ``torch.autograd``
(one example at a time for DP-SGD), in float64 on small MLPs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tests.conftest import mlp
from torch import nn

from spear import client
from spear.errors import InputError

#: float64 agreement between two ways of computing the same update (relative to its scale).
CLOSE = 1e-12
#: singular values below this fraction of the largest count as zero (float64 rank).
RANK_RTOL = 1e-10

SIZES = (16, 12, 6)  # flatten(1x4x4) -> 12 -> ReLU -> 6


def _batch(b: int, *, seed: int = 0, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.rand(b, 1, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (b,), generator=gen)
    return inputs, labels


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.grad is None, name
        assert not hasattr(p, "grad_sample") or p.grad_sample is None, name


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert a[name].dtype == b[name].dtype, name
        scale = max(float(b[name].abs().max()), 1e-300)
        assert float((a[name] - b[name]).abs().max()) <= tol * scale, name


def _reference_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str
) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y, reduction=reduction)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {name: g.detach() for name, g in zip(params, grads, strict=True)}


def _reference_dp_clipped(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """Slow DP-SGD without noise: loop over examples, clip each (Opacus's +1e-6), mean."""
    names = [name for name, _ in model.named_parameters()]
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(x.shape[0]):
        grad = _reference_gradient(model, x[i : i + 1], y[i : i + 1], "sum")
        norm = torch.sqrt(sum((g**2).sum() for g in grad.values()))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for name in names:
            total[name] += factor * grad[name]
    return {name: t / x.shape[0] for name, t in total.items()}


def _rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix, rtol=RANK_RTOL))


# --------------------------------------------------------------------------------------
# FedSGD


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fedsgd_matches_autograd_and_leaves_model(reduction: str) -> None:
    model = mlp(SIZES)
    x, y = _batch(5)
    before = _snapshot(model)
    update = client.fedsgd_update(model, x, y, reduction=reduction)
    _assert_unchanged(model, before)
    assert list(update) == [name for name, _ in model.named_parameters()]
    assert all(not g.requires_grad and g.dtype == torch.float64 for g in update.values())
    _assert_close(update, _reference_gradient(model, x, y, reduction), CLOSE)
    client.check_update(model, update)


def test_fedsgd_sum_is_b_times_mean() -> None:
    model = mlp(SIZES)
    x, y = _batch(7)
    mean = client.fedsgd_update(model, x, y, reduction="mean")
    total = client.fedsgd_update(model, x, y, reduction="sum")
    _assert_close(total, {n: 7 * g for n, g in mean.items()}, CLOSE)


def test_fedsgd_custom_per_example_loss() -> None:
    model = mlp(SIZES)
    x, y = _batch(4)

    def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, labels, reduction="none")

    custom = client.fedsgd_update(model, x, y, reduction="sum", loss_fn=loss_fn)
    _assert_close(custom, client.fedsgd_update(model, x, y, reduction="sum"), CLOSE)
    with pytest.raises(InputError, match="per-example losses"):
        client.fedsgd_update(model, x, y, loss_fn=nn.CrossEntropyLoss())


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0, 1, 2]), "batch size 4"),
        (torch.tensor([0, 1, 2, 6]), r"\[0, 6\)"),
        (torch.tensor([0, 1, 2, -1]), r"\[0, 6\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "int64"),
    ],
)
def test_bad_labels_are_reported(labels: torch.Tensor, match: str) -> None:
    model = mlp(SIZES)
    x, _ = _batch(4)
    for call in (client.fedsgd_update, client.fedavg_update):
        with pytest.raises(InputError, match=match):
            call(model, x, labels)
    with pytest.raises(InputError, match=match):
        client.dp_sgd_update(model, x, labels, max_grad_norm=1.0, noise_multiplier=0.0)


def test_bad_inputs_are_reported() -> None:
    model = mlp(SIZES)
    x, y = _batch(4)
    with pytest.raises(InputError, match="Cast with"):
        client.fedsgd_update(model, x.float(), y)
    with pytest.raises(InputError, match="reduction"):
        client.fedsgd_update(model, x, y, reduction="max")
    with pytest.raises(InputError, match="epochs"):
        client.fedavg_update(model, x, y, epochs=0)
    with pytest.raises(InputError, match="lr"):
        client.fedavg_update(model, x, y, lr=-1.0)
    with pytest.raises(InputError, match="max_grad_norm"):
        client.dp_sgd_update(model, x, y, max_grad_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(InputError, match="sample_rate"):
        client.dp_sgd_update(model, x, y, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=2)


# --------------------------------------------------------------------------------------
# FedAvg


def test_fedavg_one_full_batch_epoch_is_minus_lr_gradient() -> None:
    model = mlp(SIZES)
    x, y = _batch(6)
    delta = client.fedavg_update(model, x, y, epochs=1, batch_size=None, lr=0.05)
    grad = _reference_gradient(model, x, y, "mean")
    _assert_close(delta, {n: -0.05 * g for n, g in grad.items()}, 1e-10)


def test_fedavg_multi_epoch_matches_reference_and_leaves_model() -> None:
    model = mlp(SIZES)
    x, y = _batch(10)
    before = _snapshot(model)
    delta = client.fedavg_update(model, x, y, epochs=3, batch_size=4, lr=0.2, seed=5)
    _assert_unchanged(model, before)
    client.check_update(model, delta)
    # reference: the same SGD with the same seeded shuffles, by hand
    ref = mlp(SIZES)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        order = torch.randperm(10, generator=gen)
        for start in range(0, 10, 4):
            idx = order[start : start + 4]
            grad = _reference_gradient(ref, x[idx], y[idx], "mean")
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p -= 0.2 * grad[name]
    expected = {n: p.detach() - before[n] for n, p in ref.named_parameters()}
    _assert_close(delta, expected, 1e-10)
    # deterministic given the seed; a different seed shuffles differently
    _assert_close(
        client.fedavg_update(model, x, y, epochs=3, batch_size=4, lr=0.2, seed=5), delta, 0
    )
    other = client.fedavg_update(model, x, y, epochs=3, batch_size=4, lr=0.2, seed=6)
    assert not torch.equal(other["1.weight"], delta["1.weight"])


def test_fedavg_first_layer_rank_is_number_of_examples() -> None:
    """docs/algorithm.md, fact 11: 12 examples, 3 epochs, mini-batches of 4 -> rank exactly 12."""
    model = mlp((64, 40, 10))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=gen)
    delta = client.fedavg_update(model, x, y, epochs=3, batch_size=4, lr=0.1, seed=0)
    weight_delta = delta["1.weight"]  # (40, 64)
    assert _rank(weight_delta) == 12
    sv = torch.linalg.svdvals(weight_delta)
    assert float(sv[12] / sv[0]) < 1e-13 < 1e-6 < float(sv[11] / sv[0])
    # and it lies in the row space of the inputs
    flat = x.reshape(12, -1)
    projected = weight_delta @ torch.linalg.pinv(flat) @ flat
    assert float((projected - weight_delta).abs().max()) < 1e-12 * float(weight_delta.abs().max())


# --------------------------------------------------------------------------------------
# DP-SGD


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.5, 1e3])
def test_dp_clipping_only_matches_slow_reference(max_grad_norm: float) -> None:
    model = mlp(SIZES)
    x, y = _batch(6)
    before = _snapshot(model)
    dp = client.dp_sgd_update(model, x, y, max_grad_norm=max_grad_norm, noise_multiplier=0.0)
    _assert_unchanged(model, before)
    assert dp.epsilon == math.inf
    assert dp.sample_rate == 6 / client.DEFAULT_DATASET_SIZE
    client.check_update(model, dp.update)
    _assert_close(dp.update, _reference_dp_clipped(model, x, y, max_grad_norm), CLOSE)
    if max_grad_norm >= 1e3:  # nothing clipped: the plain mean gradient
        _assert_close(dp.update, _reference_gradient(model, x, y, "mean"), CLOSE)


def test_dp_float32() -> None:
    model = mlp(SIZES).float()
    x, y = _batch(5)
    dp = client.dp_sgd_update(model, x.float(), y, max_grad_norm=0.1, noise_multiplier=0.0)
    assert all(g.dtype == torch.float32 for g in dp.update.values())
    ref = _reference_dp_clipped(mlp(SIZES), x, y, 0.1)
    _assert_close({n: g.double() for n, g in dp.update.items()}, ref, 1e-5)


def test_dp_noise_is_seeded_and_has_the_right_scale() -> None:
    model = mlp((64, 40, 10))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(8) % 10
    clip, sigma = 0.5, 2.0
    clean = client.dp_sgd_update(model, x, y, max_grad_norm=clip, noise_multiplier=0.0).update
    noisy = client.dp_sgd_update(model, x, y, max_grad_norm=clip, noise_multiplier=sigma, seed=3)
    again = client.dp_sgd_update(model, x, y, max_grad_norm=clip, noise_multiplier=sigma, seed=3)
    other = client.dp_sgd_update(model, x, y, max_grad_norm=clip, noise_multiplier=sigma, seed=4)
    _assert_close(noisy.update, again.update, 0)
    assert not torch.equal(noisy.update["1.weight"], other.update["1.weight"])
    noise = torch.cat([(noisy.update[n] - clean[n]).flatten() for n in clean])
    assert noise.numel() > 2500
    # N(0, (sigma * C)^2) on the sum, divided by b
    assert float(noise.std()) == pytest.approx(sigma * clip / 8, rel=0.1)
    assert abs(float(noise.mean())) < 0.1 * sigma * clip / 8
    assert 0 < noisy.epsilon < math.inf
    assert noisy.delta == 1e-5 and noisy.steps == 1 and noisy.noise_multiplier == sigma


def test_dp_epsilon_decreases_with_noise_and_grows_with_steps() -> None:
    model = mlp(SIZES)
    x, y = _batch(4)
    eps = [
        client.dp_sgd_update(
            model, x, y, max_grad_norm=1.0, noise_multiplier=s, sample_rate=0.01, steps=100
        ).epsilon
        for s in (0.7, 1.0, 2.0, 4.0)
    ]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == 4
    longer = client.dp_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
    assert longer > eps[1]


@pytest.mark.parametrize(("sigma", "rate", "steps"), [(1.0, 0.01, 100), (4.0, 0.01, 100)])
def test_dp_epsilon_agrees_with_opacus_accountant(sigma: float, rate: float, steps: int) -> None:
    """Equal to Opacus's default orders where their optimum is inside; tighter (never
    looser) where it is at their largest order."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_eps = accountant.get_epsilon(delta=1e-5)
    ours = client.dp_epsilon(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=1e-5)
    assert 0 < ours <= opacus_eps + 1e-12
    if sigma == 1.0:
        assert ours == pytest.approx(opacus_eps, rel=1e-12)


def test_dp_clipping_first_layer_rank_is_batch_size() -> None:
    model = mlp((64, 40, 10))
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(10, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (10,), generator=gen)
    dp = client.dp_sgd_update(model, x, y, max_grad_norm=0.05, noise_multiplier=0.0)
    assert _rank(dp.update["1.weight"]) == 10


def test_dp_runs_without_warnings() -> None:
    model = mlp(SIZES)
    x, y = _batch(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client.dp_sgd_update(model, x, y, max_grad_norm=1.0, noise_multiplier=1.0)


def test_dp_rejects_models_opacus_cannot_handle() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = _batch(4, classes=3)
    with pytest.raises(InputError, match="GroupNorm"):
        client.dp_sgd_update(model.double(), x, y, max_grad_norm=1.0, noise_multiplier=0.0)


def test_frozen_parameters_get_zeros_and_dropout_is_seeded() -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 6)
    ).double()
    model[1].bias.requires_grad_(False)
    x, y = _batch(5)
    names = [n for n, _ in model.named_parameters()]
    state = torch.get_rng_state()
    dp = client.dp_sgd_update(model, x, y, max_grad_norm=1.0, noise_multiplier=0.0, seed=1)
    delta = client.fedavg_update(model, x, y, epochs=2, batch_size=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for update in (dp.update, delta, client.fedsgd_update(model, x, y)):
        assert list(update) == names
        assert torch.equal(update["1.bias"], torch.zeros(12, dtype=torch.float64))
        assert float(update["1.weight"].abs().max()) > 0
    dp_again = client.dp_sgd_update(model, x, y, max_grad_norm=1.0, noise_multiplier=0.0, seed=1)
    _assert_close(dp_again.update, dp.update, 0)
    _assert_close(client.fedavg_update(model, x, y, epochs=2, batch_size=2, seed=1), delta, 0)


# --------------------------------------------------------------------------------------
# aggregation and checks


def test_aggregate_sums_and_equals_combined_sum_batch() -> None:
    model = mlp(SIZES)
    x, y = _batch(9)
    parts = [
        client.fedsgd_update(model, x[i : i + 3], y[i : i + 3], reduction="sum") for i in (0, 3, 6)
    ]
    total = client.aggregate(parts)
    _assert_close(total, {n: parts[0][n] + parts[1][n] + parts[2][n] for n in parts[0]}, 0)
    _assert_close(total, client.fedsgd_update(model, x, y, reduction="sum"), CLOSE)
    assert all(not torch.equal(total[n], parts[0][n]) for n in total)  # inputs not mutated


def test_aggregate_errors() -> None:
    model = mlp(SIZES)
    x, y = _batch(4)
    update = client.fedsgd_update(model, x, y)
    with pytest.raises(InputError, match="non-empty list"):
        client.aggregate([])
    with pytest.raises(InputError, match="non-empty list"):
        client.aggregate(update)
    missing = {n: g for n, g in update.items() if n != "3.bias"}
    with pytest.raises(InputError, match=r"missing \['3.bias'\]"):
        client.aggregate([update, missing])
    wrong = dict(update, **{"3.bias": torch.zeros(7, dtype=torch.float64)})
    with pytest.raises(InputError, match=r"3.bias: \(7,\)"):
        client.aggregate([update, wrong])
    with pytest.raises(InputError, match="dtype"):
        client.aggregate([update, {n: g.float() for n, g in update.items()}])


def test_check_update_messages() -> None:
    model = mlp(SIZES)
    good = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    client.check_update(model, good)
    bad = dict(good)
    del bad["1.bias"]
    bad["extra.weight"] = torch.zeros(2)
    bad["3.weight"] = torch.zeros(6, 11, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        client.check_update(model, bad)
    message = str(info.value)
    assert "missing ['1.bias']" in message
    assert "unexpected ['extra.weight']" in message
    assert "3.weight: expected (6, 12), found (6, 11)" in message
    assert "Pass the update" in message
    prefixed = {"_module." + n: g for n, g in good.items()}
    with pytest.raises(InputError, match="prefix"):
        client.check_update(model, prefixed)
    with pytest.raises(InputError, match="not tensors"):
        client.check_update(model, dict(good, **{"1.bias": [0.0] * 12}))  # type: ignore[dict-item]
    with pytest.raises(InputError, match="mapping"):
        client.check_update(model, list(good.values()))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_layer_truth_factors_the_layers_update(reduction: str) -> None:
    # columns @ inputs is the layer's FedSGD weight gradient, the model is untouched, and
    # an unknown layer name lists the linear layers there are
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, columns = client.layer_truth(model, "1", x, y, reduction=reduction)
    assert inputs.shape == (5, 12) and columns.shape == (7, 5)
    update = client.fedsgd_update(model, x, y, reduction=reduction)
    torch.testing.assert_close(columns @ inputs, update["1.weight"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(columns.sum(dim=1), update["1.bias"], rtol=1e-12, atol=1e-14)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(InputError, match=r"'fc9' is not a module.*\['1', '3'\]"):
        client.layer_truth(model, "fc9", x, y)
