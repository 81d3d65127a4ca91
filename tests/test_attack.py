"""End-to-end tests of spear.attack, the labels and the certificate on real images."""

from __future__ import annotations

import time

import pytest
import torch
from tests.conftest import (
    EXACT,
    assert_exact,
    assert_same_state,
    fashion,
    fashion_by_class,
    fedsgd_update,
    layer_io,
    match_rows,
    mlp,
    state_snapshot,
)
from torch import nn

import spear
from spear.certificate import VERIFIED_BELOW
from spear.data import builtin_images
from spear.errors import BatchTooLargeError, InputError, NotAttackableError

SIZES = (784, 256, 128, 10)


def _check_full(rec: spear.Reconstruction, x: torch.Tensor, y: torch.Tensor) -> None:
    b = x.shape[0]
    assert rec.complete and rec.batch_size == b, rec.notes
    assert not rec.feature_space
    assert rec.inputs.shape == x.shape
    matching = assert_exact(rec.inputs, x)
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])
    assert rec.certificate is not None and rec.certificate < 1e-9
    assert rec.verified


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_attack_fashion_mnist_mlp(reduction: str) -> None:
    model = mlp(SIZES, seed=0)
    x, y = fashion(16, seed=1)
    update = fedsgd_update(model, x, y, reduction)
    before = state_snapshot(model)
    rec = spear.attack(model, update, time_budget=60.0)
    assert_same_state(model, before)
    _check_full(rec, x, y)
    assert rec.layer == "1"
    assert any(reduction in note for note in rec.notes if "reduction" in note), rec.notes
    # the layer result's gradient columns are the true ones
    true_in, true_g = layer_io(model, model[1], x, y, reduction)
    lr = rec.layer_result
    assert lr is not None
    m = match_rows(lr.inputs, true_in)
    g = lr.output_grads[:, m.rec_index]
    assert float((g - true_g[:, m.truth_index]).abs().max()) < EXACT * float(true_g.abs().max())


def test_attack_label_homogeneous_batch() -> None:
    model = mlp(SIZES, seed=2)
    x, y = fashion_by_class(3, 10)
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=60.0)
    _check_full(rec, x, y)
    assert bool((rec.labels == 3).all())


def test_attack_batch_larger_than_the_number_of_classes() -> None:
    model = mlp(SIZES, seed=3)
    x, y = fashion(24, seed=3)
    t0 = time.perf_counter()
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=60.0)
    elapsed = time.perf_counter() - t0
    _check_full(rec, x, y)
    assert elapsed < 60.0


def test_attack_trained_weights() -> None:
    model = mlp(SIZES, seed=4)
    train_x, train_y = fashion(64, seed=4, offset=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(5):
        sl = slice(16 * (step % 4), 16 * (step % 4) + 16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x[sl]), train_y[sl]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    x, y = fashion(12, seed=4, offset=0)
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=60.0)
    _check_full(rec, x, y)


def test_attack_duplicates_reports_multiplicity() -> None:
    model = mlp(SIZES, seed=5)
    distinct, labels = fashion(6, seed=5)
    x = torch.cat([distinct, distinct[:1]])
    y = torch.cat([labels, labels[:1]])
    rec = spear.attack(model, fedsgd_update(model, x, y), batch_size=7, time_budget=60.0)
    assert rec.complete and rec.batch_size == 6
    matching = assert_exact(rec.inputs, distinct)
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], labels[matching.truth_index])
    assert any("duplicate" in note and "2 times" in note for note in rec.notes), rec.notes
    # duplicates counted twice reproduce the update
    assert rec.certificate is not None and rec.certificate < 1e-9
    # one row per example of the batch: the repeated image twice, the others once
    assert rec.multiplicity is not None
    twice = matching.rec_index[matching.truth_index == 0]
    expected = torch.ones(6, dtype=torch.int64)
    expected[twice] = 2
    assert torch.equal(rec.multiplicity, expected)
    batch = torch.repeat_interleave(rec.inputs, rec.multiplicity, dim=0)
    assert_exact(batch, x)


