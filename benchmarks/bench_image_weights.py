"""Images from features under DP-SGD clipping: the gradient term with and without weights.

Behind convolutions :func:`spear.attack` rebuilds images from the recovered features, the
conv layers' gradients and a smoothness prior (:mod:`spear.images`). Under DP-SGD each
example's gradient is clipped by its own factor ``c_i``, so the update weighs the examples
unequally; the gradient term recomputes the conv layers' gradients with each example's
loss weighted by ``1 / |B_i|`` (:func:`spear.images.example_weights`), the divisor its
label was read with. This benchmark measures what those weights give against a plain
mean, on the same features and labels and with the same fixed number of Adam steps (so
that CPU load does not change the comparison).

For each CNN, trained or not, and batch size: Opacus DP-SGD clipping (clip norm
``--clip``, no noise) of a float32 CNN of :func:`spear.networks.build_cnn` on 32x32 RGB
photo patches (half of a pool of 1000, the other half trains the network with
:func:`spear.networks.pretrain` when ``trained``); ``spear.attack`` for the features
(``image_budget=0``); labels and divisors from
:func:`spear.labels.recover_labels`; then :func:`spear.images.images_from_features` twice.
Batches whose features do not all come back are skipped (the gradient term is used only
for a complete batch), as are those whose divisors give no weights. Prints one Markdown
row per batch and a summary row per case::

    python benchmarks/bench_image_weights.py [--models flower-cnn] [--trained no,yes]
        [--batch-sizes 4,8] [--seeds 6] [--steps 3000] [--clip 1.0]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import spear
from spear import client, metrics
from spear.data import rgb_patches, sample_batch
from spear.images import example_weights, gradient_term, images_from_features
from spear.labels import recover_labels
from spear.model import find_target
from spear.networks import build_cnn, pretrain

#: RGB patches drawn: the first half is sampled for batches, the second trains.
POOL = 1000
#: Seconds for the features (the images' time is set by ``--steps``, not by a budget).
FEATURE_BUDGET = 30.0
PIXEL_BOX = (0.0, 1.0)
SHAPE = (3, 32, 32)


def run_case(
    model_name: str, trained: bool, b: int, seed: int, steps: int, clip: float
) -> tuple[float, float, float] | None:
    """``(clip spread, plain PSNR, weighted PSNR)`` (median over the batch, dB) of one
    batch, or ``None`` when its features do not all come back or its divisors give no
    weights (:func:`spear.images.example_weights`)."""
    pool = rgb_patches(POOL, seed=0)
    half = len(pool) // 2
    images, labels = sample_batch(pool.subset(half), b, seed=seed)
    net = build_cnn(model_name, seed, dtype=torch.float32)
    if trained:
        pretrain(net, pool.images[half:], pool.labels[half:], seed=seed)
    update = client.dp_sgd_update(
        net, images.float(), labels, max_grad_norm=clip, noise_multiplier=0.0, seed=seed
    ).update
    rec = spear.attack(
        net,
        update,
        seed=seed,
        time_budget=FEATURE_BUDGET,
        image_budget=0,
        progress=False,
        input_range=PIXEL_BOX,
        input_shape=SHAPE,
    )
    target = find_target(net)
    if rec.layer_result is None or not rec.complete or target.after is None:
        return None
    if target.before is None:
        raise RuntimeError(f"{model_name}: no layers before the attacked one")
    features = rec.inputs.reshape(rec.inputs.shape[0], -1).to(torch.float32)
    read = recover_labels(
        target.after,
        target.weight.detach(),
        target.bias.detach() if target.bias is not None else None,
        features,
        rec.layer_result.output_grads.cpu(),
    )
    weights = example_weights(read.divisor, read.fit_error)
    if weights is None:
        return None
    psnr: list[float] = []
    for w in (None, weights):
        term = gradient_term(net, target.before, update, read.labels, sign=1.0, weights=w)
        found = images_from_features(
            target.before,
            features,
            SHAPE,
            gradients=term,
            input_range=PIXEL_BOX,
            time_budget=math.inf,
            steps=steps,
            seed=seed,
        )
        psnr.append(float(metrics.summarize(found.images, images)["psnr_median"] or 0.0))
    spread = float(read.divisor.abs().max() / read.divisor.abs().min())
    return spread, psnr[0], psnr[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="flower-cnn")
    parser.add_argument("--trained", default="no,yes")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--seeds", type=int, default=6, help="batches per case (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps of each search")
    parser.add_argument("--clip", type=float, default=1.0, help="DP-SGD clipping norm")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| model | trained | b | seed | clip spread (max / min B_i) | plain PSNR | "
        "weighted PSNR | weighted - plain dB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary: list[str] = []
    for model_name in args.models.split(","):
        for trained in args.trained.split(","):
            for b in (int(v) for v in args.batch_sizes.split(",")):
                rows = []
                for seed in range(args.seeds):
                    out = run_case(model_name, trained == "yes", b, seed, args.steps, args.clip)
                    if out is None:
                        skipped = f"| {model_name} | {trained} | {b} | {seed} | skipped |"
                        print(skipped + " - | - | - |")
                        continue
                    spread, plain, weighted = out
                    rows.append((plain, weighted))
                    print(
                        f"| {model_name} | {trained} | {b} | {seed} | {spread:.3g} | "
                        f"{plain:.2f} | {weighted:.2f} | {weighted - plain:+.2f} |",
                        flush=True,
                    )
                if rows:
                    plain_m = float(np.median([p for p, _ in rows]))
                    weighted_m = float(np.median([w for _, w in rows]))
                    gaps = [w - p for p, w in rows]
                    summary.append(
                        f"| {model_name} | {trained} | {b} | {len(rows)} | {plain_m:.2f} | "
                        f"{weighted_m:.2f} | {sum(g >= 0 for g in gaps)}/{len(gaps)} | "
                        f"{float(np.median(gaps)):+.2f} / {min(gaps):+.2f} / {max(gaps):+.2f} |"
                    )
    print()
    print(
        "| model | trained | b | batches | plain PSNR (median) | weighted PSNR (median) | "
        "weighted >= plain | weighted - plain dB (median / worst / best) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in summary:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
