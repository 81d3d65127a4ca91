"""Images rebuilt from the features entering an attacked layer behind other layers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

import spear
from spear.client import fedsgd_update
from spear.data import rgb_patches, sample_batch
from spear.errors import InputError
from spear.images import _newton, guess_image_shape, images_from_features, leaky_copy
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