@pytest.mark.parametrize("factor", [1e6, 1e18, 1e30])
def test_a_scaled_update_reports_no_copies(factor: float) -> None:
    # a gradient scaled by a large factor reads, under a sum, as every example counted
    # `factor / 8` times: as much a scaled sum as copies, and past 1e10 no whole count at
    # all (at 1e30 the int64 cast once overflowed to negative counts)
    model = mlp(SIZES, seed=5)
    x, y = fashion(8, seed=5)
    update = {k: v * factor for k, v in fedsgd_update(model, x, y).items()}
    rec = spear.attack(model, update, time_budget=60.0)
    assert rec.multiplicity is not None
    assert torch.equal(rec.multiplicity, torch.ones_like(rec.multiplicity)), rec.multiplicity
    assert not any("duplicates in the batch" in note for note in rec.notes), rec.notes
    assert any("scaled by a learning rate" in note for note in rec.notes), rec.notes
    assert rec.batch_size == 8
    assert_exact(rec.inputs, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_batch_larger_than_the_layer_is_refused_not_read_as_noise(
    dtype: torch.dtype,
) -> None:
    # 16 examples through 8 units, all live: every one of the update's 8 singular values
    # is clear of rounding; the spectrum's "noise band" would be its last value alone
    x, y = builtin_images(16).images, builtin_images(16).labels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
    model = model.to(dtype)
    update = fedsgd_update(model, x.to(dtype), y)
    with pytest.raises(BatchTooLargeError, match="full rank 8"):
        spear.attack(model, update, time_budget=10)


class _Normalised(nn.Module):
    """``fc2(relu(fc1((x - 0.5) / 0.25)))``: the first linear layer sees no model input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 200)
        self.fc2 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(((x - 0.5) / 0.25).flatten(1))))


def test_a_first_layer_behind_a_normalisation_is_named_as_such() -> None:
    torch.manual_seed(0)
    model = _Normalised().double()
    x, y = fashion(8, seed=2)
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=10, image_budget=0)
    assert rec.feature_space
    assert any("the first linear layer, but the model's inputs reach it" in n for n in rec.notes)
    assert not any("could not be" in n for n in rec.notes), rec.notes
    assert_exact(rec.inputs, ((x - 0.5) / 0.25).flatten(1))


def test_one_input_with_two_labels_leaves_the_others_recovered() -> None:
    # an input sent twice with two labels is one row of the update with the sum of two
    # cross-entropy columns (no example's): the other six are examples of a mean over 8,
    # more than the update's rank 7, so a lone row is certified only once two examples
    # have shown that divisor, and the rows it kept out must be scanned again then
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 5)).double()
    x = torch.randn(8, 30, dtype=torch.float64)
    x[1] = x[0]
    y = torch.randint(0, 5, (8,))
    y[0], y[1] = 0, 3
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=10)
    assert not rec.verified and not rec.complete
    matching = spear.metrics.match(rec.inputs, x[1:])
    exact = matching.max_abs_error <= EXACT * float(x.abs().max())
    assert int(exact.sum()) == 6, matching.max_abs_error


@pytest.mark.parametrize("batch_size", [None, 7, 8])
def test_examples_a_hair_apart_are_not_verified_as_one_counted_twice(
    batch_size: int | None,
) -> None:
    # two examples 1e-5 apart (one label, one ReLU pattern): their mean counted twice
    # reproduces the update to about the square of that distance (6e-12, far below the
    # certificate's threshold), yet it is 2e-6 of the batch's scale off both; the update's
    # 8th singular value (9e-13 of the first) stands 4000 times above float64's roundoff,
    # so the update shows 8 examples and an answer of 7 is not exact
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 5)).double()
    x = torch.randn(8, 30, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    x[1] = x[0] + 1e-5 * torch.randn(30, dtype=torch.float64)
    y[1] = y[0]
    rec = spear.attack(model, fedsgd_update(model, x, y), batch_size=batch_size, time_budget=10)
    assert not rec.verified, rec.notes
    assert any("the update shows 8 examples above its rounding" in n for n in rec.notes)
    scale = float(x.abs().max())
    matching = spear.metrics.match(rec.inputs, x)
    exact = matching.max_abs_error <= EXACT * scale
    assert int(exact.sum()) >= 6  # the six examples apart from the pair come back exact


@pytest.mark.parametrize("distance", [1e-5, 3e-6])
@pytest.mark.parametrize("copied", [4, 2])
def test_near_copies_of_images_are_not_verified_as_their_means(
    distance: float, copied: int
) -> None:
    # float64 Fashion-MNIST batch of 8 in which `copied` images appear twice, the copy
    # shifted by `distance` on every pixel: the pairs' means reproduce the update to about
    # distance^2, but each is distance / 2 off both images (above the 1e-6 exactness).
    # The pairs leave singular values of 3e-13 to 3e-12 of the first, in a roundoff band
    # (3e-15 to 5e-15) that itself reaches above the 10-eps floor
    images = builtin_images(8).images.double()
    labels = builtin_images(8).labels
    x = torch.cat([images[: 8 - copied], images[:copied] + distance])
    y = torch.cat([labels[: 8 - copied], labels[:copied]])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))
    model = model.double()
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=30)
    matching = spear.metrics.match(rec.inputs.flatten(1), x.flatten(1))
    all_exact = rec.inputs.shape[0] == 8 and bool(
        (matching.max_abs_error <= 1e-6 * matching.scale).all()
    )
    assert all_exact or not rec.verified, (rec.batch_size, rec.notes)


def test_unequal_loss_weights_are_not_reported_as_copies() -> None:
    # two clients' mean-reduced gradients summed (batches of 2 and 4): the first client's
    # examples weigh twice the others', which no plain mean or sum over one batch gives;
    # class weights give whole-number weights that a batch with copies gives as well
    model = mlp(SIZES, seed=6)
    x, y = fashion(6, seed=6)
    first, second = fedsgd_update(model, x[:2], y[:2]), fedsgd_update(model, x[2:], y[2:])
    summed = {k: first[k] + second[k] for k in first}
    rec = spear.attack(model, summed, time_budget=60.0)
    assert rec.complete and rec.batch_size == 6
    assert_exact(rec.inputs, x)
    assert not any("duplicates in the batch" in note for note in rec.notes), rec.notes
    assert any("relative weights, not copies" in note for note in rec.notes), rec.notes

    weights = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    x4, y4 = x[:4], torch.tensor([0, 1, 2, 3])
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x4), y4, weight=weights.to(x4.dtype)).backward()
    weighted = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    rec = spear.attack(model, weighted, time_budget=60.0)
    assert_exact(rec.inputs, x4)
    note = next(n for n in rec.notes if "duplicates in the batch" in n)
    assert "loss weights" in note


def test_partial_labels_still_read_a_mean() -> None:
    # two of four examples recovered: their divisors are the mean's 4, which counts the
    # two missing examples as well; that is a plain mean, not clipping or noise
    from spear.labels import recover_labels

    torch.manual_seed(0)
    layer, head = nn.Linear(20, 100).double(), nn.Linear(100, 10).double()
    x = torch.rand(4, 20, dtype=torch.float64)
    y = torch.tensor([1, 3, 5, 7])
    pre = layer(x).detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(head(torch.relu(pre)), y)
    (cols,) = torch.autograd.grad(loss, pre)  # (4, 100)

    def after(z: torch.Tensor) -> torch.Tensor:
        return head(torch.relu(z))

    w, b = layer.weight.detach(), layer.bias.detach()
    partial = recover_labels(after, w, b, x[:2], cols[:2].T, missing=2)
    assert partial.reduction == "mean" and partial.labels.tolist() == [1, 3]
    assert not any("do not fit" in note for note in partial.notes)
    # without the missing examples counted, two divisors of 4 fit no plain mean of two
    alone = recover_labels(after, w, b, x[:2], cols[:2].T)
    assert alone.reduction == "unknown"


# ---------------------------------------------------------------- other layers


class ConvFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 5, stride=3)
        self.fc = nn.Linear(2 * 8 * 8, 200)
        self.out = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.fc(h)))


class GeluFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(784, 100)
        self.b = nn.Linear(100, 200)
        self.c = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.a(x.flatten(1)))
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize(("cls", "layer"), [(ConvFirst, "fc"), (GeluFirst, "b")])
def test_attack_deeper_layer_gives_exact_features(cls: type[nn.Module], layer: str) -> None:
    torch.manual_seed(0)
    model = cls().double()
    x, y = fashion(8, seed=6)
    update = fedsgd_update(model, x, y)
    before = state_snapshot(model)
    # the features only: images from them are tested in tests/test_images.py
    rec = spear.attack(model, update, time_budget=30.0, image_budget=0)
    assert_same_state(model, before)
    assert rec.layer == layer and rec.feature_space
    assert rec.complete and rec.batch_size == 8
    assert any("features entering it" in note for note in rec.notes), rec.notes
    true_features, _ = layer_io(model, model.get_submodule(layer), x, y)
    assert rec.inputs.shape == true_features.shape
    assert_exact(rec.inputs, true_features)


def test_attack_layer_without_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 200, bias=False), nn.ReLU(), nn.Linear(200, 10)
    ).double()
    x, y = fashion(4, seed=7)
    rec = spear.attack(model, fedsgd_update(model, x, y), time_budget=20.0)
    assert rec.labels is None and rec.certificate is None and not rec.verified
    assert any("no bias" in note for note in rec.notes)
    assert rec.batch_size == 4


# ---------------------------------------------------------------- errors


def test_update_with_missing_extra_and_misshaped_keys() -> None:
    model = mlp((784, 30, 10))
    x, y = fashion(3)
    update = fedsgd_update(model, x, y)
    bad = dict(update)
    del bad["3.bias"]
    bad["extra.weight"] = torch.zeros(2)
    bad["1.weight"] = bad["1.weight"].T
    with pytest.raises(InputError) as err:
        spear.attack(model, bad)
    msg = str(err.value)
    assert "missing ['3.bias']" in msg
    assert "unexpected ['extra.weight']" in msg
    assert "1.weight: expected (30, 784), found (784, 30)" in msg


def test_model_without_linear_relu() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.Tanh(), nn.Linear(20, 10)).double()
    x, y = fashion(3)
    with pytest.raises(NotAttackableError) as err:
        spear.attack(model, fedsgd_update(model, x, y))
    msg = str(err.value)
    assert "1: Linear followed by Tanh" in msg and "3:" in msg


def test_attack_unknown_solver_name() -> None:
    model = mlp((784, 200, 10))
    x, y = fashion(4)
    with pytest.raises(InputError, match="'nope'"):
        spear.attack(model, fedsgd_update(model, x, y), solver="nope")


# ---------------------------------------------------------------- certificate


@pytest.fixture(scope="module")
def certified_case() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    model = mlp((784, 64, 32, 10), seed=8)
    x, y = fashion(10, seed=8)
    return model, fedsgd_update(model, x, y), x, y


def test_certificate_of_the_truth_is_tiny(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    before = state_snapshot(model)
    assert spear.certify(model, update, x, y) < 1e-9
    assert_same_state(model, before)
    # order does not matter
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert spear.certify(model, update, x[perm], y[perm]) < 1e-9


def test_certificate_rejects_one_example_off_by_one_percent(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    noisy = x.clone()
    gen = torch.Generator().manual_seed(1)
    noisy[4] += 0.01 * x[4].abs().max() * torch.randn(x[4].shape, generator=gen, dtype=x.dtype)
    cert = spear.certify(model, update, noisy, y)
    assert cert > 1e3 * VERIFIED_BELOW[torch.float64]


def test_certificate_rejects_swapped_labels(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    i, j = 0, int(torch.nonzero(y != y[0])[0])
    swapped = y.clone()
    swapped[i], swapped[j] = y[j], y[i]
    assert spear.certify(model, update, x, swapped) > 1e-2


def test_certificate_rejects_a_missing_example(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    assert spear.certify(model, update, x[:-1], y[:-1]) > 1e-3
    assert spear.certify(model, update, x[:0], y[:0]) == float("inf")


def test_certificate_input_errors(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    with pytest.raises(InputError, match="10 examples but labels 9"):
        spear.certify(model, update, x, y[:-1])


def test_certificate_accepts_numpy_arrays(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    assert spear.certify(model, update, x.numpy(), y.numpy()) < 1e-9
    off = x.clone()
    off[0] += 0.01
    assert spear.certify(model, update, off.numpy(), y.numpy()) > 1e-3
    with pytest.raises(InputError, match="10 examples but labels 9"):
        spear.certify(model, update, x.numpy(), y.numpy()[:-1])
    with pytest.raises(InputError, match=r"torch\.as_tensor"):
        spear.certify(model, update, x, "cat")


def test_certificate_accepts_exact_one_hot_labels(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    one_hot = nn.functional.one_hot(y, 10)
    assert spear.certify(model, update, x, one_hot) < 1e-9
    assert spear.certify(model, update, x, one_hot.double().numpy()) < 1e-9
    # the rows are read, not ignored: a wrong one-hot label gives a large error
    wrong = one_hot.roll(1, dims=1)
    assert spear.certify(model, update, x, wrong) > 1e-2


def test_certificate_refuses_soft_and_misshaped_one_hot_labels(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    soft = torch.full((10, 10), 0.1, dtype=torch.float64)
    with pytest.raises(InputError, match="exact one-hot rows") as err:
        spear.certify(model, update, x, soft)
    assert "argmax" in str(err.value)
    with pytest.raises(InputError, match="12 columns but the model has 10 outputs"):
        spear.certify(model, update, x, nn.functional.one_hot(y, 12))
    with pytest.raises(InputError, match="shape"):
        spear.certify(model, update, x, y.reshape(10, 1, 1))


def test_certificate_refuses_labels_outside_the_classes(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    shifted = y + 1
    shifted[0] = 10  # one past the last class
    with pytest.raises(InputError, match=r"in \[0, 10\) for a model with 10 outputs") as err:
        spear.certify(model, update, x, shifted)
    assert "subtract 1" in str(err.value)
    with pytest.raises(InputError, match="from -1 to"):
        spear.certify(model, update, x, y - 1 - y.min())
    with pytest.raises(InputError, match=r"non-integer values \(e\.g\. \d+\.5\)"):
        spear.certify(model, update, x, y.double() + 0.5)
    # integral floats are class indices
    assert spear.certify(model, update, x, y.double()) < 1e-9


def test_certificate_refuses_inputs_the_model_cannot_take(certified_case) -> None:  # type: ignore[no-untyped-def]
    model, update, x, y = certified_case
    rgb = torch.zeros(10, 3, 28, 28, dtype=torch.float64)
    with pytest.raises(InputError, match=r"inputs of shape \(10, 3, 28, 28\)") as err:
        spear.certify(model, update, rgb, y)
    msg = str(err.value)
    assert "takes 784 features per example" in msg and "(k, 1, 28, 28)" in msg
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="1 NaN or infinite"):
        spear.certify(model, update, bad, y)
    with pytest.raises(InputError, match=r"torch\.nn\.Module"):
        spear.certify(update, update, x, y)  # type: ignore[arg-type]


def test_attack_named_deeper_layer_gives_its_exact_features_and_labels() -> None:
    """``layer="3"`` on ``784 -> 300 -> ReLU -> 200 -> ReLU -> 10``: the features entering
    the second layer (the first layer's ReLU outputs) come back exact, with the labels."""
    model = mlp((784, 300, 200, 10), seed=1)
    x, y = fashion(8, seed=2)
    update = fedsgd_update(model, x, y)
    rec = spear.attack(model, update, layer="3", time_budget=60.0, image_budget=0)
    assert rec.layer == "3" and rec.feature_space and rec.images is None
    assert any("as asked" in note for note in rec.notes), rec.notes
    assert rec.complete and rec.batch_size == 8
    true_features, _ = layer_io(model, model.get_submodule("3"), x, y)
    assert_exact(rec.inputs, true_features)
    assert rec.labels is not None
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())


@pytest.mark.parametrize("layer", ["5", "nope"])
def test_attack_named_layer_must_be_linear_followed_by_relu(layer: str) -> None:
    model = mlp((784, 300, 200, 10), seed=1)
    x, y = fashion(4, seed=2)
    with pytest.raises(NotAttackableError, match=f"layer '{layer}' is not a linear layer"):
        spear.attack(model, fedsgd_update(model, x, y), layer=layer)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_missing_labels_from_the_head_less_the_recovered_examples(reduction: str) -> None:
    """The head's bias gradient less the recovered examples' exact terms leaves the
    missing examples' labels, also where counting the whole batch gets them wrong."""
    from spear.baselines.labels import infer_labels
    from spear.labels import LabelResult, missing_labels

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    x = torch.rand(12, 20, dtype=torch.float64)
    y = torch.tensor([7, 7, 7, 7, 7, 2, 2, 9, 1, 1, 4, 0])
    loss = nn.functional.cross_entropy(model(x), y, reduction=reduction)
    update = dict(
        zip(
            (n for n, _ in model.named_parameters()),
            torch.autograd.grad(loss, list(model.parameters())),
            strict=True,
        )
    )
    k = 9
    divisor = torch.full((k,), 12.0 if reduction == "mean" else 1.0, dtype=torch.float64)
    found = LabelResult(
        y[:k],
        divisor,
        torch.zeros(k, dtype=torch.float64),
        reduction,
        torch.ones(k, dtype=torch.int64),
        torch.ones(k, dtype=torch.int64),
        1e-6,
    )
    after = model[1:]
    read = missing_labels(model, update, after, model[0].weight, model[0].bias, x[:k], found, 3)
    assert read is not None and sorted(read.tolist()) == sorted(y[k:].tolist())
    # a found result whose labels are not exact gives no terms to subtract
    found.fit_error[0] = 1.0
    assert (
        missing_labels(model, update, after, model[0].weight, model[0].bias, x[:k], found, 3)
        is None
    )
    # counting the whole batch over-counts the frequent class: less the found labels,
    # it leaves [7, 7, 7]
    whole = infer_labels(model, update, batch_size=12).labels
    assert whole is not None
    left = whole.tolist()
    for label in y[:k].tolist():
        if label in left:
            left.remove(label)
    assert sorted(left) != sorted(y[k:].tolist())


def test_a_model_taking_flat_inputs_is_attacked_without_input_shape() -> None:
    # no Flatten: the model takes (b, 784), so the image shape 784 suggests is not used
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).double()
    x, y = fashion(8, seed=3)
    flat = x.reshape(8, -1)
    rec = spear.attack(model, fedsgd_update(model, flat, y), time_budget=30.0)
    assert rec.inputs.shape == (8, 784)
    assert rec.verified
    assert_exact(rec.inputs, flat)


