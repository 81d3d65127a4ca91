"""``spear demo --model cnn``: a conv-net client's batch, features and images.

A FedSGD client of Flower's tutorial CNN (or the small VGG-style CNN) trains on 32x32 RGB
photo patches that ship with scikit-image; ``spear.attack`` recovers the features entering
the first linear layer (exact or not, checked against the truth), the labels, and images
rebuilt from the features (:mod:`spear.images`). With breaching installed, its Inverting
Gradients attack runs on the same update beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import spear
from spear import client, metrics, report, validate
from spear.data import rgb_patches, sample_batch
from spear.errors import InputError
from spear.networks import CNN_INPUT_SHAPE, CNNS, build_cnn

__all__ = ["CNN_DEMO_MODELS", "run_cnn_demo"]

#: ``--model`` names of the conv-net demo: ``cnn`` is Flower's tutorial network.
CNN_DEMO_MODELS = {"cnn": "flower-cnn", **{name: name for name in CNNS}}
#: Patches the batch is drawn from.
PATCH_POOL = 1000
#: A recovered feature vector counts as exact when its largest error is within this
#: fraction of the largest true feature (the float64 exactness of the layer attack).
FEATURE_EXACT = metrics.DEFAULT_REL_TOL
#: Adam steps of the breaching baseline beside the attack.
BASELINE_STEPS = 2000


def _breaching_available() -> bool:
    try:
        from spear.baselines.breaching_ig import load_breaching

        load_breaching()
    except InputError:
        return False
    return True


def _psnr_by_truth(
    images: torch.Tensor | None, truth: torch.Tensor
) -> tuple[dict[int, float], metrics.Matching | None]:
    """PSNR of each true example's matched image (missing ones absent)."""
    if images is None or images.shape[0] == 0:
        return {}, None
    matching = metrics.match(images, truth)
    values = metrics.psnr(images, truth, matching=matching, reduction="none")
    return {int(t): float(v) for t, v in zip(matching.truth_index, values, strict=True)}, matching


