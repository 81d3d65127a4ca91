"""Tests for spear.metrics, checked against scikit-image and brute force."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from spear.data import rgb_patches, synthetic_images
from spear.metrics import (
    DEFAULT_REL_TOL,
    exact_rate,
    label_accuracy,
    match,
    psnr,
    singled_out,
    ssim,
    summarize,
)


def _images(n: int, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return synthetic_images(n, shape=shape, seed=seed).images


# ---------------------------------------------------------------- match


def test_match_recovers_a_permutation_with_noise() -> None:
    truth = _images(12)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    noisy = truth[order] + 1e-3 * torch.randn(
        12, 1, 8, 8, generator=torch.Generator().manual_seed(2)
    )
    m = match(noisy, truth)
    assert m.truth_index.tolist() == list(range(12))
    assert torch.equal(order[torch.from_numpy(m.rec_index)], torch.arange(12))
    assert m.num_matched == 12 and m.unmatched_truth.size == 0 and m.unmatched_rec.size == 0
    expected_max = (noisy[m.rec_index] - truth).abs().reshape(12, -1).amax(1).numpy()
    np.testing.assert_allclose(m.max_abs_error, expected_max, rtol=1e-12)
    expected_rel = ((noisy[m.rec_index] - truth).reshape(12, -1).norm(dim=1)) / truth.reshape(
        12, -1
    ).norm(dim=1)
    np.testing.assert_allclose(m.relative_error, expected_rel.numpy(), rtol=1e-12)
    assert m.scale == float(truth.abs().max())


def test_match_is_optimal_against_brute_force() -> None:
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(5, 6))
    rec = rng.normal(size=(4, 6))
    m = match(rec, truth)
    cost = ((rec[:, None] - truth[None]) ** 2).mean(-1)
    best = min(
        sum(cost[r, t] for r, t in enumerate(perm)) for perm in itertools.permutations(range(5), 4)
    )
    assert math.isclose(float(m.mse.sum()), best, rel_tol=1e-12)
    assert len(m.unmatched_truth) == 1 and m.batch_size == 5


def test_match_partial_and_surplus() -> None:
    truth = _images(6)
    partial = match(truth[[4, 1]], truth)
    assert partial.truth_index.tolist() == [1, 4] and partial.rec_index.tolist() == [1, 0]
    assert partial.unmatched_truth.tolist() == [0, 2, 3, 5]
    surplus = match(torch.cat([truth, truth[:2] + 0.3]), truth)
    assert surplus.num_matched == 6 and surplus.unmatched_rec.tolist() == [6, 7]
    assert bool(surplus.exact(0.0).all())
    empty = match(torch.zeros(0, 1, 8, 8), truth)
    assert empty.num_matched == 0 and empty.unmatched_truth.tolist() == list(range(6))


def test_match_accepts_flat_reconstructions_and_rejects_other_sizes() -> None:
    truth = _images(3)
    assert match(truth.reshape(3, -1), truth).num_matched == 3
    with pytest.raises(ValueError, match="same inputs"):
        match(torch.zeros(3, 10), truth)


def test_relative_error_of_zero_truth() -> None:
    truth = torch.zeros(2, 3)
    m = match(torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), truth)
    assert sorted(m.relative_error.tolist()) == [0.0, math.inf]


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 8),
    dim=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_match_inverts_any_permutation(batch: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(batch, dim))
    if dim == 1:
        truth = np.arange(batch, dtype=np.float64)[:, None] * 3.0 + rng.uniform(0, 1)
    order = rng.permutation(batch)
    m = match(truth[order], truth)
    np.testing.assert_array_equal(order[m.rec_index], np.arange(batch))
    assert exact_rate(truth[order], truth) == 1.0


# ---------------------------------------------------------------- exact_rate


def test_exact_rate_counts_missing_examples_as_failures() -> None:
    truth = _images(8)
    assert exact_rate(truth[[0, 1, 2, 3]], truth) == 0.5
    assert exact_rate(truth.flip(0), truth) == 1.0
    assert exact_rate(torch.zeros(0, 1, 8, 8), truth) == 0.0


def test_exact_rate_tolerance_is_relative_to_the_data_scale() -> None:
    truth = _images(4)
    for scale in (1.0, 1000.0, 1e-3):
        t = truth * scale
        near = t.clone()
        near[0] += 0.5 * DEFAULT_REL_TOL * scale  # within tolerance
        near[1] += 2.0 * DEFAULT_REL_TOL * scale  # outside
        assert exact_rate(near, t) == 0.75
    assert exact_rate(near, t, rel_tol=1e-5) == 1.0


# ---------------------------------------------------------------- psnr and ssim


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_agrees_with_skimage(seed: int, data_range: float) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, data_range, size=(5, 3, 9, 7))
    rec = np.clip(truth + rng.normal(0, 0.05 * data_range, size=truth.shape), 0, data_range)
    ours = psnr(rec, truth, data_range, reduction="none")
    reference = [peak_signal_noise_ratio(truth[i], rec[i], data_range=data_range) for i in range(5)]
    np.testing.assert_allclose(ours, reference, rtol=1e-12)
    assert math.isclose(
        psnr(torch.from_numpy(rec), torch.from_numpy(truth), data_range), float(np.mean(reference))
    )


def test_psnr_is_infinite_for_exact_and_uses_the_matching() -> None:
    truth = _images(4)
    values = psnr(truth, truth, reduction="none")
    assert values.tolist() == [math.inf] * 4
    assert psnr(truth, truth) == math.inf
    rec = truth[[2, 0]]
    with pytest.raises(ValueError, match="matching="):
        psnr(rec, truth)
    assert psnr(rec, truth, matching=match(rec, truth), reduction="none").tolist() == [math.inf] * 2
    assert math.isnan(psnr(torch.zeros(0, 3), torch.zeros(0, 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_agrees_with_skimage_gray_and_rgb(seed: int) -> None:
    gray = _images(3, (1, 16, 16), seed=seed)
    noisy = (
        gray + 0.05 * torch.randn(gray.shape, generator=torch.Generator().manual_seed(seed))
    ).clamp(0, 1)
    ours = ssim(noisy, gray, reduction="none")
    reference = [
        structural_similarity(gray[i, 0].numpy(), noisy[i, 0].numpy(), data_range=1.0)
        for i in range(3)
    ]
    np.testing.assert_allclose(ours, reference, rtol=1e-12)
    assert all(value < 1.0 for value in ours)

    rgb = rgb_patches(2, size=16, seed=seed).images
    shifted = (rgb * 0.9 + 0.05).clamp(0, 1)
    ours_rgb = ssim(shifted, rgb, reduction="none")
    reference_rgb = [
        structural_similarity(
            rgb[i].permute(1, 2, 0).numpy(),
            shifted[i].permute(1, 2, 0).numpy(),
            data_range=1.0,
            channel_axis=-1,
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(ours_rgb, reference_rgb, rtol=1e-12)
    assert ssim(rgb, rgb) == 1.0


def test_ssim_small_images_and_flat_inputs() -> None:
    small = _images(2, (1, 5, 6))
    noisy = (small + 0.1).clamp(0, 1)
    reference = structural_similarity(
        small[0, 0].numpy(), noisy[0, 0].numpy(), data_range=1.0, win_size=5
    )
    assert math.isclose(ssim(noisy, small, reduction="none")[0], reference, rel_tol=1e-12)
    with pytest.raises(ValueError, match="smaller than 3x3"):
        ssim(_images(2, (1, 2, 2)), _images(2, (1, 2, 2)))
    with pytest.raises(ValueError, match="Reshape flat inputs"):
        ssim(torch.zeros(2, 10), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="odd window"):
        ssim(small, small, win_size=4)


# ---------------------------------------------------------------- labels and summary


def test_label_accuracy_after_matching() -> None:
    truth = _images(4)
    rec = truth[[3, 0, 1]]
    m = match(rec, truth)
    truth_labels = torch.tensor([5, 6, 7, 8])
    assert label_accuracy(torch.tensor([8, 5, 6]), truth_labels, m) == 0.75
    assert label_accuracy(torch.tensor([8, 5, 0]), truth_labels, m) == 0.5
    with pytest.raises(ValueError, match="batch of 4"):
        label_accuracy(torch.tensor([8, 5, 6]), truth_labels[:3], m)
    with pytest.raises(ValueError, match="one label per"):
        label_accuracy(torch.tensor([8]), truth_labels, m)


def test_summarize_reports_everything() -> None:
    truth = _images(5, (1, 10, 10))
    rec = truth[[4, 2, 0, 1]].clone()
    rec[0] += 0.01
    labels = torch.tensor([0, 1, 2, 3, 4])
    summary = summarize(rec, truth, torch.tensor([4, 2, 0, 9]), labels)
    assert summary["batch_size"] == 5 and summary["found"] == 4 and summary["matched"] == 4
    assert summary["exact_rate"] == 0.6
    assert summary["label_accuracy"] == 0.6
    assert summary["psnr_median"] == math.inf and summary["psnr_mean"] == math.inf
    assert summary["max_abs_error"] == pytest.approx(0.01, rel=1e-9)
    assert summary["ssim_mean"] is not None and 0.9 < summary["ssim_mean"] <= 1.0
    flat = summarize(rec.reshape(4, -1), truth.reshape(5, -1))
    assert flat["ssim_mean"] is None and flat["label_accuracy"] is None
    none = summarize(torch.zeros(0, 1, 10, 10), truth)
    assert none["exact_rate"] == 0.0 and none["psnr_mean"] is None and none["matched"] == 0


def test_metrics_available_after_a_plain_import_spear() -> None:
    # a fresh interpreter, as in the README: `import spear` then `spear.metrics.match`
    import spear

    src = str(Path(spear.__file__).resolve().parents[1])
    code = (
        "import sys, torch, spear\n"
        "assert 'spear.metrics' in sys.modules\n"
        "truth = torch.eye(3)\n"
        "m = spear.metrics.match(truth[[2, 0]], truth)\n"
        "print(m.rec_index.tolist(), m.truth_index.tolist())\n"
    )
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1, 0] [0, 2]"


def test_singled_out_reads_inputs_zero_sets() -> None:
    # four nonnegative inputs of a layer, each zero on coordinates that leave the other
    # three a plane: the inputs single every one out, the columns (no zeros) none
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0], [0, 0, 1, 0, 3], [0, 1, 0, 0, 1], [1, 0, 0, 0, 5]])
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    assert singled_out(g, x, read="inputs") == [4]
    assert singled_out(g, read="columns") == []
    assert singled_out(g, x) == [4]


def test_singled_out_needs_distinct_examples() -> None:
    # a repeated input: the copies' equal rows take a dimension from every zero set, so
    # no example is singled out by the inputs; without the copy all three are
    x = torch.tensor([[0.0, 1.0, 2.0, 1.0], [0, 1, 2, 1], [1, 0, 0, 3], [2, 0, 1, 0]])
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).abs() + 0.1
    assert singled_out(g, x, read="inputs") == []
    assert sum(singled_out(g[:, 1:], x[1:], read="inputs")) == 3


def test_singled_out_dependent_columns_count_units_of_their_own() -> None:
    # three examples whose columns span two dimensions: the update shows two terms, and
    # only the example alone on a unit counts, whatever the inputs' zeros
    g = torch.tensor([[1.0, 0.0, 0.0], [0, 1, 1], [0, 2, 2], [0, 1, 1]])
    x = torch.eye(3)
    assert singled_out(g, x) == [1]


def test_singled_out_checks_its_arguments() -> None:
    g = torch.ones(4, 3)
    with pytest.raises(ValueError, match="needs inputs"):
        singled_out(g)
    with pytest.raises(ValueError, match="columns show 3 examples but inputs 2"):
        singled_out(g, torch.ones(2, 5))
