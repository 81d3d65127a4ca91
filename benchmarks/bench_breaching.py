"""spear and breaching's Inverting Gradients (``breaching-ig``) on the same updates.

For each case one FedSGD client (mean cross-entropy, one step) sends its gradient, and
every attack gets exactly that update and the batch size (as a Flower server gets the
client's ``num_examples``):

* ``mlp``: ``spear.networks.build_model(1000, seed)`` (``784 -> 1000 -> 128 -> 10``) on
  Fashion-MNIST (the local test split when installed, else the shipped images), at
  ``--mlp-batch-sizes``;
* ``flower-cnn``, ``vgg`` and ``vgg-bn`` (``--cnns``; ``vgg-bn`` has BatchNorm in training
  mode after each convolution): ``spear.networks.build_cnn(name, seed)`` on
  32x32 RGB photo patches (the first half of ``spear.data.rgb_patches(1000)``; the same
  data as ``benchmarks/bench_cnn.py``), at ``--cnn-batch-sizes``, untrained and/or after
  200 SGD steps on the other half (``--trained no,yes``, ``spear.networks.pretrain``).
  spear recovers the features entering ``fc1`` (its row says how many came back exact:
  every value within 1e-3 of the largest in float32, ``spear.metrics.DEFAULT_REL_TOL``
  in float64) and rebuilds images from them
  (``spear.attack(image_budget=--image-budget)``).

``breaching-ig`` runs with breaching's ``invertinggradients`` defaults and
``--iterations`` Adam steps (the step-size schedule follows them), stopped at
``--time-budget`` seconds; its labels are spear's (inferred from the head's gradient, as
for the gradient-matching baseline). ``--gradient-matching`` adds spear's own
Inverting-Gradients-style baseline with the same steps and budget.

Prints one Markdown row per case and attack (PSNR median and 10th percentile over the
batch, SSIM median, labels correct, seconds), then a summary over the seeds: the examples
of every seed pooled, so "PSNR med / p10" is over ``seeds x b`` images; a true example
an attack returned no image for counts as missing (it is in neither percentile), and
"images" says how many came back::

    python benchmarks/bench_breaching.py [--mlp-batch-sizes 8,16] [--cnn-batch-sizes 4,8]
        [--cnns flower-cnn,vgg] [--trained no,yes] [--dtypes float32,float64]
        [--iterations 2000] [--time-budget 120] [--seeds 1] [--gradient-matching]
        [--image-budget 60]

Needs the optional extra: ``pip install "spear[breaching]"``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import spear
from spear import client, metrics
from spear.baselines.breaching_ig import breaching_ig_attack, load_breaching
from spear.baselines.gradient_matching import gradient_matching_attack
from spear.data import ImageData, builtin_images, load_fashion_mnist, rgb_patches, sample_batch
from spear.networks import build_cnn, build_model, pretrain
from spear.results import Reconstruction

#: Pixel range of every data set here.
PIXEL_BOX = (0.0, 1.0)
#: RGB patches drawn: batches come from the first half, ``--trained`` trains on the other
#: half.
RGB_POOL = 1000
#: A recovered feature vector is exact when every entry is within this fraction of the
#: largest true feature (float32; float64 uses ``spear.metrics.DEFAULT_REL_TOL``).
FEATURE_TOL = 1e-3


@dataclass
class Outcome:
    """What one attack returned on one case, measured against the truth.

    ``psnr`` and ``ssim`` hold one value per returned image (matched to the truth);
    ``features`` counts exact feature vectors (``None`` where there are none to count);
    ``steps`` the Adam steps an optimisation attack ran (``None`` for spear).
    """

    setting: str
    b: int
    attack: str
    seconds: float
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    labels: int | None = None
    features: int | None = None
    steps: int | None = None

    def name(self, steps: str | None = None) -> str:
        """The attack, with its steps (``steps``, or its own) when it counts them."""
        shown = steps if steps is not None else self.steps
        return self.attack if shown is None else f"{self.attack} ({shown} steps)"


def _fashion() -> tuple[ImageData, str]:
    try:
        return load_fashion_mnist("test", n=2000), "Fashion-MNIST"
    except FileNotFoundError:
        return builtin_images(), "Fashion-MNIST (shipped 1000)"


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _measure_images(
    out: Outcome,
    truth: torch.Tensor,
    truth_labels: torch.Tensor,
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    counts: torch.Tensor | None = None,
) -> None:
    """Fill ``out`` with the PSNR, SSIM and labels ``(k,)`` of ``images`` ``(k, C, H, W)``;
    ``counts`` ``(j,)``, ``j <= k``: how many examples of the batch each of the first ``j``
    images stands for (an example the update shows counted twice is matched twice)."""
    if images is None or images.shape[0] == 0:
        return
    if counts is not None and bool((counts > 1).any()):
        repeats = torch.ones(images.shape[0], dtype=torch.int64)
        repeats[: counts.shape[0]] = counts.cpu()
        images = torch.repeat_interleave(images, repeats.to(images.device), dim=0)
        if labels is not None and len(labels) == repeats.shape[0]:
            labels = torch.repeat_interleave(labels, repeats.to(labels.device), dim=0)
    found = images.detach().to(torch.float64).reshape(-1, *truth.shape[1:])
    matching = metrics.match(found, truth)
    out.psnr = metrics.psnr(found, truth, matching=matching, reduction="none").tolist()
    out.ssim = metrics.ssim(found, truth, matching=matching, reduction="none").tolist()
    if labels is not None and len(labels) == found.shape[0]:
        correct = metrics.label_accuracy(labels, truth_labels, matching) * truth.shape[0]
        out.labels = round(correct)


def _measure_features(
    out: Outcome, rec: Reconstruction, features: torch.Tensor, dtype: torch.dtype
) -> None:
    """Count ``rec``'s exact feature vectors against ``features`` ``(b, n)``, at the
    tolerance of the update's ``dtype`` (the features come back in float64 either way)."""
    found = rec.inputs.detach().to(torch.float64)
    out.features = 0
    if found.shape[0] == 0:
        return
    matching = metrics.match(found, features)
    tol = FEATURE_TOL if dtype != torch.float64 else metrics.DEFAULT_REL_TOL
    exact = metrics.exact_rate(found, features, rel_tol=tol, matching=matching)
    out.features = round(exact * features.shape[0])


