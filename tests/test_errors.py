"""Clear errors at the public API's boundary: batch size, time budget, device, BatchNorm.

Each bad argument must raise :class:`spear.errors.InputError` (or
:class:`~spear.errors.NotAttackableError` for a model the attack cannot take) before any
work, with a message that says what was found and what to try; each accepted variant must
still give the exact answer.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from tests.conftest import (
    assert_exact,
    assert_same_state,
    fashion,
    fedsgd_update,
    layer_case,
    mlp,
    state_snapshot,
)
from torch import nn

import spear
from spear import validate
from spear.errors import InputError, NotAttackableError
from spear.model import batch_statistics_layers


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


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, math.nan, True, "0.5"])
def test_invert_layer_refuses_a_drop_probability_outside_zero_to_one(
    small_layer: dict[str, torch.Tensor], value: object
) -> None:
    with pytest.raises(InputError, match="strictly between 0 and 1") as err:
        spear.invert_layer(
            small_layer["weight_grad"],
            small_layer["bias_grad"],
            dropout=True,
            dropout_p=value,  # type: ignore[arg-type]
        )
    assert "dropout_p=0.5" in str(err.value)


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


# ---------------------------------------------------------------- BatchNorm


def _bn_model(place: str, *, train: bool, seed: int = 0) -> nn.Sequential:
    """A float64 MLP with a BatchNorm1d ``before`` the first linear layer, ``between`` it
    and its ReLU, or ``after`` its ReLU (before the second ReLU)."""
    torch.manual_seed(seed)
    if place == "before":
        layers = [nn.BatchNorm1d(784), nn.Linear(784, 160), nn.ReLU(), nn.Linear(160, 10)]
    elif place == "between":
        layers = [nn.Linear(784, 160), nn.BatchNorm1d(160), nn.ReLU(), nn.Linear(160, 10)]
    else:
        layers = [
            nn.Linear(784, 160),
            nn.ReLU(),
            nn.Linear(160, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 10),
        ]
    model = nn.Sequential(nn.Flatten(), *layers).double()
    with torch.no_grad():  # running statistics and an affine map that are not the identity
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    return model.train(train)


def test_batch_norm_in_training_mode_after_the_layer_is_refused_with_why_and_what_to_try() -> None:
    model = _bn_model("after", train=True)
    x, y = fashion(6, seed=2)
    with pytest.raises(NotAttackableError) as err:
        spear.attack(model, fedsgd_update(model, x, y))
    msg = str(err.value)
    assert "BatchNorm1d '4' normalises with the statistics of the batch" in msg
    assert "after the input of the attacked layer '1'" in msg
    assert "model.eval()" in msg and "spear.invert_layer" in msg


def test_batch_norm_in_training_mode_before_the_layer_gives_its_features_exactly() -> None:
    # the layer's inputs are the batch-normalised images, one vector per example: its
    # gradient keeps its exact structure, and the model after it is per example
    model = _bn_model("before", train=True)
    x, y = fashion(6, seed=2)
    update = fedsgd_update(model, x, y)
    state = state_snapshot(model)
    rec = spear.attack(model, update, time_budget=30.0)
    assert_same_state(model, state)
    assert rec.complete and rec.feature_space and rec.layer == "2"
    with torch.no_grad():  # the client's features: normalised with the whole batch
        features = copy.deepcopy(model)[:2](x)
    matching = assert_exact(rec.inputs, features)
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])
    assert any(
        "BatchNorm1d '1' normalises" in n and "before the attacked layer '2'" in n
        for n in rec.notes
    )


def test_batch_norm_in_training_mode_between_the_layer_and_its_relu_is_refused() -> None:
    model = _bn_model("between", train=True)
    x, y = fashion(6, seed=2)
    with pytest.raises(NotAttackableError, match="BatchNorm1d '2' normalises with the statistics"):
        spear.attack(model, fedsgd_update(model, x, y))


def test_batch_norm_after_the_relu_in_training_mode_the_layer_still_inverts() -> None:
    # what the error suggests: the attacked layer alone keeps its exact structure
    model = _bn_model("after", train=True)
    x, y = fashion(6, seed=2)
    update = fedsgd_update(model, x, y)
    result = spear.invert_layer(
        update["1.weight"],
        update["1.bias"],
        weight=model[1].weight.detach(),
        bias=model[1].bias.detach(),
        time_budget=30.0,
    )
    assert result.complete
    assert_exact(result.inputs, x.reshape(6, -1))


def test_certify_with_batch_norm_in_training_mode_recomputes_the_whole_batch() -> None:
    # per-example weights are not fitted: one example alone cannot be normalised with
    # the batch's statistics (BatchNorm1d refuses a batch of one in training mode)
    model = _bn_model("after", train=True)
    x, y = fashion(6, seed=2)
    update = fedsgd_update(model, x, y)
    assert spear.certify(model, update, x, y) < 1e-9
    assert spear.certify(model, update, x[:-1], y[:-1]) > 1e-3


def test_batch_norm_after_the_relu_in_eval_mode_is_attacked_exactly() -> None:
    model = _bn_model("after", train=False)
    x, y = fashion(6, seed=2)
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=30.0)
    assert rec.complete and rec.verified and not rec.feature_space
    matching = assert_exact(rec.inputs, x)
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])


def test_batch_norm_before_the_first_layer_in_eval_mode_gives_its_features() -> None:
    # an affine map per pixel: the attacked layer's inputs are the normalised images
    model = _bn_model("before", train=False)
    x, y = fashion(6, seed=2)
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=30.0)
    assert rec.complete and rec.feature_space and rec.layer == "2"
    with torch.no_grad():
        features = model[1](model[0](x))
    assert_exact(rec.inputs, features)


def test_batch_norm_between_the_layer_and_its_relu_names_the_fold() -> None:
    model = _bn_model("between", train=False)
    x, y = fashion(6, seed=2)
    update = fedsgd_update(model, x, y)
    with pytest.raises(NotAttackableError) as err:
        spear.attack(model, update)
    msg = str(err.value)
    assert "BatchNorm between the layer and its activation" in msg
    assert "s = gamma / sqrt(running_var + eps)" in msg
    # the fold the message describes recovers the inputs exactly
    linear, bn = model[1], model[2]
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    result = spear.invert_layer(
        update["1.weight"],
        update["1.bias"],
        weight=s[:, None] * linear.weight.detach(),
        bias=(s * (linear.bias - bn.running_mean) + bn.bias).detach(),
        time_budget=30.0,
    )
    assert result.complete
    assert_exact(result.inputs, x.reshape(6, -1))


def test_batch_norm_without_running_statistics_is_refused_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 40),
        nn.ReLU(),
        nn.Linear(40, 16),
        nn.BatchNorm1d(16, track_running_stats=False),
        nn.ReLU(),
        nn.Linear(16, 10),
    ).double()
    model.eval()
    x, y = fashion(3)
    with pytest.raises(NotAttackableError, match="BatchNorm1d '4'"):
        spear.attack(model, fedsgd_update(model, x, y))


def test_exported_program_with_batch_norm_in_training_mode_is_refused() -> None:
    model = _bn_model("after", train=True)
    x, y = fashion(4, seed=3)
    update = fedsgd_update(model, x, y)
    exported = torch.export.export(model, (x,)).module()
    with pytest.raises(NotAttackableError, match="batch_norm call"):
        spear.attack(exported, update)
    eval_model = _bn_model("after", train=False)
    eval_exported = torch.export.export(eval_model, (x,)).module()
    assert batch_statistics_layers(eval_exported) == []


# ---------------------------------------------------------------- update values


def _never_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the layer inversion fail the test if the attack reaches it."""
    import sys

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the search ran before the arguments were checked")

    monkeypatch.setattr(sys.modules["spear.attack"], "invert_layer", never)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["1.bias", "3.weight", "3.bias"])
