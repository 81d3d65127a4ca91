"""``spear demo``: simulate a client on real images, attack its update, show the result."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import spear
from spear import client, metrics, report, validate
from spear.cli.demo_cnn import CNN_DEMO_MODELS, print_cnn_summary, run_cnn_demo
from spear.data import builtin_images, sample_batch
from spear.errors import InputError
from spear.networks import DEMO_INPUT_SHAPE, build_model
from spear.noisy import predicted_psnr
from spear.update import UpdateKind

__all__ = ["add_parser", "max_batch_size", "run", "run_demo"]

#: Examples in the demo's batch (the MLP).
DEFAULT_BATCH_SIZE = 16
#: Examples in the batch of a CNN demo when --batch-size is not given.
CNN_BATCH_SIZE = 8
#: Pixel range of the shipped images, told to the attack (clips noisy estimates, boxes
#: the gradient-matching fallback).
PIXEL_RANGE = (0.0, 1.0)


def add_parser(sub: Any) -> None:
    """Register the ``demo`` sub-command."""
    p = sub.add_parser(
        "demo",
        help="rebuild a simulated client's batch of real images exactly",
        description=(
            "Simulates one client on Fashion-MNIST images that ship with spear (no "
            "download), attacks its update with spear.attack, prints a per-example table "
            "and writes an image grid (originals on top, reconstructions below)."
        ),
    )
    p.add_argument(
        "--batch-size",
        type=validate.positive_int_arg,
        default=DEFAULT_BATCH_SIZE,
        help=f"examples in the batch, fewer than --width ({DEFAULT_BATCH_SIZE}; "
        f"{CNN_BATCH_SIZE} with a CNN)",
    )
    p.add_argument(
        "--width", type=validate.positive_int_arg, default=256, help="first layer's width (256)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and attack (0)")
    p.add_argument("--out", type=Path, default=Path("spear-out"), help="output folder")
    p.add_argument("--fedavg", action="store_true", help="FedAvg client: local epochs")
    p.add_argument("--epochs", type=int, default=3, help="FedAvg local epochs (3)")
    p.add_argument("--local-batch", type=int, default=4, help="FedAvg mini-batch size (4)")
    p.add_argument("--lr", type=float, default=0.1, help="client learning rate (0.1)")
    p.add_argument("--dp", action="store_true", help="DP-SGD client through Opacus")
    p.add_argument("--noise", type=float, default=0.0, help="DP noise multiplier (0)")
    p.add_argument("--clip", type=float, default=1.0, help="DP clipping norm (1.0)")
    p.add_argument("--solver", default="auto", help="solver name (auto)")
    p.add_argument(
        "--time-budget", type=validate.time_budget_arg, default=120.0, help="seconds (120)"
    )
    p.add_argument(
        "--model",
        choices=["mlp", *sorted(CNN_DEMO_MODELS)],
        default="mlp",
        help=(
            "mlp (default: Fashion-MNIST, 784 -> width -> 128 -> 10); cnn (Flower's tutorial "
            "CNN on 32x32 RGB patches: features exact, images from them, beside breaching's "
            "Inverting Gradients when installed), vgg or vgg-bn (BatchNorm in training mode)"
        ),
    )
    p.add_argument(
        "--image-budget",
        type=validate.time_budget_arg,
        default=60.0,
        help="seconds for the images of a CNN (60)",
    )
    p.set_defaults(run=run)


def max_batch_size(width: int, images: int) -> int:
    """The largest batch the demo can rebuild exactly with a first layer of ``width`` units.

    Exact recovery needs ``b < width`` and ``b <= 784`` (the input pixels), and the batch
    is drawn from the ``images`` shipped images.

    Examples
    --------
    >>> max_batch_size(256, 1000), max_batch_size(2000, 1000)
    (255, 784)
    """
    return max(0, min(width - 1, math.prod(DEMO_INPUT_SHAPE), images))


def run_demo(
    batch_size: int = 16,
    width: int = 256,
    seed: int = 0,
    out: Path | None = None,
    *,
    fedavg: bool = False,
    epochs: int = 3,
    local_batch: int = 4,
    lr: float = 0.1,
    dp: bool = False,
    noise: float = 0.0,
    clip: float = 1.0,
    solver: str = "auto",
    time_budget: float = 120.0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the demo and return its summary (also written to ``out/summary.json``).

    Returns
    -------
    dict
        ``exact``, ``batch_size``, ``labels_correct``, ``certificate``, ``verified``,
        ``seconds``, ``rows`` (one dict per true example), ``grid`` (path) and ``notes``.

    Raises
    ------
    InputError
        ``batch_size`` or ``width`` is not a positive integer, the batch is larger than
        :func:`max_batch_size` allows, or ``time_budget`` is not a finite number above 0.
    """
    validate.positive_int(batch_size, "batch_size", hint="pass e.g. --batch-size 16")
    validate.positive_int(width, "width", hint="pass e.g. --width 256")
    validate.time_budget(time_budget)
    data = builtin_images()
    largest = max_batch_size(width, len(data))
    if batch_size > largest:
        cap = max_batch_size(batch_size + 1, len(data))
        if batch_size <= cap:
            options = [f"--batch-size {largest} or less"] if largest >= 1 else []
            options.append(f"--width {batch_size + 1} or more")
            what_to_try = "Use " + ", or ".join(options) + "."
        else:
            what_to_try = (
                f"No width allows more than {cap}: use --batch-size {cap} or less (with "
                f"--width {cap + 1} or more)."
            )
        raise InputError(
            f"a batch of {batch_size} is more than the demo supports with a first layer of "
            f"width {width}: at most {largest} examples (exact recovery needs fewer examples "
            f"than the layer's units and no more than its {math.prod(DEMO_INPUT_SHAPE)} input "
            f"pixels; {len(data)} images ship with spear). {what_to_try}"
        )
    images, labels = sample_batch(data, batch_size, seed=seed)
    model = build_model(width, seed)
    kind: UpdateKind = "gradient"
    epsilon = None
    if fedavg:
        update = client.fedavg_update(
            model, images, labels, epochs=epochs, batch_size=local_batch, lr=lr, seed=seed
        )
        kind = "delta"
        setting = f"FedAvg, {epochs} epochs in mini-batches of {local_batch}, lr {lr}"
    elif dp:
        dp_update = client.dp_sgd_update(
            model, images, labels, max_grad_norm=clip, noise_multiplier=noise, seed=seed
        )
        update = dp_update.update
        epsilon = dp_update.epsilon
        setting = f"DP-SGD, clip {clip}, noise multiplier {noise}, epsilon {epsilon:.3g}"
    else:
        update = client.fedsgd_update(model, images, labels, reduction="mean")
        setting = "FedSGD, mean reduction"
    start = time.perf_counter()
    rec = spear.attack(
        model,
        update,
        update_kind=kind,
        seed=seed,
        input_shape=DEMO_INPUT_SHAPE,
        solver=solver,
        time_budget=time_budget,
        progress=progress,
        batch_size=batch_size if dp and noise > 0 else None,
        input_range=PIXEL_RANGE,
    )
    seconds = time.perf_counter() - start
    matching = metrics.match(rec.inputs, images)
    psnrs = metrics.psnr(rec.inputs, images, matching=matching, reduction="none")
    rows: list[dict[str, Any]] = []
    rec_of = {int(t): int(r) for r, t in zip(matching.rec_index, matching.truth_index, strict=True)}
    pairs = zip(matching.truth_index, matching.max_abs_error, strict=True)
    err_of = {int(t): float(e) for t, e in pairs}
    psnr_of = {int(t): float(p) for t, p in zip(matching.truth_index, psnrs, strict=False)}
    predicted_of: dict[int, float] = {}
    if rec.error_rms is not None:
        predicted = predicted_psnr(rec.error_rms.cpu(), PIXEL_RANGE[1] - PIXEL_RANGE[0])
        for r, t in zip(matching.rec_index, matching.truth_index, strict=True):
            predicted_of[int(t)] = float(predicted[int(r)])
    scale = float(images.abs().max())
    for i in range(batch_size):
        j = rec_of.get(i)
        rec_label = int(rec.labels[j]) if (j is not None and rec.labels is not None) else None
        err = err_of.get(i)
        rows.append(
            {
                "example": i,
                "label": int(labels[i]),
                "recovered_label": rec_label,
                "max_abs_error": err,
                "psnr_db": psnr_of.get(i),
                "predicted_psnr_db": predicted_of.get(i),
                "exact": err is not None and err <= metrics.DEFAULT_REL_TOL * scale,
            }
        )
    exact = sum(r["exact"] for r in rows)
    labels_correct = sum(r["recovered_label"] == r["label"] for r in rows)
    summary: dict[str, Any] = {
        "setting": setting,
        "batch_size": batch_size,
        "found": int(rec.inputs.shape[0]),
        "exact": exact,
        "labels_correct": labels_correct if rec.labels is not None else None,
        "certificate": rec.certificate,
        "verified": rec.verified,
        "estimate": rec.estimate,
        "epsilon": epsilon,
        "seconds": seconds,
        "layer_seconds": rec.layer_result.seconds if rec.layer_result else None,
        "rows": rows,
        "notes": rec.notes,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        grid = report.image_grid(images, rec.inputs, out / "grid.png", matching=matching)
        summary["grid"] = str(grid)
        report.write_json(summary, out / "summary.json")
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    """Run ``spear demo`` with parsed arguments."""
    if args.model != "mlp":
        if args.fedavg or args.dp:
            raise InputError(
                f"--model {args.model} runs a FedSGD client only; drop --fedavg / --dp, or "
                "use --model mlp."
            )
        batch = args.batch_size if args.batch_size != DEFAULT_BATCH_SIZE else CNN_BATCH_SIZE
        print_cnn_summary(
            run_cnn_demo(
                args.model,
                batch,
                args.seed,
                args.out,
                time_budget=args.time_budget,
                image_budget=args.image_budget,
            )
        )
        return 0
    summary = run_demo(
        args.batch_size,
        args.width,
        args.seed,
        args.out,
        fedavg=args.fedavg,
        epochs=args.epochs,
        local_batch=args.local_batch,
        lr=args.lr,
        dp=args.dp,
        noise=args.noise,
        clip=args.clip,
        solver=args.solver,
        time_budget=args.time_budget,
    )
    print(f"client: {summary['setting']}; batch of {summary['batch_size']} Fashion-MNIST images")
    approximate = summary["estimate"] == "approximate"
    bars = f" {'expected dB':>11}" if approximate else ""
    print(
        f"{'example':>7} {'label':>5} {'found':>5} {'max abs error':>13} {'PSNR dB':>8}{bars}"
        "  exact"
    )
    for row in summary["rows"]:
        expected = f" {_fmt(row['predicted_psnr_db'], '.1f'):>11}" if approximate else ""
        print(
            f"{row['example']:>7} {row['label']:>5} "
            f"{'-' if row['recovered_label'] is None else row['recovered_label']:>5} "
            f"{_fmt(row['max_abs_error'], '.1e'):>13} {_fmt(row['psnr_db'], '.1f'):>8}"
            f"{expected}  {'yes' if row['exact'] else 'no'}"
        )
    if summary["estimate"] != "exact":
        print(
            f"returned: {summary['estimate']} estimate (noisy update; 'expected dB' is the "
            "PSNR its error bars predict without the truth)"
        )
    cert = summary["certificate"]
    print(
        f"exact: {summary['exact']}/{summary['batch_size']}   labels: "
        f"{summary['labels_correct']}/{summary['batch_size']}   certificate: "
        f"{_fmt(cert, '.1e')} ({'verified' if summary['verified'] else 'not verified'})   "
        f"time: {summary['seconds']:.2f} s"
    )
    for note in summary["notes"]:
        print(f"note: {note}")
    if "grid" in summary:
        print(f"image grid: {summary['grid']}")
    return 0
