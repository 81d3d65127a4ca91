"""DP-SGD noise against reconstruction quality: spear and gradient matching side by side.

For each data set, batch size and noise multiplier: one DP-SGD client (Opacus, clip norm
1, one step, sampling rate b / 60000, delta 1e-5) in float32 on a ``in -> m -> 128 -> 10``
MLP (``m = 1000`` by default), on shipped Fashion-MNIST images or 32x32 RGB photo patches;
or, with ``--model flower-cnn`` or ``--model vgg`` (untrained, RGB patches only), on one of
the convolutional networks of :func:`spear.networks.build_cnn`. There spear attacks the
first linear layer behind the convolutions and the images it returns are rebuilt from
the features it finds (``.images``), so those are scored.
``spear.attack`` is told the batch size when there is noise and that pixels lie in
[0, 1]; gradient matching runs as the benchmark's baseline (200 Adam steps, boxed to
[0, 1]). Prints one Markdown row per case: epsilon, the ratio of the (b+1)-th to the b-th
singular value of the first layer's weight gradient, then for each attack PSNR and SSIM
(median and 10th percentile over the batch), labels correct, seconds, and for spear the
estimate returned and its predicted median PSNR (from its error bars)::

    python benchmarks/bench_dp.py [--data fmnist,rgb] [--batch-sizes 8,16,64]
        [--noise 0,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,0.1,1] [--plot dp.png] [--batches 10]
        [--model mlp|flower-cnn|vgg]

With ``--batches N`` each row summarises N batches (seeds ``--seed`` to ``--seed + N - 1``):
every score is the median over the batches of that batch's score, the estimate returned
is counted by kind, and two more columns compare the attacks batch by batch: in how many
batches spear's median PSNR is at least gradient matching's, and the median and lowest
of the differences (spear minus gradient matching, dB).

With ``--baseline-runs K`` (K > 1) gradient matching runs K times on each update, the
first as above and the others from other random inputs (seeds ``seed + 1000 k``): two
more columns give the median and the best of the K runs' median PSNRs (each row: the
median over its batches), and with ``--batches`` one more counts the batches where
spear's median PSNR is at least the median run's. One run of gradient matching is one
draw from a spread of several dB; these columns show where the baseline's own run sits
in it.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import spear
from spear import client, metrics
from spear.baselines.gradient_matching import gradient_matching_attack
from spear.data import builtin_images, rgb_patches, sample_batch
from spear.networks import CNNS, build_cnn, build_model
from spear.noisy import predicted_psnr
from spear.report import plot_lines

#: Adam steps and pixel box of the gradient-matching baseline (as ``spear bench`` runs it).
GM_ITERATIONS = 200
PIXEL_BOX = (0.0, 1.0)
#: RGB patches drawn (the batch is sampled from them).
RGB_POOL = 400
#: Where a noise multiplier of 0 sits on the plot's log axis: this factor below the
#: smallest non-zero one.
ZERO_NOISE_OFFSET = 10.0
#: Seeds of the extra gradient-matching runs (``--baseline-runs``): ``seed + stride * k``,
#: far from the seeds ``seed + 1, seed + 2, ...`` that spear's own matching runs draw.
BASELINE_SEED_STRIDE = 1000


@dataclass
class Scores:
    """One attack's scores on one case."""

    psnr_median: float
    psnr_p10: float
    ssim_median: float
    ssim_p10: float
    labels: int | None
    seconds: float


def _score(
    inputs: torch.Tensor,
    labels: torch.Tensor | None,
    truth: torch.Tensor,
    truth_labels: torch.Tensor,
    seconds: float,
) -> Scores:
    """PSNR, SSIM (median, 10th percentile) and labels of a reconstruction ``(k, C, H, W)``."""
    matching = metrics.match(inputs, truth)
    psnr = metrics.psnr(inputs, truth, matching=matching, reduction="none")
    ssim = metrics.ssim(inputs, truth, matching=matching, reduction="none")
    correct = None
    if labels is not None:
        correct = round(metrics.label_accuracy(labels, truth_labels, matching) * truth.shape[0])
    return Scores(
        psnr_median=float(np.median(psnr)),
        psnr_p10=float(np.percentile(psnr, 10)),
        ssim_median=float(np.median(ssim)),
        ssim_p10=float(np.percentile(ssim, 10)),
        labels=correct,
        seconds=seconds,
    )


