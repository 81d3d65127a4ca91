"""spear and breaching's Inverting Gradients (``breaching-ig``) on the same updates.

For each case one FedSGD client (mean cross-entropy, one step) in float32 (or
``--dtype float64``) sends its gradient, and both attacks get exactly that update:

* ``mlp``: ``spear.networks.build_model(1000, seed).float()`` (``784 -> 1000 -> 128 ->
  10``) on Fashion-MNIST (the local test split when installed, else the shipped images),
  at ``--mlp-batch-sizes``;
* ``flower-cnn`` (or ``--cnn vgg``): ``spear.networks.build_cnn(name, seed)`` in float32
  on 32x32 RGB photo patches, at ``--cnn-batch-sizes``; ``--trained`` first trains it
  ``TRAIN_STEPS`` SGD steps on other patches. spear recovers the features entering
  ``fc1`` (its row says how many came back exact: every value within 1e-3 of the largest)
  and rebuilds images from them (``spear.attack(image_budget=--image-budget)``); their
  PSNR and SSIM are in its row.

``breaching-ig`` runs with breaching's ``invertinggradients`` defaults and
``--iterations`` Adam steps (the step-size schedule follows them), stopped at
``--time-budget`` seconds; its labels are spear's (inferred from the head's gradient, as
for the gradient-matching baseline). ``--gradient-matching`` adds spear's own
Inverting-Gradients-style baseline with the same steps and budget. Prints one Markdown row
per case and attack: PSNR (median and 10th percentile over the batch), SSIM (median),
labels correct, seconds::

    python benchmarks/bench_breaching.py [--mlp-batch-sizes 8,16] [--cnn-batch-sizes 4,8]
        [--iterations 2000] [--time-budget 120] [--seeds 1] [--gradient-matching]
        [--cnn flower-cnn|vgg] [--trained] [--image-budget 60]

Needs the optional extra: ``pip install "spear[breaching]"``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import spear
from spear import client, metrics
from spear.baselines.breaching_ig import breaching_ig_attack, load_breaching
from spear.baselines.gradient_matching import gradient_matching_attack
from spear.data import ImageData, builtin_images, load_fashion_mnist, rgb_patches, sample_batch
from spear.networks import build_cnn, build_model
from spear.results import Reconstruction

#: Pixel range of every data set here.
PIXEL_BOX = (0.0, 1.0)
#: RGB patches drawn (each batch is sampled from them).
RGB_POOL = 400
#: A recovered feature vector is exact when every entry is within this fraction of the
#: largest true feature (float32; float64 uses ``spear.metrics.DEFAULT_REL_TOL``).
FEATURE_TOL = 1e-3
#: SGD steps (learning rate 0.05, batches of 32 other patches) of ``--trained``.
TRAIN_STEPS = 200


def _train(model: nn.Module, pool: ImageData, seed: int) -> None:
    """``TRAIN_STEPS`` SGD steps on patches of ``pool`` (not the attacked batch's seed)."""
    images, labels = sample_batch(pool, 256, seed=seed + 1000)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(TRAIN_STEPS):
        index = torch.arange(step * 32, step * 32 + 32) % images.shape[0]
        optimiser.zero_grad()
        batch = images[index].to(next(model.parameters()).dtype)
        nn.functional.cross_entropy(model(batch), labels[index]).backward()
        optimiser.step()


def _fashion() -> tuple[ImageData, str]:
    try:
        return load_fashion_mnist("test", n=2000), "Fashion-MNIST"
    except FileNotFoundError:
        return builtin_images(), "Fashion-MNIST (shipped 1000)"


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _image_cells(
    rec: Reconstruction,
    truth: torch.Tensor,
    truth_labels: torch.Tensor,
    images: torch.Tensor | None = None,
) -> str:
    """PSNR median / p10, SSIM median and labels of an image reconstruction (``images``,
    by default ``rec.inputs``)."""
    found = rec.inputs if images is None else images
    inputs = found.detach().to(torch.float64).reshape(-1, *truth.shape[1:])
    if inputs.shape[0] == 0:
        return "- | - | -"
    matching = metrics.match(inputs, truth)
    psnr = metrics.psnr(inputs, truth, matching=matching, reduction="none")
    ssim = metrics.ssim(inputs, truth, matching=matching, reduction="none")
    labels = "-"
    if rec.labels is not None and len(rec.labels) == inputs.shape[0]:
        correct = metrics.label_accuracy(rec.labels, truth_labels, matching) * truth.shape[0]
        labels = f"{round(correct)}/{truth.shape[0]}"
    return (
        f"{_fmt(float(np.median(psnr)))} / {_fmt(float(np.percentile(psnr, 10)))} "
        f"| {float(np.median(ssim)):.2f} | {labels}"
    )


def _feature_cells(
    rec: Reconstruction, features: torch.Tensor, truth: torch.Tensor, truth_labels: torch.Tensor
) -> str:
    """spear on a CNN: how many of the true features came back exact, and its images."""
    found = rec.inputs.detach().to(torch.float64)
    b = features.shape[0]
    if found.shape[0] == 0:
        return f"- (features: 0/{b} exact) | - | -"
    matching = metrics.match(found, features)
    tol = FEATURE_TOL if rec.inputs.dtype != torch.float64 else metrics.DEFAULT_REL_TOL
    exact = metrics.exact_rate(found, features, rel_tol=tol, matching=matching)
    counted = f"(features: {round(exact * b)}/{b} exact)"
    if rec.images is None:
        labels = "-"
        if rec.labels is not None and len(rec.labels) == found.shape[0]:
            correct = metrics.label_accuracy(rec.labels, truth_labels, matching) * b
            labels = f"{round(correct)}/{b}"
        return f"- {counted} | - | {labels}"
    return f"{_image_cells(rec, truth, truth_labels, rec.images)} {counted}"


def run_case(
    name: str,
    b: int,
    seed: int,
    iterations: int,
    time_budget: float,
    gm: bool,
    *,
    trained: bool = False,
    image_budget: float = 60.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """The rows of one case: spear, breaching-ig and optionally gradient matching."""
    model: nn.Module
    if name == "mlp":
        pool, data = _fashion()
        model = build_model(1000, seed).to(dtype)
    else:
        pool, data = rgb_patches(RGB_POOL, seed=seed), "RGB patches"
        model = build_cnn(name, seed, dtype=dtype)
        if trained:
            _train(model, pool, seed)
    images, labels = sample_batch(pool, b, seed=seed)
    shape = tuple(images.shape[1:])
    images = images.to(dtype)
    update = client.fedsgd_update(model, images, labels)
    state = "trained" if trained and name != "mlp" else "untrained"
    precision = str(dtype).removeprefix("torch.")
    prefix = f"| {name} ({state}, {precision}) | {data} | {b} | {seed} |"
    rows: list[str] = []

    start = time.perf_counter()
    rec = spear.attack(
        model,
        update,
        input_shape=shape,
        seed=seed,
        time_budget=time_budget,
        progress=False,
        input_range=PIXEL_BOX,
        image_budget=image_budget,
    )
    seconds = time.perf_counter() - start
    if rec.feature_space:
        features_of: Callable[[torch.Tensor], torch.Tensor] = model.features  # type: ignore[assignment]
        with torch.no_grad():
            features = features_of(images).to(torch.float64)
        cells = _feature_cells(rec, features, images, labels)
    else:
        cells = _image_cells(rec, images, labels)
    rows.append(f"{prefix} spear | {cells} | {seconds:.1f} |")

    attacks: list[tuple[str, Callable[..., Reconstruction], dict[str, object]]] = [
        ("breaching-ig", breaching_ig_attack, {}),
    ]
    if gm:
        attacks.append(("gradient-matching", gradient_matching_attack, {"box": PIXEL_BOX}))
    for attack, function, options in attacks:
        start = time.perf_counter()
        rec = function(
            model,
            update,
            batch_size=b,
            input_shape=shape,
            seed=seed,
            time_budget=time_budget,
            iterations=iterations,
            **options,
        )
        seconds = time.perf_counter() - start
        steps = next(note.split(" Adam steps")[0] for note in rec.notes if "Adam steps" in note)
        rows.append(
            f"{prefix} {attack} ({steps.split()[-1]} steps) | "
            f"{_image_cells(rec, images, labels)} | {seconds:.1f} |"
        )
    return rows


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mlp-batch-sizes", default="8,16")
    parser.add_argument("--cnn-batch-sizes", default="4,8")
    parser.add_argument("--cnn", default="flower-cnn", help="flower-cnn or vgg")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--gradient-matching", action="store_true")
    parser.add_argument("--trained", action="store_true", help="train the CNN first")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--image-budget", type=float, default=60.0, help="seconds for spear's CNN images"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_breaching()  # the optional extra: fail before any case
    print("| model | data | b | seed | attack | PSNR med / p10 | SSIM med | labels | seconds |")
    print("|" + "---|" * 9)
    cases = [("mlp", b) for b in _ints(args.mlp_batch_sizes)]
    cases += [(args.cnn, b) for b in _ints(args.cnn_batch_sizes)]
    for name, b in cases:
        for seed in range(args.seeds):
            for row in run_case(
                name,
                b,
                seed,
                args.iterations,
                args.time_budget,
                args.gradient_matching,
                trained=args.trained,
                image_budget=args.image_budget,
                dtype=getattr(torch, args.dtype),
            ):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
