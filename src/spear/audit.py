"""``spear audit``: does a federated-learning setting leak? Simulate it, attack it, measure.

A *setting* is a number of clients ``K`` and a DP-SGD noise multiplier ``sigma``; the rest
(model, data, batch size ``b``, local epochs and mini-batch, learning rate, clipping norm,
secure aggregation) is shared by every setting of an audit. For each setting:

1. ``K`` clients each take ``b`` distinct images of the data (no image is shared between
   clients; every setting with the same ``K`` uses the same images) and train the model
   locally: ``local_epochs`` passes over their ``b`` images in mini-batches of
   ``local_batch``, plain SGD at ``lr``. With ``sigma > 0`` every step is a DP-SGD step:
   each example's gradient is clipped to ``dp_clip`` (over all parameters), the clipped
   gradients are summed, Gaussian noise of standard deviation ``sigma * dp_clip`` is
   added and the sum is divided by the mini-batch size. A client sends its weight delta.
2. What the server sees is attacked with :func:`spear.attack` (``update_kind="delta"``):
   every client's delta on its own, or, with secure aggregation, only their sum, as one
   batch of ``K * b`` examples. Under noise the attack is told the batch size (the user
   knows it), which lets it return a best estimate.
3. The reconstruction is compared with the truth: an example counts as *recovered
   exactly* when every pixel is within :data:`EXACT_PIXEL_TOL` of the true image (on the
   ``[0, 1]`` scale: a quarter of one 8-bit grey level); PSNR (dB, over the matched
   pairs; ``inf`` when exact) and the fraction of labels recovered are measured too.

Results go to ``results.csv`` as each setting finishes (an audit started again on the
same folder skips the settings already there), then ``report.json``, ``report.html`` (the
table, image grids, plots of leakage against clients and against noise, and the smallest
aggregation and noise at which nothing was recovered, all from the measured rows) and the
plots and grids as PNGs.

Examples
--------
>>> [(s.clients, s.dp_noise) for s in plan(AuditConfig(clients=(1, 4), dp_noise=(0.0,)))]
[(1, 0.0), (4, 0.0)]
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

import spear
from spear import client, metrics, report, validate
from spear.auditor import torch_threads
from spear.bench import key_text, read_results
from spear.data import ImageData, builtin_images, load_npz, sample_batch
from spear.errors import InputError
from spear.pages import html_page, html_table, write_text_atomic

__all__ = [
    "CAVEAT",
    "EXACT_PIXEL_TOL",
    "KEY_FIELDS",
    "METRIC_FIELDS",
    "AuditConfig",
    "AuditResult",
    "ModelSpec",
    "Setting",
    "conclusions",
    "load_audit_data",
    "plan",
    "run_audit",
    "run_setting",
]

#: Largest pixel error (``[0, 1]`` scale) of an example recovered exactly.
EXACT_PIXEL_TOL = 1e-3
#: ``delta`` of the DP accounting.
DP_DELTA = 1e-5
#: What "nothing recovered" does and does not mean (printed and on the page).
CAVEAT = (
    "Nothing recovered means that this attack recovered nothing within its time budget on "
    "these simulated clients, not that the setting is private."
)
#: Originals shown in a setting's image grid.
GRID_IMAGES = 32

#: Columns that identify a setting (the resume key).
KEY_FIELDS = (
    "data",
    "model",
    "batch_size",
    "local_epochs",
    "local_batch",
    "lr",
    "dp_clip",
    "secure_aggregation",
    "seed",
    "clients",
    "dp_noise",
)
#: Measured columns.
METRIC_FIELDS = (
    "examples",
    "updates",
    "b_found",
    "recovered",
    "exact",
    "exact_rate",
    "psnr_mean",
    "psnr_median",
    "label_accuracy",
    "verified_updates",
    "certificate",
    "epsilon",
    "seconds",
    "error",
)


# --------------------------------------------------------------------------------------
# what is audited


@dataclass(frozen=True)
class ModelSpec:
    """Where the audited model comes from (a file, or spear's default MLP).

    Attributes
    ----------
    path:
        A ``torch.export`` program (``.pt2``), read by :func:`spear.files.load_model`
        without unpickling anything; ``None`` for ``Flatten -> Linear(n, width) -> ReLU
        -> Linear(width, classes)``.
    trust:
        Load ``path`` with ``torch.export.load`` (trusted files only).
    width:
        Hidden units of the default MLP.
    dtype:
        ``"float32"`` or ``"float64"``: the default MLP's dtype (a file keeps its own).
    """

    path: str | None = None
    trust: bool = False
    width: int = 1024
    dtype: str = "float32"

    @property
    def name(self) -> str:
        """Short description for the report."""
        return Path(self.path).name if self.path else f"mlp{self.width}-{self.dtype}"

    def build(self, data: ImageData, seed: int) -> nn.Module:
        """The model, checked against the data (input shape, number of classes)."""
        if self.path is not None:
            from spear.files import load_model

            model: nn.Module = load_model(self.path, trust=self.trust)
        else:
            torch.manual_seed(seed)
            features = math.prod(data.image_shape)
            model = nn.Sequential(
                nn.Flatten(),
                nn.Linear(features, self.width),
                nn.ReLU(),
                nn.Linear(self.width, data.num_classes),
            ).to(getattr(torch, self.dtype))
        _check_model(model, data)
        return model


def _model_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        return parameter.dtype
    raise InputError("the model has no parameters; there is nothing for a client to train.")


def _check_model(model: nn.Module, data: ImageData) -> None:
    dtype = _model_dtype(model)
    try:
        with torch.no_grad():
            out = model(data.images[:2].to(dtype))
    except Exception as error:
        raise InputError(
            f"the model cannot take the data's images of shape {data.image_shape}: {error}. "
            "Pass a model exported for these inputs, or other data."
        ) from error
    if out.ndim != 2 or out.shape[1] < data.num_classes:
        raise InputError(
            f"the model returns outputs of shape {tuple(out.shape)} for 2 images; expected "
            f"logits (2, C) with C >= the data's {data.num_classes} classes."
        )


@dataclass(frozen=True)
class AuditConfig:
    """The clients to simulate and how each setting is attacked (see the module docs).

    Attributes
    ----------
    model:
        The model (:class:`ModelSpec`).
    data:
        ``"builtin"`` (1000 shipped Fashion-MNIST images), a ``.npz`` file
        (:func:`spear.data.load_npz`) or a folder of images
        (:func:`spear.imagefolder.load_image_folder`).
    batch_size:
        ``b``: images per client.
    local_epochs, local_batch, lr:
        Local training: passes, mini-batch size (``None``: ``b``, one step per epoch),
        SGD learning rate.
    clients:
        Numbers of clients ``K`` to try.
    dp_noise:
        DP-SGD noise multipliers to try (0: plain SGD, no clipping).
    dp_clip:
        Per-example clipping norm of DP-SGD.
    secure_aggregation:
        The server sees only the sum of the ``K`` updates.
    time_budget:
        Seconds of search per attacked update.
    seed:
        Seeds the model, the choice of images and the noise.
    threads:
        torch threads during an attack (``None``: torch's setting).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: str = "builtin"
    batch_size: int = 32
    local_epochs: int = 1
    local_batch: int | None = None
    lr: float = 0.01
    clients: tuple[int, ...] = (1,)
    dp_noise: tuple[float, ...] = (0.0,)
    dp_clip: float = 1.0
    secure_aggregation: bool = False
    time_budget: float = 30.0
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        validate.positive_int(self.batch_size, "batch_size")
        validate.positive_int(self.local_epochs, "local_epochs")
        if self.local_batch is not None:
            validate.positive_int(self.local_batch, "local_batch")
        validate.time_budget(self.time_budget)
        if not self.clients or min(self.clients) < 1:
            raise InputError(f"clients must be integers >= 1; found {list(self.clients)}.")
        if (
            not self.dp_noise
            or min(self.dp_noise) < 0
            or not all(map(math.isfinite, self.dp_noise))
        ):
            raise InputError(f"dp_noise must be finite numbers >= 0; found {list(self.dp_noise)}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a finite number > 0; found {self.lr!r}.")
        if not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            raise InputError(f"dp_clip must be a finite number > 0; found {self.dp_clip!r}.")

    @property
    def steps_per_epoch(self) -> int:
        """Local SGD steps in one pass over ``b`` images."""
        return math.ceil(self.batch_size / (self.local_batch or self.batch_size))


@dataclass(frozen=True)
class Setting:
    """One cell of the audit: ``clients`` and ``dp_noise``."""

    clients: int
    dp_noise: float


def plan(config: AuditConfig) -> list[Setting]:
    """Every setting, noise outermost, without repeats."""
    seen: dict[tuple[int, float], Setting] = {}
    for noise in config.dp_noise:
        for clients in config.clients:
            seen.setdefault((clients, float(noise)), Setting(int(clients), float(noise)))
    return list(seen.values())


def load_audit_data(spec: str) -> ImageData:
    """``"builtin"``, a ``.npz`` file or a folder of images (see :class:`AuditConfig`)."""
    if spec == "builtin":
        return builtin_images()
    path = Path(spec)
    if path.is_dir():
        from spear.imagefolder import load_image_folder

        return load_image_folder(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist.")
        try:
            return load_npz(path)
        except (KeyError, ValueError) as error:
            raise InputError(str(error).strip("'\"")) from error
    raise InputError(
        f"--data {spec!r} is neither 'builtin', a .npz file nor a folder of images; pass "
        "one of those."
    )


# --------------------------------------------------------------------------------------
# one client


def _dp_gradients(
    model: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    config: AuditConfig,
    noise: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """One DP-SGD gradient: per-example clipping, Gaussian noise, mean over the batch."""
    total = [torch.zeros_like(p) for p in params]
    for index in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[index : index + 1]), y[index : index + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        )
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        factor = min(1.0, config.dp_clip / (norm + 1e-6))
        for acc, g in zip(total, grads, strict=True):
            acc.add_(g, alpha=factor)
    for acc in total:
        sample = torch.randn(acc.shape, generator=generator, dtype=torch.float64)
        acc.add_((noise * config.dp_clip * sample).to(acc.dtype))
    return [acc / x.shape[0] for acc in total]


def simulate_client(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AuditConfig,
    noise: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """A client's weight delta after its local training (see the module docs).

    Parameters
    ----------
    model:
        The model the server sent; not modified.
    x, y:
        ``(b, *input_shape)`` in the model's dtype and ``(b,)`` labels.
    config:
        Local epochs, mini-batch, learning rate and clipping norm.
    noise:
        DP-SGD noise multiplier (0: plain SGD).
    seed:
        Seeds the mini-batch order and the noise.

    Returns
    -------
    dict[str, torch.Tensor]
        ``named_parameters()`` name -> weights after minus weights sent.
    """
    local = copy.deepcopy(model)
    named = list(local.named_parameters())
    params = [p for _, p in named]
    sent = [p.detach().clone() for p in params]
    order_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1)
    step = config.local_batch or config.batch_size
    for _ in range(config.local_epochs):
        order = torch.randperm(x.shape[0], generator=order_generator)
        for start in range(0, x.shape[0], step):
            index = order[start : start + step]
            if noise > 0:
                grads = _dp_gradients(
                    local, params, x[index], y[index], config, noise, noise_generator
                )
            else:
                loss = nn.functional.cross_entropy(local(x[index]), y[index])
                raw = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [
                    torch.zeros_like(p) if g is None else g
                    for g, p in zip(raw, params, strict=True)
                ]
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=config.lr)
    return {
        name: (p.detach() - before).clone() for (name, p), before in zip(named, sent, strict=True)
    }


def _epsilon(config: AuditConfig, noise: float) -> float | None:
    """Privacy of one client's local DP-SGD steps on its ``b`` images (``None``: no DP)."""
    if noise <= 0:
        return None
    rate = min(1.0, (config.local_batch or config.batch_size) / config.batch_size)
    steps = config.local_epochs * config.steps_per_epoch
    return client.dp_epsilon(noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DP_DELTA)


# --------------------------------------------------------------------------------------
# one setting


@dataclass
class SettingOutput:
    """A setting's row and, for its image grid, the truth and the reconstructions."""

    row: dict[str, Any]
    originals: torch.Tensor | None = None
    reconstructions: torch.Tensor | None = None


@dataclass
class _Attacked:
    """One attacked update: the reconstruction (or the error) and its truth."""

    truth: torch.Tensor
    labels: torch.Tensor
    rec: spear.Reconstruction | None
    error: str | None


def _attack(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    size: int,
    noise: float,
    input_shape: tuple[int, ...],
    config: AuditConfig,
) -> tuple[spear.Reconstruction | None, str | None]:
    try:
        with torch_threads(config.threads):
            rec = spear.attack(
                model,
                update,
                update_kind="delta",
                batch_size=size if noise > 0 else None,
                seed=config.seed,
                input_shape=input_shape,
                time_budget=config.time_budget,
                progress=False,
                image_budget=0,  # the audit scores the attacked layer's inputs
            )
    except (ValueError, RuntimeError, np.linalg.LinAlgError) as error:
        return None, f"{type(error).__name__}: {error}"
    return rec, None


def _updates(
    model: nn.Module, data: ImageData, setting: Setting, config: AuditConfig
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """``(images, labels, update)`` per update the server sees."""
    dtype = _model_dtype(model)
    total = setting.clients * config.batch_size
    if total > len(data):
        raise InputError(
            f"{setting.clients} clients of {config.batch_size} images need {total} distinct "
            f"images; the data has {len(data)}. Use fewer clients, a smaller batch or more data."
        )
    images, labels = sample_batch(data, total, seed=config.seed)
    parts = []
    for number in range(setting.clients):
        part = slice(number * config.batch_size, (number + 1) * config.batch_size)
        x, y = images[part], labels[part]
        update = simulate_client(
            model, x.to(dtype), y, config, setting.dp_noise, seed=config.seed * 1000 + number
        )
        parts.append((x, y, update))
    if not config.secure_aggregation:
        return parts
    summed = client.aggregate([update for _, _, update in parts])
    return [(images, labels, summed)]


def _score(attacked: Sequence[_Attacked], config: AuditConfig) -> dict[str, Any]:
    """The measured columns from every attacked update of a setting."""
    truth = torch.cat([a.truth for a in attacked])
    truth_labels = torch.cat([a.labels for a in attacked])
    recs = [a.rec for a in attacked if a.rec is not None]
    found = [r for r in recs if not r.feature_space and r.inputs.shape[0] > 0]
    shape = tuple(truth.shape[1:])
    inputs = (
        torch.cat([r.inputs.detach().to(torch.float64).reshape(-1, *shape) for r in found])
        if found
        else torch.zeros((0, *shape), dtype=torch.float64)
    )
    labels_known = all(r.labels is not None for r in found)
    pred = torch.cat([r.labels for r in found if r.labels is not None]) if found else None
    summary = metrics.summarize(
        inputs,
        truth,
        pred if labels_known else None,
        truth_labels if labels_known else None,
        rel_tol=EXACT_PIXEL_TOL / max(float(truth.abs().max()), 1e-12),
    )
    certificates = [r.certificate for r in recs]
    return {
        "examples": int(truth.shape[0]),
        "updates": len(attacked),
        "b_found": sum(int(r.batch_size) for r in recs),
        "recovered": sum(_recovered(r) for r in recs),
        "exact": round(float(summary["exact_rate"] or 0.0) * truth.shape[0]),
        "exact_rate": summary["exact_rate"],
        "psnr_mean": summary["psnr_mean"],
        "psnr_median": summary["psnr_median"],
        "label_accuracy": summary["label_accuracy"],
        "verified_updates": sum(bool(r.examples_verified) for r in recs),
        "certificate": None
        if not certificates or None in certificates
        else max(float(c) for c in certificates if c is not None),
        "error": "; ".join(sorted({a.error for a in attacked if a.error})) or None,
        "_inputs": inputs,
        "_truth": truth,
    }


def _recovered(rec: spear.Reconstruction) -> int:
    """Examples the attack rebuilt and checked (0 when it returned an estimate)."""
    if rec.layer_result is not None and rec.layer_result.found == 0:
        return 0
    return int(rec.inputs.shape[0])


def run_setting(
    config: AuditConfig,
    setting: Setting,
    *,
    data: ImageData | None = None,
    model: nn.Module | None = None,
) -> SettingOutput:
    """Simulate, attack and measure one setting (the data and model are loaded if not given).

    Returns
    -------
    SettingOutput
        The row (:data:`KEY_FIELDS` and :data:`METRIC_FIELDS`) and the grid's images:
        up to :data:`GRID_IMAGES` originals and every reconstruction.
    """
    data = load_audit_data(config.data) if data is None else data
    model = config.model.build(data, config.seed) if model is None else model
    start = time.perf_counter()
    attacked = []
    for images, labels, update in _updates(model, data, setting, config):
        rec, error = _attack(
            model, update, images.shape[0], setting.dp_noise, data.image_shape, config
        )
        attacked.append(_Attacked(images, labels, rec, error))
    scored = _score(attacked, config)
    inputs, truth = scored.pop("_inputs"), scored.pop("_truth")
    row = {**_key_values(config, setting, data), **scored}
    row["epsilon"] = _epsilon(config, setting.dp_noise)
    row["seconds"] = time.perf_counter() - start
    return SettingOutput(row, truth[:GRID_IMAGES], inputs)


def _key_values(config: AuditConfig, setting: Setting, data: ImageData | None) -> dict[str, Any]:
    return {
        "data": config.data if data is None or config.data == "builtin" else data.name,
        "model": config.model.name,
        "batch_size": config.batch_size,
        "local_epochs": config.local_epochs,
        "local_batch": config.local_batch or config.batch_size,
        "lr": config.lr,
        "dp_clip": config.dp_clip,
        "secure_aggregation": config.secure_aggregation,
        "seed": config.seed,
        "clients": setting.clients,
        "dp_noise": setting.dp_noise,
    }


def _setting_task(job: tuple[AuditConfig, Setting]) -> SettingOutput:
    """One setting as a Ray task (the worker loads the data and the model itself)."""
    config, setting = job
    return run_setting(config, setting)


# --------------------------------------------------------------------------------------
# resume keys, conclusions


def _key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(key_text(row.get(name)) for name in KEY_FIELDS)


def _first_zero(points: Sequence[tuple[float, int]]) -> tuple[float | None, bool]:
    """Smallest x whose count is 0, and whether every larger x tried is 0 as well."""
    ordered = sorted(points)
    for index, (x, count) in enumerate(ordered):
        if count == 0:
            return x, all(c == 0 for _, c in ordered[index:])
    return None, False


def _finding(subject: str, unit: str, item: Mapping[str, Any], key: str, tried: list[str]) -> str:
    """One sentence: where along one axis nothing was recovered exactly any more."""
    value, listed = item[key], ", ".join(tried)
    if value is None:
        return f"{subject}: examples were recovered exactly at every {unit} tried ({listed})."
    shown = f"{value:g}"
    if shown == tried[0] and item["holds_above"]:
        return f"{subject}: nothing was recovered exactly at any {unit} tried ({listed})."
    below = ", ".join(tried[: tried.index(shown)])
    text = f"{subject}: {unit} {below} leaked; from {shown} on nothing was recovered exactly"
    if not item["holds_above"]:
        text += " except at a larger value tried (see the table)"
    return text + "."


def conclusions(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the measured rows say, per noise and per number of clients.

    Returns
    -------
    dict
        ``leaks`` (some example was recovered exactly in some setting),
        ``smallest_clients`` (per noise: the smallest number of clients tried at which no
        example was recovered exactly, ``None`` when every number tried leaked, and
        whether every larger number tried recovered nothing too), ``smallest_noise``
        (the same per number of clients) and ``lines`` (the findings as sentences).

    Examples
    --------
    >>> rows = [dict(clients=1, dp_noise=0.0, exact=8), dict(clients=4, dp_noise=0.0, exact=0)]
    >>> conclusions(rows)["smallest_clients"]
    [{'dp_noise': 0.0, 'clients': 4, 'holds_above': True}]
    """
    noises = sorted({float(r["dp_noise"]) for r in rows})
    counts = sorted({int(r["clients"]) for r in rows})
    by_noise = []
    for noise in noises:
        per_count: list[tuple[float, int]] = [
            (int(r["clients"]), int(r["exact"] or 0)) for r in rows if float(r["dp_noise"]) == noise
        ]
        fewest, holds = _first_zero(per_count)
        least = None if fewest is None else int(fewest)
        by_noise.append({"dp_noise": noise, "clients": least, "holds_above": holds})
    by_clients = []
    for count in counts:
        points = [
            (float(r["dp_noise"]), int(r["exact"] or 0)) for r in rows if int(r["clients"]) == count
        ]
        smallest, holds = _first_zero(points)
        by_clients.append({"clients": count, "dp_noise": smallest, "holds_above": holds})
    count_text = [f"{c:g}" for c in counts]
    noise_text = [f"{n:g}" for n in noises]
    lines = [
        _finding(f"noise {i['dp_noise']:g}", "client count", i, "clients", count_text)
        for i in by_noise
    ]
    lines += [
        _finding(f"{i['clients']} client(s)", "noise", i, "dp_noise", noise_text)
        for i in by_clients
    ]
    return {
        "leaks": any(int(r["exact"] or 0) > 0 for r in rows),
        "smallest_clients": by_noise,
        "smallest_noise": by_clients,
        "lines": lines,
    }


# --------------------------------------------------------------------------------------
# files


def _plot(
    series: Mapping[str, tuple[list[float], list[float]]],
    path: Path,
    xlabel: str,
    title: str,
    *,
    symlog: float | None = None,
) -> Path:
    """Fraction recovered exactly against ``x``, one line per series."""
    figure = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o", label=name)
    if symlog is not None:
        axes.set_xscale("symlog", linthresh=symlog)
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("examples recovered exactly (fraction)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _plots(rows: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    noises = sorted({float(r["dp_noise"]) for r in rows})
    counts = sorted({int(r["clients"]) for r in rows})

    def line(key: str, value: float, axis: str) -> tuple[list[float], list[float]]:
        points = sorted(
            (float(r[axis]), float(r["exact_rate"] or 0.0)) for r in rows if float(r[key]) == value
        )
        return [x for x, _ in points], [y for _, y in points]

    by_clients = {f"noise {n:g}": line("dp_noise", n, "clients") for n in noises}
    by_noise = {f"{c} client(s)": line("clients", c, "dp_noise") for c in counts}
    positive = [n for n in noises if n > 0]
    return [
        _plot(
            by_clients,
            out / "leak_vs_clients.png",
            "clients per aggregate",
            "Leakage against clients",
        ),
        _plot(
            by_noise,
            out / "leak_vs_noise.png",
            "DP-SGD noise multiplier",
            "Leakage against noise",
            symlog=min(positive) if positive else 1.0,
        ),
    ]


def _grid_name(setting: Setting) -> str:
    return f"grid_clients{setting.clients}_noise{setting.dp_noise:g}.png"


def _write_grid(out: Path, setting: Setting, output: SettingOutput) -> None:
    if output.originals is None or output.reconstructions is None:
        return
    report.image_grid(output.originals, output.reconstructions, out / _grid_name(setting))


_TABLE = (
    "clients",
    "dp_noise",
    "examples",
    "exact",
    "exact_rate",
    "psnr_mean",
    "label_accuracy",
    "recovered",
    "b_found",
    "epsilon",
    "seconds",
    "error",
)
_HEADERS = {
    "dp_noise": "noise",
    "exact": "recovered exactly",
    "exact_rate": "fraction",
    "psnr_mean": "PSNR dB",
    "label_accuracy": "labels",
    "recovered": "returned",
    "b_found": "batch found",
}


def _describe(config: AuditConfig) -> str:
    local = config.local_batch or config.batch_size
    parts = [
        f"model {config.model.name}",
        f"data {config.data}",
        f"{config.batch_size} images per client",
        f"{config.local_epochs} local epoch(s) in mini-batches of {local}",
        f"learning rate {config.lr:g}",
        f"DP-SGD clipping at {config.dp_clip:g} when noise > 0",
        "secure aggregation: the server sees only the sum of the clients' updates"
        if config.secure_aggregation
        else "no secure aggregation: the server sees every client's update",
        f"{config.time_budget:g} s of search per attacked update",
    ]
    return "; ".join(parts) + "."


def _html(
    rows: Sequence[Mapping[str, Any]], config: AuditConfig, found: Mapping[str, Any], out: Path
) -> str:
    body = [
        "<h2>Does this setting leak?</h2>",
        "<ul>" + "".join(f"<li>{line}</li>" for line in found["lines"]) + "</ul>",
        f'<p class="note">{_describe(config)} Exact: every pixel within {EXACT_PIXEL_TOL:g} '
        f"of the true image. Every number is measured on the simulated clients. {CAVEAT}</p>",
        html_table(rows, _TABLE, headers=_HEADERS, highlight="exact"),
        "<h2>Leakage</h2>",
        '<img src="leak_vs_clients.png" alt="leakage against clients">',
        '<img src="leak_vs_noise.png" alt="leakage against noise">',
        "<h2>Images (originals above, reconstructions below)</h2>",
    ]
    for row in rows:
        setting = Setting(int(row["clients"]), float(row["dp_noise"]))
        name = _grid_name(setting)
        if (out / name).is_file():
            caption = (
                f"{setting.clients} client(s), noise {setting.dp_noise:g}: {row['exact']} of "
                f"{row['examples']} recovered exactly"
            )
            image = f'<img src="{name}" alt="{caption}">'
            body.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    return html_page("spear audit: what leaks from these clients", body)


@dataclass
class AuditResult:
    """What :func:`run_audit` did: the rows (in plan order), conclusions and files."""

    rows: list[dict[str, Any]]
    conclusions: dict[str, Any]
    ran: int
    skipped: int
    files: list[Path]


def _write_reports(
    rows: list[dict[str, Any]], config: AuditConfig, out: Path
) -> tuple[dict[str, Any], list[Path]]:
    found = conclusions(rows)
    settings = {**asdict(config), "model": asdict(config.model), "spear_version": spear.__version__}
    payload = {"settings": settings, "rows": rows, "conclusions": found}
    text = json.dumps(report.to_jsonable(payload), indent=2, allow_nan=False) + "\n"
    files = [write_text_atomic(text, out / "report.json")]
    files.extend(_plots(rows, out))
    files.append(write_text_atomic(_html(rows, config, found, out), out / "report.html"))
    return found, files


def run_audit(
    config: AuditConfig,
    out: str | Path,
    *,
    progress: bool | None = None,
    ray: str | None = None,
    ray_cpus: int | None = None,
    log: Callable[[str], None] | None = None,
) -> AuditResult:
    """Simulate, attack and measure every setting; write the report into ``out``.

    Parameters
    ----------
    config:
        The audit.
    out:
        Folder of ``results.csv`` (one row per setting, appended as each finishes;
        settings already in it are skipped), ``report.json``, ``report.html``, the plots
        and the image grids.
    progress:
        Progress bar on stderr (default: only on a terminal).
    ray, ray_cpus:
        Run the settings as Ray tasks (see :mod:`spear.parallel`); ``None`` runs them here.
    log:
        Called with a line for every setting whose attack failed (default: stderr).

    Returns
    -------
    AuditResult
    """
    settings = plan(config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "results.csv"
    data = load_audit_data(config.data)
    model = config.model.build(data, config.seed)  # checks model and data before any work
    keys = {_key(_key_values(config, s, data)): s for s in settings}
    done = {_key(row) for row in read_results(csv_path)}
    pending = [s for key, s in keys.items() if key not in done]
    say = log or (lambda line: print(line, file=sys.stderr))
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(
        total=len(settings),
        initial=len(settings) - len(pending),
        desc="spear audit",
        unit="setting",
        disable=not show,
    ) as bar:

        def finished(setting: Setting, output: SettingOutput) -> None:
            if output.row.get("error"):
                where = f"{setting.clients} client(s), noise {setting.dp_noise:g}"
                say(f"spear audit: {where}: {output.row['error']}")
            _write_grid(folder, setting, output)
            report.write_csv(
                [{n: output.row.get(n) for n in (*KEY_FIELDS, *METRIC_FIELDS)}],
                csv_path,
                append=True,
            )
            bar.set_postfix_str(
                f"clients={setting.clients} noise={setting.dp_noise:g}", refresh=False
            )
            bar.update(1)

        if ray is None:
            for setting in pending:
                finished(setting, run_setting(config, setting, data=data, model=model))
        else:
            _run_ray(config, pending, finished, ray, ray_cpus)
    wanted = set(keys)
    rows = [row for row in read_results(csv_path) if _key(row) in wanted]
    order = {key: index for index, key in enumerate(keys)}
    rows.sort(key=lambda row: order[_key(row)])
    found, files = _write_reports(rows, config, folder)
    return AuditResult(rows, found, len(pending), len(settings) - len(pending), [csv_path, *files])


def _run_ray(
    config: AuditConfig,
    pending: Sequence[Setting],
    finished: Callable[[Setting, SettingOutput], None],
    address: str,
    cpus: int | None,
) -> None:
    from spear.parallel import describe_error, ray_map

    def failed(job: tuple[AuditConfig, Setting], error: BaseException) -> SettingOutput:
        row = {**_key_values(config, job[1], None), **dict.fromkeys(METRIC_FIELDS)}
        row.update(exact=0, exact_rate=0.0, error=f"Ray task failed: {describe_error(error)}")
        return SettingOutput(row)

    jobs = [(config, setting) for setting in pending]
    for number, output in ray_map(_setting_task, jobs, address=address, cpus=cpus, on_error=failed):
        finished(pending[number], output)
