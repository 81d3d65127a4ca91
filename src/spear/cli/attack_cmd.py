"""``spear attack``: attack a saved model and a client's update from files.

The model is a ``torch.export`` program file (``.pt2``), made with::

    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example_input,), dynamic_shapes=({0: batch},))
    torch.export.save(program, "model.pt2")

(a program exported for a fixed batch size works too). It is read without unpickling or
running anything from it (:mod:`spear.files`); ``--trust-model`` uses
``torch.export.load`` instead. The update is a safetensors file of parameter name ->
tensor (client data is untrusted and is never unpickled)::

    update = {k: v.contiguous() for k, v in update.items()}
    safetensors.torch.save_file(update, "update.safetensors")
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import spear
from spear import report, validate
from spear.binary import LOSSES
from spear.errors import InputError
from spear.files import check_output_folder, load_model, load_update
from spear.results import SolverStats
from spear.update import UPDATE_KINDS

__all__ = ["add_parser", "load_model", "load_update", "run"]


def add_parser(sub: Any) -> None:
    """Register the ``attack`` sub-command."""
    p = sub.add_parser(
        "attack",
        help="rebuild a client's batch from a saved model and update",
        description=(
            "Loads a torch.export program (.pt2) and a safetensors update, runs "
            "spear.attack and writes images, labels, certificate and notes. The program is "
            "read without unpickling anything: archives with pickled members (tensor "
            "subclasses, custom objects), compiled code or anything but ATen operators are "
            "refused. Programs exported for a fixed batch size run any batch size."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="torch.export program (.pt2)")
    p.add_argument("--update", type=Path, required=True, help="update (.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--kind", choices=UPDATE_KINDS, default="gradient", help="update kind")
    p.add_argument(
        "--batch-size",
        type=validate.positive_int_arg,
        default=None,
        help="distinct examples, if known",
    )
    p.add_argument(
        "--input-shape", default=None, help="shape of one input, e.g. 1,28,28 (default: auto)"
    )
    p.add_argument(
        "--layer",
        default=None,
        help="name of the linear layer to attack, e.g. fc2 (default: the first linear "
        "layer followed by a ReLU); a deeper layer gives the features entering it",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="auto",
        help="the client's loss: softmax cross-entropy, or binary cross-entropy on a model "
        "with one logit (BCEWithLogitsLoss, labels 0 and 1); auto picks by the number of "
        "outputs (auto)",
    )
    p.add_argument(
        "--input-range",
        default=None,
        help="LOW,HIGH of the model's inputs, e.g. 0,1 for pixels: noisy estimates are "
        "clipped into it",
    )
    p.add_argument(
        "--seed", type=validate.seed_arg, default=0, help="integer from 0 to 2**63 - 1 (0)"
    )
    p.add_argument("--solver", default="auto")
    p.add_argument("--time-budget", type=validate.time_budget_arg, default=120.0)
    p.add_argument(
        "--image-budget",
        type=validate.budget_or_zero_arg,
        default=60.0,
        help="seconds for rebuilding images from the features when a layer behind "
        "convolutions (or a deeper layer) is attacked; 0 skips it (60)",
    )
    p.add_argument(
        "--trust-model",
        action="store_true",
        help="load the model with torch.export.load, which unpickles parts of the file and "
        "can run code from it: only for files from a trusted source",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print what each step of the layer inversion did: directions pooled, "
        "examples found, samples drawn, seconds",
    )
    p.set_defaults(run=run)


def _input_range(text: str | None) -> tuple[float, float] | None:
    """``"LOW,HIGH"`` as two floats with ``LOW < HIGH`` (``None`` stays ``None``)."""
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise InputError(
            f"--input-range must be two numbers separated by a comma such as 0,1, found {text!r}."
        ) from exc
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"--input-range needs finite LOW < HIGH, found {text!r}.")
    return low, high


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"C,H,W"`` as a tuple of positive integers (``None`` stays ``None``)."""
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise InputError(
            f"--input-shape must be positive integers separated by commas such as 1,28,28, "
            f"found {text!r}."
        )
    return shape


def _save_png(image: torch.Tensor, path: Path) -> None:
    """One ``(C, H, W)`` image in [0, 1] as PNG (values outside are clipped)."""
    array = image.detach().cpu().to(torch.float64).clamp(0, 1).numpy()
    array = np.round(array * 255).astype(np.uint8)
    mode_array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    Image.fromarray(mode_array).save(path)


#: Names of the per-example images this command writes (stale ones are removed).
_OWN_IMAGES = re.compile(r"example_\d{3,}\.png")


def _remove_stale_images(out: Path) -> None:
    """Delete images an earlier run left in ``out`` (only names this command writes)."""
    for path in out.iterdir():
        if path.is_file() and (_OWN_IMAGES.fullmatch(path.name) or path.name == "grid.png"):
            path.unlink()


