"""Noisy updates: noise estimate, approximate reconstruction, error bars, fallback.

Noise made two ways: Opacus DP-SGD (clip norm 1) on a float32 MLP, and plain Gaussian
noise added to a float64 FedSGD update. Every estimate is checked against the truth.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from tests.conftest import fashion, fedsgd_update, mlp

import spear
from spear import client, metrics
from spear.baselines import gradient_matching_attack
from spear.certificate import certificate_and_fit, certify, nonnegative_fit
from spear.fallback import aligned_mean
from spear.inversion.approximate import approximate_inversion
from spear.noise import estimate_noise
from spear.noisy import describe, predicted_psnr

SHAPE = (1, 28, 28)


def _dp_case(
    b: int, noise: float, width: int = 1000, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A float32 784 -> width -> 10 MLP, ``b`` Fashion-MNIST images, its Opacus update."""
    x, y = fashion(b, seed=seed)
    model = mlp((784, width, 10), seed=seed).float()
    update = client.dp_sgd_update(
        model, x.float(), y, max_grad_norm=1.0, noise_multiplier=noise, seed=seed
    ).update
    return model, update, x, y


def _gaussian_case(
    b: int, sigma_rel: float, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, float]:
    """A float64 MLP's FedSGD update plus Gaussian noise of ``sigma_rel`` times its RMS entry."""
    x, y = fashion(b, seed=seed)
    model = mlp((784, 1000, 10), seed=seed)
    update = fedsgd_update(model, x, y)
    rms = float(update["1.weight"].pow(2).mean().sqrt())
    sigma = sigma_rel * rms
    gen = torch.Generator().manual_seed(seed + 1)
    noisy = {
        name: g + sigma * torch.randn(g.shape, generator=gen, dtype=g.dtype)
        for name, g in update.items()
    }
    return model, noisy, x, y, sigma


def test_noise_estimate_finds_sigma_and_batch_size_of_gaussian_noise() -> None:
    _, update, _, _, sigma = _gaussian_case(8, 0.05)
    a = torch.cat([update["1.weight"], update["1.bias"][:, None]], dim=1)
    est = estimate_noise(torch.linalg.svdvals(a), a.shape[0], a.shape[1])
    assert est.batch_size == 8 and not est.given
    assert est.confident
    assert est.sigma == pytest.approx(sigma, rel=0.02)


def test_noise_estimate_of_opacus_noise_matches_its_standard_deviation() -> None:
    b, noise = 8, 1e-4
    _, update, _, _ = _dp_case(b, noise)
    a = torch.cat([update["1.weight"], update["1.bias"][:, None]], dim=1).double()
    est = estimate_noise(torch.linalg.svdvals(a), a.shape[0], a.shape[1], batch_size=b)
    # Opacus adds N(0, (noise * clip)^2) per entry and divides by b
    assert est.sigma == pytest.approx(noise * 1.0 / b, rel=0.02)


def test_approximate_attack_under_opacus_noise_is_close_with_honest_error_bars() -> None:
    b = 8
    model, update, x, y = _dp_case(b, 1e-4)
    rec = spear.attack(
        model, update, batch_size=b, input_shape=SHAPE, time_budget=10, input_range=(0.0, 1.0)
    )
    assert rec.estimate == "approximate"
    assert not rec.verified and not rec.examples_verified
    assert rec.noise is not None and rec.error_rms is not None
    assert rec.layer_result is not None and rec.layer_result.noise_consistent
    matching = metrics.match(rec.inputs, x)
    psnrs = metrics.psnr(rec.inputs, x, matching=matching, reduction="none")
    assert statistics.median(psnrs.tolist()) > 35.0
    assert rec.labels is not None
    assert metrics.label_accuracy(rec.labels, y, matching) >= 7 / 8
    # noisy columns fit cross-entropy only to the noise: the note blames the noise, not the loss
    assert not any("is the loss cross-entropy?" in n for n in rec.notes), rec.notes
    assert any("as noise in the update would make them" in n for n in rec.notes), rec.notes
    measured = ((rec.inputs[matching.rec_index] - x[matching.truth_index]) ** 2).flatten(1)
    measured_rms = measured.mean(dim=1).sqrt()
    ratio = rec.error_rms[matching.rec_index] / measured_rms
    assert 1 / 3 < float(ratio.median()) < 3
    predicted = predicted_psnr(rec.error_rms)
    assert abs(float(predicted.median()) - statistics.median(psnrs.tolist())) < 10.0


