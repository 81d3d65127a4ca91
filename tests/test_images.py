"""Images rebuilt from the features entering an attacked layer behind other layers."""

from __future__ import annotations

import importlib
import math
import time
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import spear
from spear.client import dp_sgd_update, fedsgd_update
from spear.data import rgb_patches, sample_batch
from spear.errors import InputError
from spear.images import (
    WEIGHT_MAX_FIT,
    _newton,
    example_weights,
    gradient_term,
    guess_image_shape,
    images_from_features,
    leaky_copy,
)
from spear.model import find_target
from spear.networks import build_cnn


def _conv_mlp(dtype: torch.dtype) -> nn.Module:
    """A conv layer without pooling (16 x 8 x 8 features of 3 x 8 x 8 images) before a
    linear+ReLU layer: its nonzero features outnumber the pixels."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1024, 200),
        nn.ReLU(),
        nn.Linear(200, 10),
    ).to(dtype)


def _small_images(b: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = sample_batch(rgb_patches(1000, seed=0), b, seed=1)
    return images[:, :, :8, :8].contiguous().to(dtype), labels


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_images_determined_by_their_features_are_exact_and_certified(
    dtype: torch.dtype, tol: float
) -> None:
    net = _conv_mlp(dtype)
    images, labels = _small_images(4, dtype)
    update = fedsgd_update(net, images, labels)
    rec = spear.attack(net, update, time_budget=30, image_budget=30, input_range=(0, 1))
    assert rec.feature_space and rec.complete
    assert rec.images is not None and rec.images.shape == (4, 3, 8, 8)
    assert rec.images_determined
    match = spear.metrics.match(rec.images, images)
    assert match.unmatched_truth.size == 0
    assert float(np.max(match.max_abs_error)) < tol
    assert rec.labels is not None
    assert sorted(rec.labels.tolist()) == sorted(labels.tolist())
    # the certificate recomputes the whole update (the conv layer's gradient too)
    assert rec.certificate is not None
    assert rec.certificate <= spear.certificate.verified_threshold(dtype)
    assert rec.verified


def test_a_newton_polish_starts_no_step_after_its_deadline() -> None:
    # images determined by their features, polished past the deadline: the start comes
    # back untouched and undetermined (no Jacobian rank was tested), in no time
    net = _conv_mlp(torch.float64)
    images, _ = _small_images(1, torch.float64)
    head = find_target(net).before
    assert head is not None
    with torch.no_grad():
        features = head(images)[0]
    start = images[0] + 1e-3
    x, determined = _newton(head, start, features, None, time.perf_counter() - 1.0)
    assert torch.equal(x, start) and not determined
    x, determined = _newton(head, start, features, None)
    assert determined and float((x - images[0]).abs().max()) < 1e-8


def _clip_factors(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, clip_norm: float
) -> torch.Tensor:
    """``(b,)`` Opacus's clip factor ``min(1, C / (||g_i|| + 1e-6))`` of each example's
    whole gradient ``g_i``."""
    norms = torch.stack(
        [
            torch.cat([g.flatten() for g in fedsgd_update(model, x[None], y[None]).values()]).norm()
            for x, y in zip(images, labels, strict=True)
        ]
    )
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_gradient_term_weighs_each_example_as_a_clipped_update_does(
    dtype: torch.dtype, tol: float
) -> None:
    # DP-SGD clipping (no noise) scales each example's whole gradient by its own factor;
    # the divisors B_i = b / c_i the labels are read with give the weights that make the
    # true images explain the conv layer's gradient exactly, where a plain mean does not
    model = _conv_mlp(dtype)
    images, labels = _small_images(4, dtype)
    clip_norm = 0.05
    update = dp_sgd_update(
        model, images, labels, max_grad_norm=clip_norm, noise_multiplier=0.0
    ).update
    clip = _clip_factors(model, images, labels, clip_norm)
    assert float(clip.max() / clip.min()) > 1.1, clip  # the examples are clipped unequally
    head = find_target(model).before
    assert head is not None
    weights = example_weights(4 / clip)
    assert weights is not None
    weighted = gradient_term(model, head, update, labels, sign=1.0, weights=weights)
    plain = gradient_term(model, head, update, labels, sign=1.0)
    assert weighted is not None and plain is not None
    assert float(weighted.loss(images).detach()) < tol
    assert float(plain.loss(images).detach()) > 1e-4


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_a_copy_weighs_twice_in_the_gradient_term(dtype: torch.dtype, tol: float) -> None:
    model = _conv_mlp(dtype)
    images, labels = _small_images(3, dtype)
    batch = torch.cat([images, images[:1]])  # the first image twice
    update = fedsgd_update(model, batch, torch.cat([labels, labels[:1]]))
    head = find_target(model).before
    assert head is not None
    weights = example_weights(torch.tensor([2.0, 4.0, 4.0]))  # a mean over 4: B / 2 for the copy
    assert weights is not None
    weighted = gradient_term(model, head, update, labels, sign=1.0, weights=weights)
    plain = gradient_term(model, head, update, labels, sign=1.0)
    assert weighted is not None and plain is not None
    assert float(weighted.loss(images).detach()) < tol
    assert float(plain.loss(images).detach()) > 1e-4


def test_divisors_of_columns_that_do_not_fit_cross_entropy_give_no_weights() -> None:
    # noisy columns (DP noise) fit cross-entropy to about 0.9 and their divisors spread
    # by factors of 3 to 70 where the clip factors differ by 10%: a plain mean then
    divisors = torch.tensor([9.8, 9.4, 0.96, 4.9])
    assert example_weights(divisors, torch.full((4,), 1e-6)) is not None
    assert example_weights(divisors, torch.tensor([1e-6, 1e-6, WEIGHT_MAX_FIT, 1e-6])) is not None
    assert example_weights(divisors, torch.tensor([1e-6, 0.9, 1e-6, 1e-6])) is None


def test_the_attack_weighs_the_image_search_by_the_clip_factors_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Flower's CNN, a float32 DP-SGD update clipped without noise, b = 4: the weights
    # spear.attack hands the image search are the examples' clip factors (to float32's
    # precision), read off their gradient columns without the truth
    attack_module = importlib.import_module("spear.attack")
    seen: list[torch.Tensor | None] = []
    rebuild = attack_module.reconstruct_images

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("weights"))
        return rebuild(*args, **kwargs)

    monkeypatch.setattr(attack_module, "reconstruct_images", spy)
    net = build_cnn("flower-cnn", 0, dtype=torch.float32)
    images, labels = sample_batch(rgb_patches(1000, seed=0), 4, seed=1)
    images = images.float()
    update = dp_sgd_update(net, images, labels, max_grad_norm=1.0, noise_multiplier=0.0).update
    clip = _clip_factors(net, images, labels, 1.0).double()
    assert float(clip.max() / clip.min()) > 1.02, clip  # clipped unequally (rtol 1e-4 below)
    rec = spear.attack(net, update, time_budget=30, image_budget=1, progress=False)
    assert rec.complete and len(seen) == 1 and seen[0] is not None
    head = find_target(net).before
    assert head is not None
    truth = head(images).detach().double()
    order = spear.metrics.match(rec.inputs.reshape(4, -1).double(), truth)
    expected = clip[order.truth_index] / clip[order.truth_index].mean()
    assert torch.allclose(seen[0][order.rec_index], expected, rtol=1e-4)


def test_wrong_images_are_not_certified() -> None:
    # the certificate that certifies determined images does see a wrong one
    net = _conv_mlp(torch.float64)
    images, labels = _small_images(4, torch.float64)
    update = fedsgd_update(net, images, labels)
    shifted = images.clone()
    shifted[0] = shifted[0].flip(-1)
    cert = spear.certify(net, update, shifted, labels)
    assert cert > spear.certificate.verified_threshold(torch.float64)


def test_pooled_features_give_estimates_not_exact_images() -> None:
    net = build_cnn("flower-cnn", 0)
    images, _ = sample_batch(rgb_patches(1000, seed=0), 2, seed=1)
    images = images.to(torch.float64)
    head = find_target(net).before
    assert head is not None
    features = head(images).detach()
    found = images_from_features(
        head, features, (3, 32, 32), input_range=(0, 1), time_budget=20, steps=400
    )
    assert found.images.shape == (2, 3, 32, 32)
    assert float(found.images.min()) >= 0.0 and float(found.images.max()) <= 1.0
    assert not bool(found.determined.any())
    assert any("do not determine" in note for note in found.notes)
    assert float(found.feature_residual.max()) < 0.3
    # closer to the truth than random pixels
    random = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)).double()
    ours = spear.metrics.psnr(found.images, images, reduction="none")
    chance = spear.metrics.psnr(random, images, reduction="none")
    assert float(np.median(ours)) > float(np.median(chance)) + 3.0


def test_an_unlimited_image_budget_takes_the_steps_asked_for() -> None:
    net = build_cnn("flower-cnn", 0)
    images, _ = sample_batch(rgb_patches(1000, seed=0), 2, seed=1)
    head = find_target(net).before
    assert head is not None
    features = head(images.to(torch.float64)).detach()
    found = images_from_features(
        head, features, (3, 32, 32), input_range=(0, 1), time_budget=math.inf, steps=40
    )
    assert found.steps == 40


@pytest.mark.parametrize("name", ["flower-cnn", "vgg"])
def test_image_shape_guessed_from_the_feature_count(name: str) -> None:
    net = build_cnn(name, 0)
    target = find_target(net)
    assert target.before is not None
    assert guess_image_shape(target.before, target.in_features, 3, torch.float64) == (3, 32, 32)


def test_image_shape_is_not_guessed_behind_adaptive_pooling() -> None:
    # every image size gives 8 x 4 x 4 features: the count does not tell the size
    head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
    assert guess_image_shape(head, 128, 3, torch.float32) is None
    torch.manual_seed(0)
    net = nn.Sequential(*head, nn.Flatten(), nn.Linear(128, 200), nn.ReLU(), nn.Linear(200, 10))
    images, labels = sample_batch(rgb_patches(1000, seed=0), 4, seed=1)
    update = fedsgd_update(net, images.float(), labels)
    rec = spear.attack(net, update, time_budget=20, image_budget=5)
    assert rec.feature_space and rec.images is None
    assert any("input shape could not be read off" in n for n in rec.notes)
    given = spear.attack(net, update, time_budget=20, image_budget=2, input_shape=(3, 32, 32))
    assert given.images is not None and given.images.shape == (4, 3, 32, 32)


def test_no_images_from_features_known_only_up_to_a_scale() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 14 * 14, 100, bias=False),
        nn.ReLU(),
        nn.Linear(100, 10),
    ).double()
    images, labels = sample_batch(rgb_patches(1000, seed=0), 4, seed=1)
    rec = spear.attack(net, fedsgd_update(net, images.double(), labels), image_budget=5)
    assert rec.feature_space and rec.images is None
    assert any("known only up to a scale" in n for n in rec.notes)


@pytest.mark.parametrize("traced", [True, False])
def test_leaky_copy_is_the_same_function_at_slope_zero(traced: bool) -> None:
    # a traced extractor (functional ReLUs) and a Sequential one (ReLU modules)
    traced_head = find_target(build_cnn("flower-cnn", 0)).before
    assert traced_head is not None
    head = traced_head if traced else _conv_mlp(torch.float64)[:3]
    copy, units = leaky_copy(head)
    side = 32 if traced else 8
    x = torch.rand(2, 3, side, side, dtype=torch.float64)
    assert len(units) == (2 if traced else 1)
    assert torch.equal(copy(x), head(x))
    units[0].slope = 0.5
    assert not torch.equal(copy(x), head(x))
    # the original is untouched
    assert torch.equal(head(x), head(x))


def test_image_budget_zero_skips_and_bad_budgets_are_refused() -> None:
    net = _conv_mlp(torch.float64)
    images, labels = _small_images(2, torch.float64)
    update = fedsgd_update(net, images, labels)
    rec = spear.attack(net, update, time_budget=30, image_budget=0)
    assert rec.images is None
    with pytest.raises(InputError, match="image_budget"):
        spear.attack(net, update, image_budget=-1)


def test_wrong_input_shape_is_a_clear_error() -> None:
    net = build_cnn("flower-cnn", 0)
    head = find_target(net).before
    assert head is not None
    with pytest.raises(InputError, match="input_shape"):
        images_from_features(head, torch.zeros(1, 400, dtype=torch.float64), (3, 28, 28))
