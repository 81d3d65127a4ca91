"""Models written in other people's ways: what ``spear.attack`` makes of them.

Each model is checked end to end against its batch: a reconstruction marked verified
must be the client's inputs, and a model the attack cannot serve gets a clear error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

import spear
from spear.errors import NotAttackableError
from spear.model import find_target

B = 8


def _update(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean cross-entropy gradient (``nll_loss`` where the model ends in log-probs)."""
    out = model(x)
    log_probs = getattr(model, "log_probs", False)
    loss = functional.nll_loss(out, y) if log_probs else functional.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {name: g for (name, _), g in zip(model.named_parameters(), grads, strict=True)}


def _batch(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 10, (B,), generator=g)


def _assert_verified_exact(
    rec: spear.Reconstruction, x: torch.Tensor, y: torch.Tensor, tol: float
) -> None:
    """``rec`` is verified, and its inputs within ``tol`` of ``x`` with the labels ``y``."""
    assert rec.verified
    match = spear.metrics.match(rec.inputs, x)
    assert match.max_abs_error.max() < tol
    assert rec.labels is not None
    assert torch.equal(rec.labels[match.rec_index], y[match.truth_index])


class TwoLayers(nn.Module):
    """``fc1`` (64 -> 200) and ``fc2`` (200 -> 10) in float64; subclasses say how the
    input reaches ``fc1`` and what follows its ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 200, dtype=torch.float64)
        self.fc2 = nn.Linear(200, 10, dtype=torch.float64)


class Selects(TwoLayers):
    """Uses only the first 64 of its 100 input columns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.relu(self.fc1(x[:, :64])))


class Permutes(TwoLayers):
    """Reorders its input columns before the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("order", torch.randperm(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.relu(self.fc1(x[:, self.order])))


class Unsqueezes(TwoLayers):
    """Indexes with full slices and ``None`` only: a view of every element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.relu(self.fc1(x[:, None, :].flatten(1))))


@pytest.mark.parametrize("cls", [Selects, Permutes])
def test_indexing_before_the_layer_makes_its_inputs_features(cls: type[nn.Module]) -> None:
    model = cls()
    x, y = _batch(100 if cls is Selects else 64)
    rec = spear.attack(model, _update(model, x, y), time_budget=20, progress=False)
    assert rec.feature_space and not rec.verified
    features = x[:, :64] if cls is Selects else x[:, model.order]
    assert spear.metrics.match(rec.inputs, features).max_abs_error.max() < 1e-10


def test_indexing_that_keeps_every_element_is_a_reshape() -> None:
    model = Unsqueezes()
    x, y = _batch(64)
    assert find_target(model).first
    rec = spear.attack(model, _update(model, x, y), time_budget=20, progress=False)
    assert rec.verified and not rec.feature_space
    assert spear.metrics.match(rec.inputs, x).max_abs_error.max() < 1e-10


class Functional(nn.Module):
    """A first layer applied with ``functional.linear`` on parameters named in its own way."""

    def __init__(self, weight_name: str, bias_name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.names = (weight_name, bias_name)
        setattr(self, weight_name, nn.Parameter(0.1 * torch.randn(200, 64, dtype=torch.float64)))
        setattr(self, bias_name, nn.Parameter(0.1 * torch.randn(200, dtype=torch.float64)))
        self.fc2 = nn.Linear(200, 10, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (getattr(self, n) for n in self.names)
        return self.fc2(functional.relu(functional.linear(x, weight, bias)))


class InDict(nn.Module):
    """The first layer's parameters in a ``ParameterDict`` under keys of its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p = nn.ParameterDict(
            {
                "weight": nn.Parameter(0.1 * torch.randn(200, 64, dtype=torch.float64)),
                "b": nn.Parameter(0.1 * torch.randn(200, dtype=torch.float64)),
            }
        )
        self.fc2 = nn.Linear(200, 10, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.relu(functional.linear(x, self.p["weight"], self.p["b"])))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Functional("first_weight", "first_bias"),
        lambda: Functional("w1", "b1"),
        InDict,
    ],
    ids=["first_weight", "w1", "parameter-dict"],
)
def test_parameters_are_read_under_their_own_names(make: type[nn.Module]) -> None:
    model = make()
    x, y = _batch(64)
    rec = spear.attack(model, _update(model, x, y), time_budget=20, progress=False)
    _assert_verified_exact(rec, x, y, 1e-10)


class BatchNormAfter(TwoLayers):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = functional.relu(self.fc1(x))
        return self.fc2(functional.batch_norm(hidden, None, None, training=True))


class DropoutAfter(TwoLayers):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = functional.relu(self.fc1(x))
        return self.fc2(functional.dropout(hidden, 0.5, training=self.training))


@pytest.mark.parametrize("cls", [BatchNormAfter, DropoutAfter])
def test_functional_batch_statistics_and_dropout_are_refused(cls: type[nn.Module]) -> None:
    model = cls()
    x, y = _batch(64)
    update = _update(model, x, y)
    with pytest.raises(NotAttackableError, match=r"batch_norm call|dropout call"):
        spear.attack(model, update, time_budget=20, progress=False)


class LogProbs(TwoLayers):
    """The classic MNIST form: ``LogSoftmax`` output, trained with ``nll_loss``."""

    log_probs = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.log_softmax(self.fc2(functional.relu(self.fc1(x))), dim=1)


def test_log_softmax_with_nll_loss_is_cross_entropy() -> None:
    model = LogProbs()
    x, y = _batch(64)
    rec = spear.attack(model, _update(model, x, y), time_budget=20, progress=False)
    _assert_verified_exact(rec, x, y, 1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_float64_model_with_a_float32_update(seed: int) -> None:
    """A client that computes in float64 and sends float32: exact to float32, verified."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 10)).double()
    x, y = _batch(64, seed=100 + seed)
    update = {k: v.float() for k, v in _update(model, x, y).items()}
    rec = spear.attack(model, update, time_budget=20, progress=False)
    _assert_verified_exact(rec, x, y, 1e-5)


def _clean_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 10)).double()
    x, y = _batch(64)
    return model, x, y


