"""Tests for spear.model: finding the attackable layer and the tail after it."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import assert_same_state, mlp, state_snapshot
from torch import nn

from spear.errors import InputError, NotAttackableError
from spear.model import find_target, guess_input_shape


class ViewNet(nn.Module):
    """Flattens with ``x.view(x.size(0), -1)`` inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


class FlattenFnNet(nn.Module):
    """Flattens with ``torch.flatten`` and uses ``nn.functional.relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.relu(self.body(torch.flatten(x, 1))))


class GeluFirstNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 20)
        self.act = nn.GELU()
        self.b = nn.Linear(20, 12)
        self.c = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.a(x.flatten(1)))
        return self.c(torch.relu(self.b(x)))


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    ).double()


def _x(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _check_tail(model: nn.Module, target_name: str, x: torch.Tensor) -> None:
    """``after`` maps the attacked layer's pre-activations to the model's output."""
    target = find_target(model)
    assert target.name == target_name
    layer = model.get_submodule(target_name)
    assert target.weight.shape == layer.weight.shape
    assert torch.equal(target.weight, layer.weight.detach())
    assert target.after is not None
    store = {}
    handle = layer.register_forward_hook(lambda _m, _i, o: store.setdefault("out", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    assert torch.allclose(target.after(store["out"].detach()), out, rtol=0, atol=1e-12)


def test_sequential_with_flatten() -> None:
    model = mlp((16, 12, 3))
    target = find_target(model)
    assert target.name == "1" and target.first
    _check_tail(model, "1", _x())


@pytest.mark.parametrize("cls", [ViewNet, FlattenFnNet])
def test_custom_forward_flattening(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().double()
    target = find_target(model)
    assert target.first
    assert target.name in ("fc1", "body")
    _check_tail(model, target.name, _x())


def test_smooth_first_layer_moves_to_the_next_relu_layer() -> None:
    torch.manual_seed(0)
    model = GeluFirstNet().double()
    target = find_target(model)
    assert target.name == "b" and not target.first
    assert any("a:" in e and "GELU" in e and "no exact zeros" in e for e in target.examined)
    _check_tail(model, "b", _x())


def test_conv_first_model_targets_the_first_linear_relu() -> None:
    model = conv_net()
    target = find_target(model)
    assert target.name == "3" and not target.first
    _check_tail(model, "3", _x())


def test_no_linear_relu_names_the_examined_layers() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(NotAttackableError) as err:
        find_target(model)
    msg = str(err.value)
    assert "1: Linear followed by Tanh" in msg and "3: Linear followed by" in msg
    assert "ReLU" in msg


def test_no_linear_at_all() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(NotAttackableError, match="no linear layer at all"):
        find_target(model)


def test_linear_used_twice_is_not_taken_as_relu_only() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)
            self.hid = nn.Linear(8, 6)
            self.top = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out(torch.relu(h) + h) + self.top(torch.relu(self.hid(x)))

    target = find_target(Skip().double())
    # fc's output also bypasses the ReLU: its gradient has no ReLU zeros
    assert target.name == "hid"


def test_find_target_does_not_modify_the_model() -> None:
    model = conv_net()
    before = state_snapshot(model)
    find_target(model)
    assert_same_state(model, before)


def test_guess_input_shape() -> None:
    assert guess_input_shape(784) == (1, 28, 28)
    assert guess_input_shape(3072) == (3, 32, 32)
    assert guess_input_shape(50) == (50,)


class ActivationNet(nn.Module):
    """``fc2(act(fc1(x)))`` with the activation given as a function of ``h``."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.act = act
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Clamp(nn.Module):
    """``h.clamp(*args, **kwargs)`` (a method call), or ``torch.clamp`` / ``torch.clamp_min``."""

    def __init__(self, how: str, *args: float | None, **kwargs: float | None) -> None:
        super().__init__()
        self.how, self.args, self.kwargs = how, args, kwargs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.how == "method":
            return h.clamp(*self.args, **self.kwargs)
        if self.how == "clamp_min":
            return torch.clamp_min(h, *self.args)
        return torch.clamp(h, *self.args, **self.kwargs)


@pytest.mark.parametrize(
    "act",
    [
        nn.LeakyReLU(0.0),
        Clamp("method", min=0),
        Clamp("method", 0.0),
        Clamp("function", 0),
        Clamp("function", min=0.0, max=None),
        Clamp("clamp_min", 0.0),
    ],
    ids=["leaky0", "method-kw", "method-pos", "function-pos", "function-kw", "clamp_min"],
)
def test_activations_that_are_max_of_h_and_zero_are_relus(act: nn.Module) -> None:
    net = ActivationNet(act)
    target = find_target(net)
    assert target.name == "fc1"
    assert target.after is not None
    h = torch.randn(5, 12)
    assert torch.allclose(target.after(h), net.fc2(h.relu()))


@pytest.mark.parametrize(
    "act",
    [nn.LeakyReLU(0.01), Clamp("method", 0, 6), Clamp("method", min=0.1), nn.ReLU6()],
    ids=["leaky", "clamp-0-6", "clamp-0.1", "relu6"],
)
def test_activations_other_than_max_of_h_and_zero_are_refused(act: nn.Module) -> None:
    with pytest.raises(NotAttackableError, match="fc1: Linear followed by"):
        find_target(ActivationNet(act))


def test_a_layer_given_as_a_number_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="layer='1'"):
        find_target(mlp((16, 12, 3), flatten=False), 1)  # type: ignore[arg-type]