def test_examples_whose_gradients_vanish_leave_the_batch_incomplete() -> None:
    # inputs scaled by 1e3: three examples are classified with probability exactly 1, so
    # their gradients are zero and the update's rank shows 13 of 16; the mean's divisor
    # still counts 16, so the result must not claim a complete, verified batch
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).double()
    data = builtin_images(316)
    x, y = data.images[300:316].reshape(16, -1) * 1e3, data.labels[300:316]
    rec = spear.attack(model, fedsgd_update(model, x, y), input_shape=(784,), time_budget=30.0)
    shown = rec.inputs.shape[0]
    assert shown < 16
    assert rec.batch_size == 16 and not rec.complete
    assert not rec.verified and not rec.examples_verified
    assert any(f"mean over 16 examples and the update shows {shown}" in n for n in rec.notes)


def test_most_divisors_count_examples_the_update_does_not_show() -> None:
    # float32: one small gradient's divisor is rounded beyond the fit tolerance, so no
    # plain mean is read; the others still say the mean is over 16 examples, 14 shown
    from spear.labels import _interpret

    divisor = torch.tensor([16.0] * 13 + [15.996], dtype=torch.float64)
    k = divisor.numel()
    result = _interpret(
        torch.zeros(k, dtype=torch.int64),
        divisor,
        torch.zeros(k, dtype=torch.float64),
        torch.ones(k, dtype=torch.int64),
        tol=1.2e-4,
    )
    assert result.unseen == 2
    complete = _interpret(
        torch.zeros(k, dtype=torch.int64),
        torch.full((k,), float(k), dtype=torch.float64),
        torch.zeros(k, dtype=torch.float64),
        torch.ones(k, dtype=torch.int64),
        tol=1.2e-4,
    )
    assert complete.unseen == 0 and complete.reduction == "mean"