def test_a_batch_size_below_a_clear_rank_says_so() -> None:
    model, x, y = _clean_mlp()
    rec = spear.attack(model, _update(model, x, y), batch_size=3, time_budget=10, progress=False)
    assert not rec.verified
    assert any("shows 8 examples (a clear rank gap" in n for n in rec.notes)
    assert not any("the update is noisy" in n for n in rec.notes)


def test_a_batch_size_read_off_the_spectrum_is_not_called_given() -> None:
    model, x, y = _clean_mlp()
    gen = torch.Generator().manual_seed(0)
    update = {
        k: v + 1e-4 * v.abs().max() * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        for k, v in _update(model, x, y).items()
    }
    rec = spear.attack(model, update, time_budget=10, progress=False)
    assert rec.batch_size == B
    assert any("batch size 8 (from the spectrum" in n for n in rec.notes)
    assert not any("given" in n for n in rec.notes)


def test_an_example_the_layer_does_not_show_is_pointed_at() -> None:
    # under a sum reduction an example whose units are all off leaves no trace at the
    # attacked layer and none in the divisor: the certificate stays large and a note says why
    model, x, y = _clean_mlp()
    with torch.no_grad():
        model[0].bias.fill_(-0.05)
    x = x.clone()
    x[0] = 0.0
    out = model(x)
    grads = torch.autograd.grad(
        functional.cross_entropy(out, y, reduction="sum"), list(model.parameters())
    )
    update = {name: g for (name, _), g in zip(model.named_parameters(), grads, strict=True)}
    rec = spear.attack(model, update, time_budget=10, progress=False)
    assert not rec.verified and rec.batch_size == B - 1
    assert any("unexplained" in n and "does not show" in n for n in rec.notes)


def test_an_example_the_update_holds_no_trace_of_is_counted_against_a_given_batch_size() -> None:
    # a head without bias and a summed loss: an example that turns every unit of the layer
    # off changes neither the update nor the certificate, and only the batch size tells
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4, bias=False)).double()
    x = torch.randn(6, 20, dtype=torch.float64)
    with torch.no_grad():
        model[0].bias.copy_(-(model[0].weight @ x[0]) - 0.3)
    y = torch.randint(0, 4, (6,))
    grads = torch.autograd.grad(
        functional.cross_entropy(model(x), y, reduction="sum"), list(model.parameters())
    )
    update = {name: g for (name, _), g in zip(model.named_parameters(), grads, strict=True)}
    told = spear.attack(model, update, batch_size=6, time_budget=10, progress=False)
    assert not told.verified and not told.complete
    assert any("count 5 of the batch_size=6" in n for n in told.notes), told.notes
    others = spear.metrics.match(told.inputs, x[1:])  # the five it shows come back exact
    assert float(others.max_abs_error.max()) < 1e-10


@pytest.mark.parametrize("functional_relu", [False, True])
def test_an_in_place_relu_is_attacked(functional_relu: bool) -> None:
    class InPlace(TwoLayers):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(functional.relu(self.fc1(x), inplace=True))

    torch.manual_seed(0)
    model: nn.Module = (
        InPlace()
        if functional_relu
        else nn.Sequential(nn.Linear(64, 200), nn.ReLU(inplace=True), nn.Linear(200, 10)).double()
    )
    x, y = _batch(64)
    rec = spear.attack(model, _update(model, x, y), time_budget=20, progress=False)
    _assert_verified_exact(rec, x, y, 1e-10)


def test_a_float32_update_cast_to_float64_is_read_at_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 10))
    x, y = _batch(64)
    x = x.float()
    update = {k: v.double() for k, v in _update(model, x, y).items()}
    rec = spear.attack(model, update, time_budget=20, progress=False)
    _assert_verified_exact(rec, x, y, 1e-5)
    assert any("read at float32's precision" in n for n in rec.notes), rec.notes


def test_any_mapping_is_an_update() -> None:
    from types import MappingProxyType

    model, x, y = _clean_mlp()
    update = _update(model, x, y)
    rec = spear.attack(model, MappingProxyType(update), time_budget=20, progress=False)
    _assert_verified_exact(rec, x, y, 1e-10)