def run(args: argparse.Namespace) -> int:
    """Run ``spear attack`` with parsed arguments.

    The output folder is created before any work (so that a place where it cannot be
    made is reported at once) and removed again, when this run made it, if the run ends
    before writing to it.
    """
    out: Path = args.out
    existed = out.exists()
    check_output_folder(out)
    try:
        return _run(args, out)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run(args: argparse.Namespace, out: Path) -> int:
    """Load the files, attack, and write the results to ``out`` (which exists)."""
    shape = _input_shape(args.input_shape)
    input_range = _input_range(args.input_range)
    model = load_model(args.model, trust=args.trust_model)
    update = load_update(args.update)
    try:
        rec = spear.attack(
            model,
            update,
            update_kind=args.kind,
            batch_size=args.batch_size,
            seed=args.seed,
            input_shape=shape,
            solver=args.solver,
            time_budget=args.time_budget,
            input_range=input_range,
            layer=args.layer,
            image_budget=args.image_budget,
            loss=args.loss,
        )
    except KeyboardInterrupt:
        # a second Ctrl-C after the search (labels, certificate): nothing to keep
        print("spear attack: interrupted; nothing written", file=sys.stderr)
        return 130
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_images(out)
    tensors = {"inputs": rec.inputs.contiguous()}
    if rec.labels is not None:
        tensors["labels"] = rec.labels.contiguous()
    if rec.images is not None:
        tensors["images"] = rec.images.contiguous()
    if rec.image_labels is not None:
        tensors["image_labels"] = rec.image_labels.contiguous()
    save_file(tensors, str(out / "reconstruction.safetensors"))
    images = rec.images if rec.images is not None else rec.inputs
    if (
        images.dim() == 4
        and images.shape[1] in (1, 3)
        and (rec.images is not None or not rec.feature_space)
    ):
        for i in range(images.shape[0]):
            _save_png(images[i], out / f"example_{i:03d}.png")
        report.image_grid(images, images, out / "grid.png", captions=False)
    summary = {
        "batch_size": rec.batch_size,
        "found": int(rec.inputs.shape[0]),
        "complete": rec.complete,
        "labels": rec.labels.tolist() if rec.labels is not None else None,
        "multiplicity": rec.multiplicity.tolist() if rec.multiplicity is not None else None,
        "certificate": rec.certificate,
        "verified": rec.verified,
        "examples_verified": rec.examples_verified,
        "layer": rec.layer,
        "feature_space": rec.feature_space,
        "images": rec.images is not None,
        "images_from_features": rec.images_from_features,
        "image_labels": rec.image_labels.tolist() if rec.image_labels is not None else None,
        "images_determined": rec.images_determined,
        "seconds": rec.seconds,
        "interrupted": rec.interrupted,
        "notes": rec.notes,
    }
    report.write_json(summary, out / "reconstruction.json")
    cert = "-" if rec.certificate is None else f"{rec.certificate:.1e}"
    print(
        f"recovered {summary['found']} of {rec.batch_size} examples from layer {rec.layer!r}"
        f" in {rec.seconds:.2f} s; certificate {cert} "
        f"({_status(rec)})"
    )
    if rec.labels is not None:
        print(f"labels: {rec.labels.tolist()}")
    if args.verbose and rec.layer_result is not None:
        for line in step_lines(rec.layer_result.solvers, rec.layer_result.found_by):
            print(line)
    for note in rec.notes:
        print(f"note: {note}")
    print(f"written to {out}/ (reconstruction.safetensors, reconstruction.json, PNGs)")
    if rec.interrupted:
        print(
            f"spear attack: interrupted; the {summary['found']} examples verified so far "
            f"are written to {out}/",
            file=sys.stderr,
        )
        return 130
    return 0


def step_lines(steps: list[SolverStats], found_by: list[str]) -> list[str]:
    """One line per step of the layer inversion, in the order they ran, and which step
    peeled how many of the examples returned."""
    lines = [f"{'step':<11} {'pooled':>7} {'found':>6} {'samples':>11} {'seconds':>8}"]
    for s in steps:
        lines.append(
            f"{s.name:<11} {s.candidates:>7} {s.found:>6} {s.samples:>11} {s.seconds:>8.2f}"
        )
    counts = {name: found_by.count(name) for name in dict.fromkeys(found_by)}
    peeled = ", ".join(f"{name} {count}" for name, count in counts.items())
    lines.append(f"examples peeled by: {peeled or 'none'}")
    return lines


def _status(rec: spear.Reconstruction) -> str:
    """``verified`` only when every example and label is certified; otherwise what is."""
    if rec.verified:
        return "verified"
    if rec.examples_verified:
        return "examples verified, labels not certified"
    return "not verified"