def _noise_ratio(weight_grad: torch.Tensor, b: int) -> float:
    """``s_{b+1} / s_b`` of the first layer's weight gradient."""
    s = torch.linalg.svdvals(weight_grad.detach().to(torch.float64))
    return float(s[b] / s[b - 1]) if b < s.numel() else 0.0


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _cells(s: Scores, b: int) -> str:
    labels = "-" if s.labels is None else f"{s.labels}/{b}"
    return (
        f"{_fmt(s.psnr_median)} / {_fmt(s.psnr_p10)} | {s.ssim_median:.2f} / {s.ssim_p10:.2f} "
        f"| {labels} | {s.seconds:.1f}"
    )


@dataclass
class Case:
    """One batch's outcome: the update's noise ratio, what spear returned and both scores."""

    epsilon: float
    ratio: float
    estimate: str
    predicted: float | None
    ours: Scores
    theirs: Scores | None
    runs: list[float]


def run_case(
    data: str,
    b: int,
    noise: float,
    width: int,
    seed: int,
    time_budget: float,
    gm: bool,
    baseline_runs: int = 1,
    model_name: str = "mlp",
) -> Case:
    """Both attacks on one DP-SGD client batch, scored against the truth; with
    ``baseline_runs > 1`` also the median PSNR of each of that many gradient-matching runs.
    ``model_name`` is ``"mlp"`` (width ``width``) or a key of :data:`spear.networks.CNNS`."""
    pool = builtin_images() if data == "fmnist" else rgb_patches(RGB_POOL, seed=seed)
    images, labels = sample_batch(pool, b, seed=seed)
    shape = tuple(images.shape[1:])
    if model_name == "mlp":
        model, attacked = build_model(width, seed, input_shape=shape).float(), "1"
    else:
        model, attacked = build_cnn(model_name, seed, dtype=torch.float32), "fc1"
    dp = client.dp_sgd_update(
        model, images.float(), labels, max_grad_norm=1.0, noise_multiplier=noise, seed=seed
    )
    ratio = _noise_ratio(dp.update[f"{attacked}.weight"], b)
    start = time.perf_counter()
    rec = spear.attack(
        model,
        dp.update,
        batch_size=b if noise > 0 else None,
        input_shape=shape,
        seed=seed,
        time_budget=time_budget,
        progress=False,
        input_range=PIXEL_BOX,
    )
    seconds = time.perf_counter() - start
    if rec.feature_space:
        # features of a layer behind convolutions: score the images rebuilt from them
        if rec.images is None:
            raise RuntimeError(f"spear returned features of {rec.layer!r} and no images")
        ours = _score(rec.images, rec.image_labels, images, labels, seconds)
    else:
        ours = _score(rec.inputs, rec.labels, images, labels, seconds)
    predicted = float(predicted_psnr(rec.error_rms).median()) if rec.error_rms is not None else None
    theirs: Scores | None = None
    runs: list[float] = []
    for k in range(baseline_runs if gm else 0):
        start = time.perf_counter()
        base = gradient_matching_attack(
            model,
            dp.update,
            batch_size=b,
            input_shape=shape,
            seed=seed + BASELINE_SEED_STRIDE * k,
            iterations=GM_ITERATIONS,
            box=PIXEL_BOX,
        )
        scores = _score(base.inputs, base.labels, images, labels, time.perf_counter() - start)
        theirs = scores if k == 0 else theirs
        runs.append(scores.psnr_median)
    return Case(dp.epsilon, ratio, rec.estimate, predicted, ours, theirs, runs)


def _median_scores(scores: list[Scores]) -> Scores:
    """Each score's median over batches (labels rounded down to a whole count)."""

    def med(values: list[float]) -> float:
        return float(np.median(values))

    labels = [s.labels for s in scores if s.labels is not None]
    return Scores(
        psnr_median=med([s.psnr_median for s in scores]),
        psnr_p10=med([s.psnr_p10 for s in scores]),
        ssim_median=med([s.ssim_median for s in scores]),
        ssim_p10=med([s.ssim_p10 for s in scores]),
        labels=int(np.median(labels)) if labels else None,
        seconds=med([s.seconds for s in scores]),
    )