def test_non_finite_entries_anywhere_in_the_update_are_named(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
    bad: float,
    name: str,
) -> None:
    model, update = small_attack
    x, y = fashion(3, seed=4)
    corrupt = {k: v.clone() for k, v in update.items()}
    corrupt[name].view(-1)[0] = bad
    with pytest.raises(InputError, match=rf"update\['{re.escape(name)}'\] contains 1 NaN"):
        spear.certify(model, corrupt, x, y)
    _never_search(monkeypatch)
    with pytest.raises(InputError, match="expected finite values"):
        spear.attack(model, corrupt)


def test_a_float8_update_is_refused_with_what_to_send(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]],
) -> None:
    model, update = small_attack
    float8 = {k: v.to(torch.float8_e4m3fn) for k, v in update.items()}
    with pytest.raises(InputError, match="float8, which spear does not support") as err:
        spear.attack(model, float8)
    assert "float32 or float64" in str(err.value)


# ---------------------------------------------------------------- seed, range, shape


@pytest.mark.parametrize("value", ["abc", 2**70, -1, 1.5, True])
def test_attack_refuses_a_seed_torch_cannot_take(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]], value: object
) -> None:
    model, update = small_attack
    with pytest.raises(InputError, match=r"seed must be an integer from 0 to 2\*\*63 - 1"):
        spear.attack(model, update, seed=value)  # type: ignore[arg-type]
    assert validate.seed(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize(
    ("value", "found"),
    [((1.0, 0.0), "low < high"), ((math.nan, 1.0), "low < high"), ("0,1", "pair")],
)
def test_attack_refuses_an_input_range_that_is_not_low_below_high(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]], value: object, found: str
) -> None:
    model, update = small_attack
    with pytest.raises(InputError, match=f"input_range must be .*{found}"):
        spear.attack(model, update, input_range=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((-28, -28), "positive integers"),
        ("784", "positive integers"),
        ((0,), "positive integers"),
        ((3, 7), "has 21 entries but layer '1' takes 784 features"),
    ],
)
def test_attack_checks_the_input_shape_before_the_search(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
    value: object,
    message: str,
) -> None:
    model, update = small_attack
    _never_search(monkeypatch)
    with pytest.raises(InputError, match=re.escape(message)):
        spear.attack(model, update, input_shape=value)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Dropout