def test_float32_counts_are_read_to_the_tolerances_of_held_examples() -> None:
    # float32, Flower's CNN, b = 16: a solved example's divisor 6.4e-4 off 16, and a pair
    # of examples whose columns agree to rounding back as their mean, fitting
    # cross-entropy to 1.4e-4 (the pair's columns agree no better), divisor 8: read with
    # the tolerances the inversion holds examples to, the pair counts twice and the
    # mean is over 16; with the strict tolerance alone nothing is read
    from spear.labels import _interpret, label_fit_tol

    divisor = torch.tensor([16.0] * 12 + [16.0103, 7.99994], dtype=torch.float64)
    fit = torch.tensor([3e-7] * 13 + [1.4e-4], dtype=torch.float64)
    k = divisor.numel()
    args = (torch.zeros(k, dtype=torch.int64), divisor, fit, torch.ones(k, dtype=torch.int64))
    tol = label_fit_tol(torch.float32)
    held = _interpret(*args, tol=tol, missing=1, dtype=torch.float32)
    assert held.reduction == "mean" and held.multiplicity.tolist() == [1] * 13 + [2]
    assert _interpret(*args, tol=tol, missing=1).reduction == "unknown"
    # a column that misses cross-entropy by far more than rounding says nothing
    far = _interpret(
        torch.zeros(k, dtype=torch.int64),
        divisor,
        torch.tensor([3e-7] * 13 + [1e-2], dtype=torch.float64),
        torch.ones(k, dtype=torch.int64),
        tol=tol,
        missing=1,
        dtype=torch.float32,
    )
    assert far.reduction == "unknown" and int(far.multiplicity.max()) == 1