def test_approximate_inversion_of_gaussian_noise_in_float64() -> None:
    b = 8
    model, update, x, _, sigma = _gaussian_case(b, 0.02)
    layer = model[1]
    found = approximate_inversion(
        update["1.weight"], update["1.bias"], layer.weight, layer.bias, batch_size=b
    )
    assert found is not None
    assert found.inputs.dtype == torch.float64 and found.inputs.shape == (b, 784)
    assert found.consistent
    assert found.noise.sigma == pytest.approx(sigma, rel=0.05)
    psnrs = metrics.psnr(found.inputs, x.reshape(b, -1), reduction="none", matching=None)
    matching = metrics.match(found.inputs, x.reshape(b, -1))
    psnrs = metrics.psnr(found.inputs, x.reshape(b, -1), matching=matching, reduction="none")
    assert float(psnrs.min()) > 25.0


@pytest.mark.parametrize("update_dtype", ["float32-opacus", "float64-gaussian"])
def test_batch_of_48_is_completed_in_the_missing_span_with_honest_error_bars(
    update_dtype: str,
) -> None:
    """At b = 48 peeling leaves most examples mixed; the span search finds them all."""
    b = 48
    if update_dtype == "float32-opacus":
        model, update, x, _ = _dp_case(b, 1e-5)
    else:
        model, update, x, _, _ = _gaussian_case(b, 1e-3)
    layer = model[1]
    found = approximate_inversion(
        update["1.weight"], update["1.bias"], layer.weight, layer.bias, batch_size=b
    )
    assert found is not None and found.consistent
    truth = x.reshape(b, -1).to(torch.float64)
    matching = metrics.match(found.inputs, truth)
    psnrs = metrics.psnr(found.inputs, truth, matching=matching, reduction="none")
    assert matching.num_matched == b
    assert float(psnrs.min()) > 40.0
    # the error bars hold within a factor of 2 (median over the batch)
    measured = (found.inputs[matching.rec_index] - truth[matching.truth_index]).pow(2)
    ratio = found.error_rms[matching.rec_index] / measured.mean(dim=1).sqrt()
    assert 0.5 < float(ratio.median()) < 2.0


def test_noiseless_update_through_the_approximate_path_is_exact() -> None:
    b = 8
    model, update, x, _ = _dp_case(b, 0.0)
    layer = model[1]
    found = approximate_inversion(
        update["1.weight"], update["1.bias"], layer.weight, layer.bias, batch_size=b
    )
    assert found is not None
    matching = metrics.match(found.inputs, x.reshape(b, -1))
    assert matching.num_matched == b
    assert float(matching.max_abs_error.max()) < 1e-3


def test_batch_size_read_off_a_noisy_spectrum_when_not_given() -> None:
    b = 8
    model, update, _, _ = _dp_case(b, 1e-4)
    rec = spear.attack(model, update, input_shape=SHAPE, time_budget=10)
    assert rec.batch_size == b
    assert rec.estimate == "approximate" and not rec.verified
    assert any("read off the spectrum" in note for note in rec.notes)


def test_nonnegative_fit_ranks_estimates_of_a_clipped_noisy_update() -> None:
    """The fit with non-negative per-example weights is never above the certificate,
    tells the truth from a blurred estimate under DP-SGD clipping and noise, and is as
    small as the certificate on an exact noiseless float64 update."""
    model, update, x, y = _dp_case(8, 1e-3, width=128)
    gen = torch.Generator().manual_seed(1)
    blurred = (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=x.dtype)).clamp(0, 1)
    truth = nonnegative_fit(model, update, x.float(), y)
    estimate = nonnegative_fit(model, update, blurred.float(), y)
    assert truth <= certify(model, update, x.float(), y)
    assert estimate <= certify(model, update, blurred.float(), y)
    assert truth < 0.5 * estimate
    both = certificate_and_fit(model, update, blurred.float(), y)
    assert both == (certify(model, update, blurred.float(), y), estimate)
    exact_model = mlp((784, 64, 10), seed=0)
    exact = fedsgd_update(exact_model, x, y)
    assert nonnegative_fit(exact_model, exact, x, y) < 1e-10
    assert nonnegative_fit(exact_model, exact, blurred, y) > 1e-3