def _dropout_model(*, train: bool) -> nn.Sequential:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 10)
    ).double()
    return model.train(train)


def test_dropout_in_training_mode_is_refused_with_model_eval() -> None:
    x, y = fashion(3, seed=4)
    update = fedsgd_update(_dropout_model(train=False), x, y)
    with pytest.raises(NotAttackableError, match=r"Dropout '3' drops random units") as err:
        spear.attack(_dropout_model(train=True), update)
    assert "model.eval()" in str(err.value)
    exported = torch.export.export(_dropout_model(train=True), (x,)).module()
    with pytest.raises(NotAttackableError, match="dropout call"):
        spear.attack(exported, update)
    rec = spear.attack(_dropout_model(train=False), update)
    assert rec.verified
    assert_exact(rec.inputs.reshape(3, -1), x.reshape(3, -1))


def test_an_update_computed_with_dropout_active_is_read_with_its_masks() -> None:
    # the client trains with dropout on (random masks on the layer's output gradients);
    # the server runs the model in eval mode, as the refusal above asks
    torch.manual_seed(5)
    client = _dropout_model(train=True)
    x, y = fashion(6, seed=4)
    update = fedsgd_update(client, x, y)
    rec = spear.attack(_dropout_model(train=False), update, time_budget=10.0)
    # the examples are certified; with half of 40 units dropped the logits see the layer
    # through fewer dimensions than 10 classes need, so the labels are not
    assert rec.complete and rec.examples_verified and not rec.verified
    assert any("Dropout '3' (p = 0.5) active" in n for n in rec.notes)
    matching = assert_exact(rec.inputs.reshape(6, -1), x.reshape(6, -1))
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])
    # the same client with dropout off: attacked exactly, and no such note
    clean = spear.attack(_dropout_model(train=False), fedsgd_update(client.eval(), x, y))
    assert clean.complete and clean.verified
    assert not any("active" in n for n in clean.notes)


# ---------------------------------------------------------------- certify's candidates


def test_certify_reads_nested_lists_in_the_models_dtype_and_refuses_bool_labels(
    small_attack: tuple[nn.Module, dict[str, torch.Tensor]],
) -> None:
    model, update = small_attack
    x, y = fashion(3, seed=4)
    assert spear.certify(model, update, x.tolist(), y.tolist()) < 1e-12
    with pytest.raises(InputError, match=r"integer class indices, found dtype torch\.bool"):
        spear.certify(model, update, x, y > 0)


def test_a_state_dict_difference_is_read_without_its_buffers() -> None:
    # a FedAvg delta taken between two state dicts holds the BatchNorm's running
    # statistics and step count too: no parameters' update, left out with a note
    model = _bn_model("after", train=False)
    x, y = fashion(6, seed=2)
    update = fedsgd_update(model, x, y)
    with_buffers = {**update, **{k: torch.zeros_like(v) for k, v in model.named_buffers()}}
    assert "4.num_batches_tracked" in with_buffers
    rec = spear.attack(model, with_buffers, time_budget=30.0)
    assert rec.complete and rec.verified
    assert any("3 entries of the update are the model's buffers" in n for n in rec.notes)
    assert spear.certify(model, with_buffers, x, y) < 1e-9