def _case_data(
    name: str, b: int, seed: int, trained: bool, dtype: torch.dtype
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """The case's model, batch ``(b, C, H, W)``, labels ``(b,)`` and data name."""
    model: nn.Module
    if name == "mlp":
        pool, data = _fashion()
        model = build_model(1000, seed).to(dtype)
        images, labels = sample_batch(pool, b, seed=seed)
        return model, images.to(dtype), labels, data
    patches = rgb_patches(RGB_POOL, seed=0)
    half = len(patches) // 2
    model = build_cnn(name, seed, dtype=dtype)
    if trained:
        pretrain(model, patches.images[half:], patches.labels[half:], seed=seed)
    images, labels = sample_batch(patches.subset(half), b, seed=seed + 1)
    return model, images.to(dtype), labels, "RGB patches"


def run_case(
    name: str,
    b: int,
    seed: int,
    args: argparse.Namespace,
    *,
    trained: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[Outcome]:
    """Every attack on one case."""
    model, images, labels, data = _case_data(name, b, seed, trained, dtype)
    shape = tuple(images.shape[1:])
    update = client.fedsgd_update(model, images, labels)
    state = "trained" if trained and name != "mlp" else "untrained"
    precision = str(dtype).removeprefix("torch.")
    setting = f"{name} ({state}, {precision}) | {data}"

    start = time.perf_counter()
    rec = spear.attack(
        model,
        update,
        input_shape=shape,
        batch_size=b,
        seed=seed,
        time_budget=args.time_budget,
        progress=False,
        input_range=PIXEL_BOX,
        image_budget=args.image_budget,
    )
    out = Outcome(setting, b, "spear", time.perf_counter() - start)
    if rec.feature_space:
        features_of: Callable[[torch.Tensor], torch.Tensor] = model.features  # type: ignore[assignment]
        with torch.no_grad():
            _measure_features(out, rec, features_of(images).to(torch.float64), images.dtype)
        counts = rec.multiplicity
        if counts is not None and counts.shape[0] > rec.images_from_features:
            counts = None
        _measure_images(out, images, labels, rec.images, rec.image_labels, counts)
    else:
        _measure_images(out, images, labels, rec.inputs, rec.labels, rec.multiplicity)
    outcomes = [out]

    attacks: list[tuple[str, Callable[..., Reconstruction], dict[str, object]]] = [
        ("breaching-ig", breaching_ig_attack, {}),
    ]
    if args.gradient_matching:
        attacks.append(("gradient-matching", gradient_matching_attack, {"box": PIXEL_BOX}))
    for attack, function, options in attacks:
        start = time.perf_counter()
        rec = function(
            model,
            update,
            batch_size=b,
            input_shape=shape,
            seed=seed,
            time_budget=args.time_budget,
            iterations=args.iterations,
            **options,
        )
        seconds = time.perf_counter() - start
        steps = next(note.split(" Adam steps")[0] for note in rec.notes if "Adam steps" in note)
        out = Outcome(setting, b, attack, seconds, steps=int(steps.split()[-1]))
        _measure_images(out, images, labels, rec.inputs, rec.labels)
        outcomes.append(out)
    return outcomes


def _percentiles(values: list[float], digits: int = 1) -> str:
    """``"median / 10th percentile"`` of ``values``."""
    if not values:
        return "- / -"
    median, p10 = float(np.median(values)), float(np.percentile(values, 10))
    if digits == 1:
        return f"{_fmt(median)} / {_fmt(p10)}"
    return f"{median:.{digits}f} / {p10:.{digits}f}"


def case_row(out: Outcome, seed: int) -> str:
    """One Markdown row: one attack on one case."""
    labels = "-" if out.labels is None else f"{out.labels}/{out.b}"
    if out.features is not None:
        labels += f" (features: {out.features}/{out.b} exact)"
    ssim = f"{float(np.median(out.ssim)):.2f}" if out.ssim else "-"
    return (
        f"| {out.setting} | {out.b} | {seed} | {out.name()} | {_percentiles(out.psnr)} "
        f"| {ssim} | {labels} | {out.seconds:.1f} |"
    )


def summary_row(group: list[Outcome]) -> str:
    """One Markdown row: one attack on every seed of a setting, examples pooled."""
    first = group[0]
    total = sum(out.b for out in group)
    psnr = [v for out in group for v in out.psnr]
    ssim = [v for out in group for v in out.ssim]
    features = "-"
    if first.features is not None:
        features = f"{sum(out.features or 0 for out in group)}/{total}"
    labels = sum(out.labels or 0 for out in group)
    seconds = float(np.median([out.seconds for out in group]))
    counts = sorted({out.steps for out in group if out.steps is not None})
    steps = (
        None if not counts else f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    )
    return (
        f"| {first.setting} | {first.b} | {first.name(steps)} | {features} | {len(psnr)}/{total} "
        f"| {_percentiles(psnr)} | {_percentiles(ssim, 2)} "
        f"| {labels}/{total} | {seconds:.1f} |"
    )


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mlp-batch-sizes", default="8,16")
    parser.add_argument("--cnn-batch-sizes", default="4,8")
    parser.add_argument("--cnns", default="flower-cnn", help="flower-cnn, vgg, vgg-bn")
    parser.add_argument("--trained", default="no", help="CNNs untrained (no), trained (yes)")
    parser.add_argument("--dtypes", default="float32", help="float32, float64 or both")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--gradient-matching", action="store_true")
    parser.add_argument(
        "--image-budget", type=float, default=60.0, help="seconds for spear's CNN images"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)
    load_breaching()  # the optional extra: fail before any case
    settings = [
        (name, b, trained == "yes", getattr(torch, dtype))
        for dtype in args.dtypes.split(",")
        for name, sizes, states in (
            ("mlp", args.mlp_batch_sizes, "no"),
            *((cnn, args.cnn_batch_sizes, args.trained) for cnn in args.cnns.split(",") if cnn),
        )
        for trained in states.split(",")
        for b in _ints(sizes)
    ]
    print("| model | data | b | seed | attack | PSNR med / p10 | SSIM med | labels | seconds |")
    print("|" + "---|" * 9)
    groups: dict[tuple[str, int, str], list[Outcome]] = {}
    for name, b, trained, dtype in settings:
        for seed in range(args.seeds):
            for out in run_case(name, b, seed, args, trained=trained, dtype=dtype):
                print(case_row(out, seed), flush=True)
                groups.setdefault((out.setting, out.b, out.attack), []).append(out)
    print(f"\nSummary over {args.seeds} seed(s), examples pooled:\n")
    print(
        "| model | data | b | attack | features exact | images | PSNR med / p10 "
        "| SSIM med / p10 | labels | seconds (median) |"
    )
    print("|" + "---|" * 10)
    for group in groups.values():
        print(summary_row(group))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