def test_candidate_scores_match_the_gram_matrices_of_their_off_rows() -> None:
    """The packed Gram matrices of the candidates' predicted-off rows give the same
    smallest eigenpairs as the matrices built row by row; directions are computed only
    below the bound asked for."""
    from spear.inversion.approximate import _Denoised, _row_products, _scores

    gen = torch.Generator().manual_seed(0)
    m, n, b, k = 60, 12, 5, 200
    basis = torch.linalg.qr(torch.randn(m, b, generator=gen, dtype=torch.float64))[0]
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    c = torch.randn(m, generator=gen, dtype=torch.float64)
    candidates = torch.randn(k, n, generator=gen, dtype=torch.float64)
    empty = torch.zeros(0)
    d = _Denoised(empty, basis, empty, empty, w, c, 0.0, 0.0, _row_products(basis))
    directions, scores = _scores(candidates, d)
    for i in range(k):
        off = (candidates[i] @ w.T + c) <= 0
        gram = basis[off].T @ basis[off]
        values, vectors = torch.linalg.eigh(gram)
        if int(off.sum()) < 2 * b:
            assert scores[i] == float("inf")
            continue
        assert torch.isclose(scores[i], values[0] * m / off.sum(), rtol=1e-9, atol=1e-12)
        assert abs(float(directions[i] @ vectors[:, 0])) > 1 - 1e-9
    bound = float(scores[torch.isfinite(scores)].median())
    some, same = _scores(candidates, d, bound)
    assert torch.equal(same, scores)
    assert bool((some[scores > bound] == 0).all())
    assert torch.allclose(some[scores <= bound].abs(), directions[scores <= bound].abs())


def test_heavy_noise_returns_the_estimate_that_fits_the_update_best() -> None:
    b = 4
    model, update, _, _ = _dp_case(b, 0.1, width=128)
    rec = spear.attack(
        model, update, batch_size=b, input_shape=SHAPE, time_budget=10, input_range=(0.0, 1.0)
    )
    assert not rec.verified
    assert rec.estimate in ("approximate", "gradient-matching")
    assert rec.inputs.shape == (b, *SHAPE)
    assert float(rec.inputs.min()) >= 0.0 and float(rec.inputs.max()) <= 1.0
    if rec.estimate == "approximate":
        # the noise model does not bound this fit's error: no error bars are claimed
        assert rec.error_rms is not None and bool(torch.isnan(rec.error_rms).all())
    assert any("gradient matching" in note or "gradient-matching" in note for note in rec.notes)


def test_where_noise_hides_the_batch_the_mean_of_matching_runs_beats_the_baseline() -> None:
    """At a noise ratio near 1 the approximate estimate does not explain the update;
    gradient matching runs from random inputs with the labels counted and with the
    estimate's, and from the estimate; the estimate's labels fit more than 5% better, so
    the mean of the runs with them is returned: no worse a fit
    (:func:`spear.certificate.nonnegative_fit`) than the baseline's, and
    (measured here) more labels and a higher PSNR."""
    b = 16
    model, update, x, y = _dp_case(b, 1e-3)
    assert (
        estimate_noise(
            torch.linalg.svdvals(
                torch.cat([update["1.weight"], update["1.bias"][:, None]], 1).double()
            ),
            1000,
            785,
            batch_size=b,
        ).noise_ratio
        > 0.5
    )
    box = (0.0, 1.0)
    rec = spear.attack(
        model, update, batch_size=b, input_shape=SHAPE, time_budget=60, input_range=box
    )
    base = gradient_matching_attack(
        model, update, batch_size=b, input_shape=SHAPE, iterations=200, box=box
    )
    assert base.labels is not None and rec.labels is not None
    base_fit = nonnegative_fit(model, update, base.inputs, base.labels)
    assert nonnegative_fit(model, update, rec.inputs, rec.labels) <= base_fit
    assert rec.estimate == "gradient-matching" and rec.error_rms is None
    assert any(
        "the mean of" in n and "labels from the approximate estimate" in n for n in rec.notes
    ), rec.notes
    ours, theirs = metrics.match(rec.inputs, x), metrics.match(base.inputs, x)
    assert metrics.label_accuracy(rec.labels, y, ours) > metrics.label_accuracy(
        base.labels, y, theirs
    )
    assert statistics.median(
        metrics.psnr(rec.inputs, x, matching=ours, reduction="none").tolist()
    ) > statistics.median(metrics.psnr(base.inputs, x, matching=theirs, reduction="none").tolist())