def run_cnn_demo(
    model_name: str = "cnn",
    batch_size: int = 4,
    seed: int = 0,
    out: Path | None = None,
    *,
    time_budget: float = 120.0,
    image_budget: float = 60.0,
    compare: bool | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the conv-net demo and return its summary (also written to ``out/summary.json``).

    Parameters
    ----------
    model_name:
        ``"cnn"`` (Flower's tutorial network), ``"flower-cnn"``, ``"vgg"`` or ``"vgg-bn"``.
    batch_size, seed, out, time_budget, progress:
        As for :func:`spear.cli.demo.run_demo`.
    image_budget:
        Seconds for the images (``spear.attack(image_budget=)``).
    compare:
        Run breaching's Inverting Gradients on the same update; default: when installed.

    Returns
    -------
    dict
        ``features_exact``, ``labels_correct``, ``psnr_median`` (spear's images),
        ``baseline_psnr_median`` (or ``None``), ``rows`` (one per true example), ``notes``.

    Raises
    ------
    InputError
        An unknown model, a batch size that is not a positive integer, or a bad budget.
    """
    if model_name not in CNN_DEMO_MODELS:
        raise InputError(
            f"unknown --model {model_name!r}; choose mlp or one of "
            f"{', '.join(sorted(CNN_DEMO_MODELS))}."
        )
    validate.positive_int(batch_size, "batch_size", hint="pass e.g. --batch-size 4")
    validate.time_budget(time_budget)
    validate.time_budget(image_budget, "image_budget")
    name = CNN_DEMO_MODELS[model_name]
    images, labels = sample_batch(rgb_patches(PATCH_POOL, seed=0), batch_size, seed=seed)
    images = images.to(torch.float64)
    model = build_cnn(name, seed)
    update = client.fedsgd_update(model, images, labels, reduction="mean")
    start = time.perf_counter()
    rec = spear.attack(
        model,
        update,
        seed=seed,
        input_shape=CNN_INPUT_SHAPE,
        time_budget=time_budget,
        image_budget=image_budget,
        progress=progress,
        input_range=(0.0, 1.0),
    )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        truth_features = model.features(images)  # type: ignore[operator]
    feature_matching = metrics.match(rec.inputs, truth_features) if rec.inputs.shape[0] else None
    scale = float(truth_features.abs().max())
    feature_err: dict[int, float] = {}
    label_of: dict[int, int] = {}
    if feature_matching is not None:
        for r, t, e in zip(
            feature_matching.rec_index,
            feature_matching.truth_index,
            feature_matching.max_abs_error,
            strict=True,
        ):
            feature_err[int(t)] = float(e)
            if rec.labels is not None:
                label_of[int(t)] = int(rec.labels[int(r)])
    psnr_of, image_matching = _psnr_by_truth(rec.images, images)
    use_baseline = _breaching_available() if compare is None else compare
    baseline = None
    notes = list(rec.notes)
    if use_baseline:
        from spear.baselines.breaching_ig import breaching_ig_attack

        baseline = breaching_ig_attack(
            model,
            update,
            batch_size=batch_size,
            input_shape=CNN_INPUT_SHAPE,
            seed=seed,
            time_budget=time_budget,
            iterations=BASELINE_STEPS,
        )
    elif compare is None:
        notes.append(
            'install the breaching extra (pip install "spear[breaching]") to see breaching\'s '
            "Inverting Gradients on the same update beside it."
        )
    baseline_of, baseline_matching = _psnr_by_truth(
        baseline.inputs.to(torch.float64) if baseline is not None else None, images
    )
    rows = [
        {
            "example": i,
            "label": int(labels[i]),
            "recovered_label": label_of.get(i),
            "feature_error": feature_err.get(i),
            "features_exact": i in feature_err and feature_err[i] <= FEATURE_EXACT * scale,
            "psnr_db": psnr_of.get(i),
            "baseline_psnr_db": baseline_of.get(i),
        }
        for i in range(batch_size)
    ]
    summary: dict[str, Any] = {
        "setting": f"FedSGD, mean reduction, {name} (untrained), 32x32 RGB photo patches",
        "model": name,
        "batch_size": batch_size,
        "features_exact": sum(r["features_exact"] for r in rows),
        "labels_correct": sum(r["recovered_label"] == r["label"] for r in rows),
        "psnr_median": float(np.median(list(psnr_of.values()))) if psnr_of else None,
        "baseline": "breaching-ig" if baseline is not None else None,
        "baseline_psnr_median": (
            float(np.median(list(baseline_of.values()))) if baseline_of else None
        ),
        "images_determined": rec.images_determined,
        "certificate": rec.certificate,
        "verified": rec.verified,
        "seconds": seconds,
        "rows": rows,
        "notes": notes,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if rec.images is not None:
            summary["grid"] = str(
                report.image_grid(images, rec.images, out / "grid.png", matching=image_matching)
            )
        if baseline is not None:
            summary["baseline_grid"] = str(
                report.image_grid(
                    images,
                    baseline.inputs.to(torch.float64),
                    out / "grid_breaching.png",
                    matching=baseline_matching,
                )
            )
        report.write_json(summary, out / "summary.json")
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_cnn_summary(summary: dict[str, Any]) -> None:
    """The per-example table and the totals of :func:`run_cnn_demo`."""
    b = summary["batch_size"]
    print(f"client: {summary['setting']}; batch of {b}")
    baseline = summary["baseline"]
    extra = f" {baseline + ' dB':>16}" if baseline else ""
    print(
        f"{'example':>7} {'label':>5} {'found':>5} {'feature error':>13} {'exact':>5} "
        f"{'image PSNR dB':>13}{extra}"
    )
    for row in summary["rows"]:
        found = "-" if row["recovered_label"] is None else row["recovered_label"]
        beside = f" {_fmt(row['baseline_psnr_db'], '.1f'):>16}" if baseline else ""
        print(
            f"{row['example']:>7} {row['label']:>5} {found:>5} "
            f"{_fmt(row['feature_error'], '.1e'):>13} "
            f"{'yes' if row['features_exact'] else 'no':>5} "
            f"{_fmt(row['psnr_db'], '.1f'):>13}{beside}"
        )
    line = (
        f"features exact: {summary['features_exact']}/{b}   labels: "
        f"{summary['labels_correct']}/{b}   images: PSNR median "
        f"{_fmt(summary['psnr_median'], '.1f')} dB"
        + (" (determined by the features)" if summary["images_determined"] else " (estimates)")
    )
    if baseline:
        line += f"   {baseline}: {_fmt(summary['baseline_psnr_median'], '.1f')} dB"
    print(line + f"   time: {summary['seconds']:.1f} s")
    for note in summary["notes"]:
        print(f"note: {note}")
    for key in ("grid", "baseline_grid"):
        if key in summary:
            print(f"image grid: {summary[key]}")