def test_a_loss_other_than_cross_entropy_is_named_as_such() -> None:
    # label smoothing: the labels do not fit plain cross-entropy, and the note says so
    # instead of blaming clipping, noise or FedAvg for the scales
    model = mlp(SIZES, seed=7)
    x, y = fashion(8, seed=7)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y, label_smoothing=0.1).backward()
    update = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    rec = spear.attack(model, update, time_budget=30.0)
    assert_exact(rec.inputs, x)
    assert not rec.verified
    assert any("is the loss cross-entropy?" in n for n in rec.notes), rec.notes
    assert not any("per-example loss scales" in n for n in rec.notes), rec.notes


def test_a_bottleneck_after_the_layer_leaves_labels_undetermined() -> None:
    # 784 -> 256 -> 4 -> 10: the logits move in 4 dimensions, so a gradient column does
    # not determine its label; the examples are exact, the labels are not certified
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 4), nn.ReLU(), nn.Linear(4, 10)
    ).double()
    x, y = fashion(8, seed=9)
    flat = x.reshape(8, -1)
    rec = spear.attack(model, fedsgd_update(model, flat, y), time_budget=30.0)
    assert_exact(rec.inputs, flat)
    assert not rec.verified
    assert any("dimensions 10 classes need" in n for n in rec.notes), rec.notes
    assert not any("is the loss cross-entropy?" in n for n in rec.notes), rec.notes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_adam_delta_is_named_as_not_one_term_per_example(dtype: torch.dtype) -> None:
    # Adam rescales each coordinate: the delta has (nearly) full rank on its live units,
    # no batch size shows in it, and the note must say so instead of only "partial".
    torch.manual_seed(0)
    x, y = torch.rand(8, 60, dtype=dtype), torch.randint(0, 4, (8,))
    model = nn.Sequential(nn.Linear(60, 40), nn.ReLU(), nn.Linear(40, 4)).to(dtype)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(0, 8, 2):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 2]), y[i : i + 2]).backward()
        optimiser.step()
    delta = {k: model.state_dict()[k] - sent[k] for k in sent}
    model.load_state_dict(sent)
    rec = spear.attack(model, delta, update_kind="delta", time_budget=2, progress=False)
    assert not rec.verified
    assert any("Adam" in note and "live units" in note for note in rec.notes), rec.notes
