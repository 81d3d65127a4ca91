"""DP-SGD noise against reconstruction quality: spear and gradient matching side by side.

For each data set, batch size and noise multiplier: one DP-SGD client (Opacus, clip norm
1, one step, sampling rate b / 60000, delta 1e-5) in float32 on a ``in -> m -> 128 -> 10``
MLP (``m = 1000`` by default), on shipped Fashion-MNIST images or 32x32 RGB photo patches.
``spear.attack`` is told the batch size when there is noise and that pixels lie in
[0, 1]; gradient matching runs as the benchmark's baseline (200 Adam steps, boxed to
[0, 1]). Prints one Markdown row per case: epsilon, the ratio of the (b+1)-th to the b-th
singular value of the first layer's weight gradient, then for each attack PSNR and SSIM
(median and 10th percentile over the batch), labels correct, seconds, and for spear the
estimate returned and its predicted median PSNR (from its error bars)::

    python benchmarks/bench_dp.py [--data fmnist,rgb] [--batch-sizes 8,16,64]
        [--noise 0,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,0.1,1] [--plot dp.png]
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
from spear.networks import build_model
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


def run_case(
    data: str, b: int, noise: float, width: int, seed: int, time_budget: float, gm: bool
) -> tuple[str, float, float | None]:
    """One row of the table, spear's median PSNR and gradient matching's (or ``None``)."""
    pool = builtin_images() if data == "fmnist" else rgb_patches(RGB_POOL, seed=seed)
    images, labels = sample_batch(pool, b, seed=seed)
    shape = tuple(images.shape[1:])
    model = build_model(width, seed, input_shape=shape).float()
    dp = client.dp_sgd_update(
        model, images.float(), labels, max_grad_norm=1.0, noise_multiplier=noise, seed=seed
    )
    ratio = _noise_ratio(dp.update["1.weight"], b)
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
    ours = _score(rec.inputs, rec.labels, images, labels, time.perf_counter() - start)
    predicted = (
        f"{float(predicted_psnr(rec.error_rms).median()):.1f}" if rec.error_rms is not None else "-"
    )
    theirs: Scores | None = None
    if gm:
        start = time.perf_counter()
        base = gradient_matching_attack(
            model,
            dp.update,
            batch_size=b,
            input_shape=shape,
            seed=seed,
            iterations=GM_ITERATIONS,
            box=PIXEL_BOX,
        )
        theirs = _score(base.inputs, base.labels, images, labels, time.perf_counter() - start)
    eps = "inf" if math.isinf(dp.epsilon) else f"{dp.epsilon:.3g}"
    row = (
        f"| {data} | {b} | {noise:g} | {eps} | {ratio:.3g} | {rec.estimate} | {predicted} "
        f"| {_cells(ours, b)} | {_cells(theirs, b) if theirs else '- | - | - | -'} |"
    )
    return row, ours.psnr_median, theirs.psnr_median if theirs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fmnist,rgb", help="fmnist and/or rgb")
    parser.add_argument("--batch-sizes", default="8,16,64")
    parser.add_argument("--noise", default="0,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,0.1,1")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--time-budget", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip gradient matching")
    parser.add_argument("--plot", type=Path, default=None, help="write PSNR vs noise here")
    args = parser.parse_args(argv)
    noises = [float(v) for v in args.noise.split(",")]
    print(
        "| data | b | noise | epsilon | s_b+1/s_b | spear returns | predicted PSNR "
        "| spear PSNR med / p10 | spear SSIM med / p10 | spear labels | spear s "
        "| GM PSNR med / p10 | GM SSIM med / p10 | GM labels | GM s |"
    )
    print("|" + "---|" * 15)
    series: dict[str, tuple[list[float], list[float]]] = {}
    positive = [v for v in noises if v > 0]
    zero_at = min(positive) / ZERO_NOISE_OFFSET if positive else 1.0
    for data in args.data.split(","):
        for b in [int(v) for v in args.batch_sizes.split(",")]:
            for noise in noises:
                row, ours, theirs = run_case(
                    data, b, noise, args.width, args.seed, args.time_budget, not args.no_baseline
                )
                print(row, flush=True)
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
            title="DP-SGD (Opacus, clip 1, float32): PSNR against noise",
        )
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
