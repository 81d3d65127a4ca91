"""One-logit models trained with binary cross-entropy (``BCEWithLogitsLoss``)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import fashion, mlp
from torch import nn

import spear
from spear.binary import one_logit, two_logits
from spear.data import rgb_patches, sample_batch
from spear.errors import InputError
from spear.networks import FlowerCnn


def _bce_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
) -> dict[str, torch.Tensor]:
    """The client's gradient of ``BCEWithLogitsLoss`` on the model's one logit."""
    params = dict(model.named_parameters())
    logits = model(x).reshape(x.shape[0])
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, y.to(logits.dtype), reduction=reduction
    )
    grads = torch.autograd.grad(loss, list(params.values()))
    return {name: g.detach().clone() for name, g in zip(params, grads, strict=True)}


def _binary_batch(b: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` Fashion-MNIST images and binary labels (1 for classes 5 to 9)."""
    images, labels = fashion(b, seed=seed)
    return images, (labels >= 5).long()


def _assert_batch(rec: spear.Reconstruction, x: torch.Tensor, y: torch.Tensor, rel: float) -> None:
    """Every example exact to ``rel``, every label right, verified."""
    assert rec.inputs.shape[0] == x.shape[0]
    match = spear.metrics.match(rec.inputs.to(torch.float64), x.to(torch.float64))
    found = rec.inputs.to(torch.float64)
    assert spear.metrics.exact_rate(found, x.to(torch.float64), rel_tol=rel, matching=match) == 1.0
    assert rec.labels is not None
    assert torch.equal(rec.labels[match.rec_index], y[match.truth_index])
    assert rec.verified
    assert any("binary cross-entropy" in note for note in rec.notes)


def test_two_logits_give_binary_cross_entropy_and_its_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    z = (4 * torch.randn(32, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 2, (32,), generator=gen)
    bce = nn.functional.binary_cross_entropy_with_logits(z, y.to(z.dtype))
    ce = nn.functional.cross_entropy(two_logits(z), y)
    assert abs(float((bce - ce).detach())) < 1e-14
    (g_bce,) = torch.autograd.grad(bce, z)
    (g_ce,) = torch.autograd.grad(ce, z)
    assert float((g_bce - g_ce).abs().max()) < 1e-16
    assert two_logits(z[:, None]).shape == (32, 2)
    wide = torch.zeros(4, 3)
    assert two_logits(wide) is wide  # more than one output: unchanged


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_a_one_logit_mlp_under_bce_gives_its_batch_and_labels(
    dtype: torch.dtype, rel: float
) -> None:
    x, y = _binary_batch(32)
    model = mlp((784, 500, 1)).to(dtype)
    update = _bce_update(model, x.to(dtype), y)
    rec = spear.attack(model, update, time_budget=60, progress=False)
    _assert_batch(rec, x, y, rel)
    assert rec.certificate is not None and rec.certificate < spear.VERIFIED_BELOW[dtype]


def test_a_squeezed_logit_under_a_summed_bce() -> None:
    """Models that return ``(b,)`` rather than ``(b, 1)``, and a sum reduction."""
    x, y = _binary_batch(16, seed=3)
    model = nn.Sequential(*mlp((784, 400, 1)), nn.Flatten(0))
    update = _bce_update(model, x, y, reduction="sum")
    rec = spear.attack(model, update, time_budget=60, progress=False)
    _assert_batch(rec, x, y, 1e-6)
    assert any("reduction detected: sum" in note for note in rec.notes)


def test_a_one_logit_cnn_gives_its_features_and_labels() -> None:
    torch.manual_seed(0)
    net = FlowerCnn(num_classes=1).to(torch.float64)
    pool = rgb_patches(1000, seed=0)
    images, labels = sample_batch(pool, 8, seed=1)
    images = images.to(torch.float64)
    y = (labels >= 5).long()
    update = _bce_update(net, images, y)
    rec = spear.attack(net, update, time_budget=30, progress=False, image_budget=5)
    truth = net.features(images).detach()
    assert rec.feature_space and rec.inputs.shape[0] == 8
    match = spear.metrics.match(rec.inputs, truth)
    assert spear.metrics.exact_rate(rec.inputs, truth, rel_tol=1e-6, matching=match) == 1.0
    assert rec.labels is not None
    assert torch.equal(rec.labels[match.rec_index], y[match.truth_index])
    assert rec.images is not None and rec.images.shape == (8, 3, 32, 32)


def test_softmax_cross_entropy_asked_for_on_one_logit_verifies_nothing() -> None:
    """Under the wrong loss the labels cannot fit: nothing is verified."""
    x, y = _binary_batch(8)
    model = mlp((784, 300, 1))
    update = _bce_update(model, x, y)
    rec = spear.attack(model, update, time_budget=20, progress=False, loss="cross_entropy")
    assert not rec.verified
    assert not any("binary cross-entropy (BCEWithLogitsLoss)" in note for note in rec.notes)


def test_a_regression_loss_on_one_output_is_never_verified() -> None:
    """Mean squared error on one output: the examples may come back, the labels do not fit
    cross-entropy, and the result says so."""
    x, y = _binary_batch(16)
    model = mlp((784, 400, 1))
    params = dict(model.named_parameters())
    loss = nn.functional.mse_loss(model(x)[:, 0], 3.0 * y.double() - 1.0)
    update = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    rec = spear.attack(model, update, time_budget=30, progress=False)
    assert not rec.verified


def test_binary_cross_entropy_on_a_many_class_model_is_refused() -> None:
    x, y = fashion(4)
    model = mlp((784, 100, 10))
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    update = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    with pytest.raises(InputError, match="one output"):
        spear.attack(model, update, loss="binary_cross_entropy", progress=False)
    with pytest.raises(InputError, match="loss must be one of"):
        spear.attack(model, update, loss="hinge", progress=False)


def test_one_logit_is_probed_on_the_model_after_the_layer() -> None:
    weight = torch.zeros(5, 3)
    assert one_logit(nn.Linear(5, 1), weight)
    assert one_logit(nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)), weight)
    assert not one_logit(nn.Linear(5, 2), weight)
    assert not one_logit(nn.Linear(4, 1), weight)  # does not run on the probe


def test_the_two_logit_view_survives_a_deep_copy() -> None:
    """The certificate and the image step work on deep copies of the model: a traced
    module (whose copies drop forward hooks) carries the view in its graph."""
    import copy

    from torch import fx

    from spear.binary import view_as_two_logits

    x = torch.randn(3, 5, dtype=torch.float64)
    for model in (mlp((5, 4, 1), flatten=False), fx.symbolic_trace(mlp((5, 4, 1), flatten=False))):
        view_as_two_logits(model)
        z = model[2](model[1](model[0](x))) if isinstance(model, nn.Sequential) else None
        copied = copy.deepcopy(model)
        out = copied(x)
        assert out.shape == (3, 2)
        if z is not None:
            assert torch.equal(out, two_logits(z))