def format_row(data: str, b: int, noise: float, cases: list[Case]) -> str:
    """One Markdown row for one or several batches of the same case (see the module doc)."""
    first = cases[0]
    eps = "inf" if math.isinf(first.epsilon) else f"{first.epsilon:.3g}"
    ratio = float(np.median([c.ratio for c in cases]))
    kinds = sorted({c.estimate for c in cases})
    returned = (
        first.estimate
        if len(cases) == 1
        else ", ".join(f"{sum(c.estimate == k for c in cases)} {k}" for k in kinds)
    )
    predicted = [c.predicted for c in cases if c.predicted is not None]
    shown = f"{float(np.median(predicted)):.1f}" if len(predicted) == len(cases) else "-"
    ours = _median_scores([c.ours for c in cases])
    pairs = [(c.ours, c.theirs) for c in cases if c.theirs is not None]
    theirs = _median_scores([t for _, t in pairs]) if pairs else None
    row = (
        f"| {data} | {b} | {noise:g} | {eps} | {ratio:.3g} | {returned} | {shown} "
        f"| {_cells(ours, b)} | {_cells(theirs, b) if theirs else '- | - | - | -'} |"
    )
    if len(cases) > 1:
        gaps = [o.psnr_median - t.psnr_median for o, t in pairs]
        row += (
            f" {sum(g >= 0 for g in gaps)}/{len(gaps)} | "
            f"{float(np.median(gaps)):.1f} / {min(gaps):.1f} |"
            if gaps
            else " - | - |"
        )
    spread = [c for c in cases if len(c.runs) > 1]
    if spread:
        middle = [float(np.median(c.runs)) for c in spread]
        best = [max(c.runs) for c in spread]
        row += (
            f" {float(np.median(middle)):.1f} / {float(np.median(best)):.1f} "
            f"({len(spread[0].runs)} runs) |"
        )
        if len(cases) > 1:
            above = sum(c.ours.psnr_median >= m for c, m in zip(spread, middle, strict=True))
            row += f" {above}/{len(spread)} |"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fmnist,rgb", help="fmnist and/or rgb")
    parser.add_argument("--batch-sizes", default="8,16,64")
    parser.add_argument("--noise", default="0,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,0.1,1")
    parser.add_argument("--width", type=int, default=1000, help="the MLP's first width")
    parser.add_argument(
        "--model",
        default="mlp",
        choices=["mlp", *sorted(name for name in CNNS if name != "vgg-bn")],
        help="the MLP, or a CNN (untrained; RGB patches only; Opacus refuses BatchNorm)",
    )
    parser.add_argument("--time-budget", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batches", type=int, default=1, help="batches per row (seeds --seed, --seed + 1, ...)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip gradient matching")
    parser.add_argument(
        "--baseline-runs",
        type=int,
        default=1,
        help="gradient-matching runs per update, from other random inputs (see the module doc)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="write PSNR vs noise here")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches must be at least 1, got {args.batches}")
    if args.baseline_runs < 1:
        parser.error(f"--baseline-runs must be at least 1, got {args.baseline_runs}")
    noises = [float(v) for v in args.noise.split(",")]
    if args.model != "mlp" and args.data != "rgb":
        parser.error(f"--model {args.model} takes 32x32 RGB inputs: pass --data rgb")
    header = (
        "| data | b | noise | epsilon | s_b+1/s_b | spear returns | predicted PSNR "
        "| spear PSNR med / p10 | spear SSIM med / p10 | spear labels | spear s "
        "| GM PSNR med / p10 | GM SSIM med / p10 | GM labels | GM s |"
    )
    columns = 15
    if args.batches > 1:
        header += " spear >= GM | spear - GM dB med / worst |"
        columns += 2
    if args.baseline_runs > 1 and not args.no_baseline:
        header += " GM runs PSNR med / best |"
        columns += 1
        if args.batches > 1:
            header += " spear >= GM median run |"
            columns += 1
    print(header)
    print("|" + "---|" * columns)
    series: dict[str, tuple[list[float], list[float]]] = {}
    positive = [v for v in noises if v > 0]
    zero_at = min(positive) / ZERO_NOISE_OFFSET if positive else 1.0
    for data in args.data.split(","):
        for b in [int(v) for v in args.batch_sizes.split(",")]:
            for noise in noises:
                cases = [
                    run_case(
                        data,
                        b,
                        noise,
                        args.width,
                        seed,
                        args.time_budget,
                        not args.no_baseline,
                        args.baseline_runs,
                        args.model,
                    )
                    for seed in range(args.seed, args.seed + args.batches)
                ]
                print(format_row(data, b, noise, cases), flush=True)
                ours = _median_scores([c.ours for c in cases]).psnr_median
                known = [c.theirs for c in cases if c.theirs is not None]
                theirs = _median_scores(known).psnr_median if known else None
                x = math.log10(noise if noise > 0 else zero_at)
                for name, value in ((f"spear {data} b={b}", ours), (f"GM {data} b={b}", theirs)):
                    if value is not None:
                        series.setdefault(name, ([], []))
                        series[name][0].append(x)
                        series[name][1].append(min(value, 100.0))
    if args.plot is not None:
        path = plot_lines(
            series,
            args.plot,
            xlabel=f"log10 noise multiplier (0 at {math.log10(zero_at):.0f})",
            ylabel="median PSNR (dB, capped at 100)",
            title=f"DP-SGD (Opacus, clip 1, float32, {args.model}): PSNR against noise",
        )
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