def test_approximate_search_stops_at_its_time_budget_with_the_best_fit_so_far() -> None:
    b = 16
    model, update, _, _ = _dp_case(b, 3e-4)
    layer = model[1]
    args = (update["1.weight"], update["1.bias"], layer.weight, layer.bias)
    cut = approximate_inversion(*args, batch_size=b, time_budget=0.0)
    assert cut is not None and cut.out_of_time
    # the first round runs (one refinement round for the missing examples, one for all)
    assert cut.inputs.shape == (b, 784) and cut.rounds <= 2
    assert "time budget ran out" in describe(cut)
    full = approximate_inversion(*args, batch_size=b)
    assert full is not None and not full.out_of_time and full.rounds > cut.rounds
    assert "time budget" not in describe(full)


@pytest.mark.parametrize(("dtype", "floor_db"), [(torch.float16, 60.0), (torch.bfloat16, 45.0)])
def test_mixed_precision_update_is_estimated_with_its_rounding_as_noise(
    dtype: torch.dtype, floor_db: float
) -> None:
    b = 8
    x, y = fashion(b)
    model = mlp((784, 1000, 10)).float()
    update = {k: v.to(dtype) for k, v in client.fedsgd_update(model, x.float(), y).items()}
    rec = spear.attack(
        model, update, batch_size=b, input_shape=SHAPE, time_budget=10, input_range=(0.0, 1.0)
    )
    assert rec.estimate == "approximate" and not rec.verified
    matching = metrics.match(rec.inputs, x)
    psnrs = metrics.psnr(rec.inputs, x, matching=matching, reduction="none")
    assert statistics.median(psnrs.tolist()) > floor_db
    assert rec.labels is not None
    assert metrics.label_accuracy(rec.labels, y, matching) >= 7 / 8
    assert any(f"arrived as {dtype}" in note for note in rec.notes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_batch_size_is_read_above_the_rounding(dtype: torch.dtype) -> None:
    # no singular value past the batch size exceeds the bound on the rounding's
    x, y = fashion(8)
    model = mlp((784, 1000, 10)).float()
    update = {k: v.to(dtype) for k, v in client.fedsgd_update(model, x.float(), y).items()}
    rec = spear.attack(model, update, input_shape=SHAPE, time_budget=10)
    assert rec.batch_size == 8 and rec.estimate == "approximate" and not rec.verified
    assert any("clear of the bound on" in note for note in rec.notes)
    assert not any("(given" in note for note in rec.notes)


def test_mixed_precision_update_that_fills_the_layer_asks_for_the_batch_size() -> None:
    # 24 examples of 20 pixels fill the (30, 21) spectrum of [dW, db]: nothing past them
    x, y = fashion(24)
    pixels = x.reshape(24, -1)[:, 400:420].float()
    model = mlp((20, 30, 10), flatten=False).float()
    update = {k: v.half() for k, v in client.fedsgd_update(model, pixels, y).items()}
    with pytest.raises(spear.InputError, match="batch_size="):
        spear.attack(model, update, time_budget=10)


def test_aligned_mean_pairs_examples_by_distance_and_label() -> None:
    torch.manual_seed(0)
    truth = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    runs = [truth + 0.01, truth[order] - 0.01]
    mean = aligned_mean(runs, [labels, labels[order]])
    assert mean.shape == truth.shape and mean.dtype == truth.dtype
    assert torch.allclose(mean, truth, atol=1e-12)
    # labels are never crossed, even where another label's example is nearer: the second
    # run calls example 0 label 1 and example 2 (next to example 0) label 0
    near = truth.clone()
    near[2] = truth[0] + 1e-3
    crossed = labels.clone()
    crossed[0], crossed[2] = labels[2], labels[0]
    assert torch.equal(aligned_mean([near, near]), near)
    mixed = aligned_mean([near, near], [labels, crossed])
    both = (near[0] + near[2]) / 2
    assert torch.allclose(mixed[0], both) and torch.allclose(mixed[2], both)


def _scripted_matching(
    monkeypatch: pytest.MonkeyPatch, fits: dict[str, float], mean_fit: float
) -> list[str]:
    """Replace gradient matching and the mean's fit in :mod:`spear.fallback` by runs with
    the given fits (certificates alike): ``"counted"`` (random start, the labels
    counted), ``"relabelled"`` (random start, the estimate's labels),
    ``"from-estimate"``; returns the list the runs are logged to."""
    import spear.fallback as fallback

    log: list[str] = []

    def run(
        *args: object, initial: object = None, labels: torch.Tensor | None = None
    ) -> fallback.Estimate:
        counted = labels is None or torch.equal(labels, torch.tensor([0, 1, 2, 3]))
        name = "from-estimate" if initial is not None else "counted" if counted else "relabelled"
        log.append(name)
        what = str(args[-1])
        labelled = torch.tensor([0, 1, 2, 3])
        return fallback.Estimate(
            torch.rand(4, 2), labelled, fits[name], "gradient-matching", what, fits[name]
        )

    monkeypatch.setattr(fallback, "_gradient_matching", run)
    monkeypatch.setattr(fallback, "_measured", lambda *args: (mean_fit, mean_fit))
    return log


@pytest.mark.parametrize(
    ("fits", "mean_fit", "current_fit", "returned", "labels_from_estimate"),
    [
        # the estimate's labels fit 14% better: kept; the mean of the runs with them wins
        ({"counted": 0.7, "relabelled": 0.6, "from-estimate": 0.6}, 0.59, 0.9, "mean", True),
        # ... but where the approximate estimate fits better, by any margin, it stays
        ({"counted": 0.7, "relabelled": 0.6, "from-estimate": 0.6}, 0.59, 0.585, "current", True),
        # and where it fits worse, by less than 5%, the mean is returned
        ({"counted": 0.7, "relabelled": 0.6, "from-estimate": 0.6}, 0.59, 0.6, "mean", True),
        # the estimate's labels gain only 1%: the counted ones are kept, and the run from
        # the estimate, 29% better than their mean, replaces it
        ({"counted": 0.7, "relabelled": 0.69, "from-estimate": 0.5}, 0.7, 0.9, "start", False),
    ],
)
def test_the_noisy_fallback_picks_labels_and_estimate_by_fit(
    monkeypatch: pytest.MonkeyPatch,
    fits: dict[str, float],
    mean_fit: float,
    current_fit: float,
    returned: str,
    labels_from_estimate: bool,
) -> None:
    from spear.fallback import ENSEMBLE_RUNS, Estimate, best_noisy_estimate

    log = _scripted_matching(monkeypatch, fits, mean_fit)
    current = Estimate(
        torch.rand(4, 2), torch.tensor([3, 2, 1, 0]), current_fit, "approximate", "", current_fit
    )
    notes: list[str] = []
    best = best_noisy_estimate(
        torch.nn.Linear(2, 4), {}, current, 4, "gradient", 0, None, lambda: 100.0, notes
    )
    extra = log[3:]
    assert log[:3] == ["counted", "relabelled", "from-estimate"]
    assert extra == ["relabelled" if labels_from_estimate else "counted"] * (ENSEMBLE_RUNS - 1)
    if returned == "current":
        assert best is current
    elif returned == "start":
        assert best.certificate == fits["from-estimate"] and "started from" in notes[-1]
    else:
        assert best.certificate == mean_fit and "the mean of" in notes[-1]
        assert best.labels is not None and current.labels is not None
        assert torch.equal(best.labels, current.labels) == labels_from_estimate


def test_no_more_runs_where_the_approximate_estimate_fits_clearly_better(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spear.fallback import Estimate, best_noisy_estimate

    log = _scripted_matching(
        monkeypatch, {"counted": 0.7, "relabelled": 0.6, "from-estimate": 0.6}, 0.6
    )
    current = Estimate(torch.rand(4, 2), torch.tensor([3, 2, 1, 0]), 0.5, "approximate", "", 0.5)
    notes: list[str] = []
    best = best_noisy_estimate(
        torch.nn.Linear(2, 4), {}, current, 4, "gradient", 0, None, lambda: 100.0, notes
    )
    assert best is current and log == ["counted", "relabelled", "from-estimate"]
    assert "the approximate reconstruction is returned" in notes[-1]
