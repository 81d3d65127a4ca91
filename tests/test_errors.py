"""Clear errors at the public API's boundary: batch size, time budget, device.

Each bad argument must raise :class:`spear.errors.InputError` before any work, with a
message that says what was found and what to try; each accepted variant must still give
the exact answer.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import fashion, fedsgd_update, layer_case, mlp
from torch import nn

import spear
from spear import validate
from spear.errors import InputError


@pytest.fixture(scope="module")
def small_attack() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = mlp((784, 40, 10), seed=4)
    x, y = fashion(3, seed=4)
    return model, fedsgd_update(model, x, y)


@pytest.fixture(scope="module")
def small_layer() -> dict[str, torch.Tensor]:
    case = layer_case(30, 12, 4, seed=5)
    return {
        "weight_grad": case.weight_grad,
        "bias_grad": case.bias_grad,
        "weight": case.weight,
        "bias": case.bias,
    }


# ---------------------------------------------------------------- batch size


BAD_BATCH_SIZES = [(-3, "found -3"), (0, "found 0"), (2.5, "found 2.5 (float)"), (True, "bool")]


@pytest.mark.parametrize(("value", "shown"), BAD_BATCH_SIZES)
def test_attack_refuses_a_batch_size_that_is_not_a_positive_integer(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]], value: object, shown: str
) -> None:
    model, update = small_attack
    with pytest.raises(InputError, match="batch_size must be a positive integer") as err:
        spear.attack(model, update, batch_size=value)  # type: ignore[arg-type]
    assert shown in str(err.value) and "None to read it off the update" in str(err.value)


@pytest.mark.parametrize(("value", "shown"), BAD_BATCH_SIZES)
def test_invert_layer_refuses_a_batch_size_that_is_not_a_positive_integer(
    small_layer: dict[str, torch.Tensor], value: object, shown: str
) -> None:
    grads = small_layer
    with pytest.raises(InputError, match="batch_size must be a positive integer") as err:
        spear.invert_layer(
            grads["weight_grad"],
            grads["bias_grad"],
            batch_size=value,  # type: ignore[arg-type]
        )
    assert shown in str(err.value)


def test_integer_scalars_are_accepted_as_batch_size(small_layer: dict[str, torch.Tensor]) -> None:
    np = pytest.importorskip("numpy")
    assert validate.batch_size(np.int64(4)) == 4
    assert validate.batch_size(torch.tensor(4)) == 4
    grads = small_layer
    result = spear.invert_layer(
        grads["weight_grad"],
        grads["bias_grad"],
        weight=grads["weight"],
        bias=grads["bias"],
        batch_size=np.int64(4),
        time_budget=20.0,
    )
    assert result.batch_size == 4 and result.complete


# ---------------------------------------------------------------- time budget


@pytest.mark.parametrize("value", [math.nan, -1.0, 0, 0.0, -math.inf])
def test_attack_and_invert_layer_refuse_nan_negative_and_zero_budgets(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]],
    small_layer: dict[str, torch.Tensor],
    value: float,
) -> None:
    model, update = small_attack
    with pytest.raises(InputError, match="time_budget must be a finite number of seconds"):
        spear.attack(model, update, time_budget=value)
    with pytest.raises(InputError, match="time_budget must be a finite number of seconds"):
        spear.invert_layer(small_layer["weight_grad"], small_layer["bias_grad"], time_budget=value)


def test_an_infinite_budget_is_refused_with_what_to_pass_instead(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]],
    small_layer: dict[str, torch.Tensor],
) -> None:
    model, update = small_attack
    with pytest.raises(InputError, match="found inf") as err:
        spear.attack(model, update, time_budget=math.inf)
    assert "large finite number" in str(err.value)
    with pytest.raises(InputError, match="found inf"):
        spear.invert_layer(
            small_layer["weight_grad"], small_layer["bias_grad"], time_budget=math.inf
        )


def test_a_budget_must_be_a_number() -> None:
    with pytest.raises(InputError, match=r"found '60' \(str\)"):
        validate.time_budget("60")
    with pytest.raises(InputError, match="found True"):
        validate.time_budget(True)
    assert validate.time_budget(3) == 3.0


# ---------------------------------------------------------------- device


def test_cuda_without_cuda_says_so_and_what_to_use(
    monkeypatch: pytest.MonkeyPatch,
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]],
    small_layer: dict[str, torch.Tensor],
) -> None:
    # as on a CPU-only torch build, whatever this machine has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, update = small_attack
    for call in (
        lambda: spear.attack(model, update, device="cuda"),
        lambda: spear.invert_layer(
            small_layer["weight_grad"], small_layer["bias_grad"], device="cuda:0"
        ),
    ):
        with pytest.raises(InputError, match="CUDA is not available") as err:
            call()
        msg = str(err.value)
        assert "device='cpu'" in msg and "CUDA build" in msg


def test_unknown_device_names_are_refused(small_layer: dict[str, torch.Tensor]) -> None:
    with pytest.raises(InputError, match="device='gpu' is not a device torch knows"):
        spear.invert_layer(small_layer["weight_grad"], small_layer["bias_grad"], device="gpu")
    with pytest.raises(InputError, match=r"found 0 \(int\)"):
        validate.device(0)
    assert validate.device("cpu") == torch.device("cpu")
    assert validate.device(None) is None
