"""The evaluation sweep behind ``spear bench``: attacks side by side over many cases.

A *case* is one client setting (data, batch size ``b``, first-layer width, depth, training
stage, FedAvg local steps, DP-SGD noise, number of clients summed by secure aggregation,
seed) attacked by one named attack. For every case the harness

1. builds a float64 fully connected ReLU network ``in -> width -> 128 -> ... -> classes``
   (``depth`` hidden layers; the first one, of ``width`` units, is the attacked layer),
   seeded; optionally trains it for ``trained`` SGD steps on images that are *not* in any
   attacked batch;
2. draws ``b`` distinct real images, splits them between the clients (as evenly as
   possible, each client its own images) and simulates each client with
   :mod:`spear.client` (FedSGD with mean reduction, FedAvg with ``local_steps`` full-batch
   steps, or DP-SGD with per-example clipping and noise); the server sees the *sum* of the
   client updates (secure aggregation);
3. runs the attack through the common call of :mod:`spear.baselines` (``"spear"`` is
   :func:`spear.attack` wrapped to that call, see :func:`spear_attack`) and scores it
   against the truth with :func:`spear.metrics.summarize`.

Each result is appended to ``results.csv`` as soon as the case finishes, and a sweep that is
started again on the same folder skips the cases already there (the key is every case
parameter plus seed and attack), so an interrupted sweep continues where it stopped. At the
end the rows are aggregated over seeds (medians) into ``results.md`` and plotted.

Everything is deterministic given the seeds (up to the attacks' own time budgets).

Examples
--------
>>> cases = plan_cases(BenchConfig(batch_sizes=(2, 4), attacks=("spear",), dp_sweep=(),
...                                clients_sweep=()))
>>> [(c.batch_size, c.attack) for c in cases]
[(2, 'spear'), (4, 'spear')]
"""

from __future__ import annotations

import csv
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from spear import client, metrics, report
from spear.attack import attack as spear_attack_full
from spear.baselines import ATTACKS
from spear.baselines.breaching_ig import load_breaching
from spear.certificate import certify
from spear.data import ImageData, builtin_images, load_fashion_mnist, rgb_patches, sample_batch
from spear.errors import InputError
from spear.networks import build_model
from spear.results import Reconstruction
from spear.update import UpdateKind

__all__ = [
    "BENCH_ATTACKS",
    "DATASETS",
    "KEY_FIELDS",
    "METRIC_FIELDS",
    "BenchConfig",
    "BenchResult",
    "Case",
    "aggregate_rows",
    "case_key",
    "get_bench_attack",
    "key_text",
    "load_bench_data",
    "plan_cases",
    "read_results",
    "run_bench",
    "spear_attack",
]

#: Images of the dataset reserved for pre-training (``trained > 0``); attacked batches are
#: drawn from the other part, so a trained model has never seen the attacked images.
TRAIN_FRACTION = 0.5
#: Pre-training: SGD learning rate and mini-batch size.
TRAIN_LR = 0.05
TRAIN_BATCH = 32
#: Adam steps of the gradient-matching baseline by default: enough to see where it goes,
#: few enough that a case takes seconds to tens of seconds on a CPU (it also stops at the
#: time budget).
GM_ITERATIONS = 200
#: An infinite PSNR (an exact reconstruction) is drawn at this height in plots.
PSNR_PLOT_CAP = 300.0

#: Dataset names accepted by ``--data``.
DATASETS = ("builtin", "fashion-mnist", "rgb")

#: Columns that identify a case (the resume key).
KEY_FIELDS = (
    "data",
    "batch_size",
    "width",
    "depth",
    "trained",
    "local_steps",
    "dp_noise",
    "dp_clip",
    "clients",
    "seed",
    "attack",
)
#: Result columns written after the key columns.
METRIC_FIELDS = (
    "b_found",
    "found",
    "found_rate",
    "exact_rate",
    "psnr_mean",
    "psnr_median",
    "ssim_mean",
    "label_accuracy",
    "certificate",
    "verified",
    "epsilon",
    "seconds",
    "error",
)
_NUMERIC_METRICS = tuple(f for f in METRIC_FIELDS if f not in ("verified", "error"))
#: Attack failures that are recorded in the ``error`` column instead of stopping the sweep
#: (every spear error is a ValueError; linear-algebra failures are RuntimeErrors).
_RECORDED_ERRORS = (ValueError, RuntimeError, np.linalg.LinAlgError)


# --------------------------------------------------------------------------------------
# attacks


def spear_attack(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    input_shape: tuple[int, ...],
    update_kind: str = "gradient",
    seed: int = 0,
    time_budget: float | None = None,
    use_batch_size: bool = False,
    solver: str = "auto",
    input_range: tuple[float, float] | None = None,
) -> Reconstruction:
    """:func:`spear.attack` with the common call of :mod:`spear.baselines`.

    Parameters
    ----------
    model, update, input_shape, update_kind, seed:
        As for :func:`spear.attack`.
    batch_size:
        The true ``b``. SPEAR reads ``b`` off the update itself, so it is ignored unless
        ``use_batch_size`` (needed when DP noise makes the update full rank).
    time_budget:
        Seconds for the layer inversion; ``None`` for spear's default (120 s).
    use_batch_size:
        Pass ``batch_size`` to the attack instead of letting it find ``b``.
    solver:
        ``"auto"`` or a name from :func:`spear.solvers.available`.
    input_range:
        ``(low, high)`` of the inputs when known, as for :func:`spear.attack`.

    Returns
    -------
    Reconstruction
        As :func:`spear.attack` returns it (with ``.certificate``).
    """
    return spear_attack_full(
        model,
        dict(update),
        update_kind=update_kind,
        batch_size=batch_size if use_batch_size else None,
        seed=seed,
        input_shape=input_shape,
        solver=solver,
        time_budget=120.0 if time_budget is None else time_budget,
        progress=False,
        input_range=input_range,
    )


#: Attack name -> function with the common call: ``"spear"`` plus every baseline.
BENCH_ATTACKS: dict[str, Callable[..., Reconstruction]] = {"spear": spear_attack, **ATTACKS}


def get_bench_attack(name: str) -> Callable[..., Reconstruction]:
    """The attack called ``name`` in :data:`BENCH_ATTACKS`.

    Raises
    ------
    InputError
        For an unknown name; the message lists the available ones.
    """
    try:
        return BENCH_ATTACKS[name]
    except KeyError:
        available = ", ".join(sorted(BENCH_ATTACKS))
        raise InputError(
            f"unknown attack {name!r}; available attacks: {available} "
            "(give several as a comma list, e.g. --attacks spear,gradient-matching)."
        ) from None


# --------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    """One client setting attacked by one attack (a row of ``results.csv``).

    Attributes
    ----------
    data:
        Dataset name (see :data:`DATASETS`).
    batch_size:
        ``b``: images in the batch, summed over all clients.
    width:
        Units of the first (attacked) linear layer.
    depth:
        Number of hidden ``Linear + ReLU`` layers (``>= 1``).
    trained:
        SGD steps of pre-training on other images before the round (0: untrained).
    local_steps:
        FedAvg full-batch local steps (0: FedSGD, the client sends its gradient).
    dp_noise:
        DP-SGD noise multiplier (0 with a ``dp_clip``: clipping only).
    dp_clip:
        DP-SGD per-example clipping norm; ``None``: no DP-SGD (no clipping, no noise).
    clients:
        Clients whose updates are summed by secure aggregation (each its own images).
    seed:
        Seed of model, data, client and attack.
    attack:
        Name in :data:`BENCH_ATTACKS`.
    sweep:
        Which part of the plan produced the case (``"main"``, ``"dp"``, ``"clients"``);
        not part of the key.
    """

    data: str
    batch_size: int
    width: int
    depth: int
    trained: int
    local_steps: int
    dp_noise: float
    dp_clip: float | None
    clients: int
    seed: int
    attack: str
    sweep: str = field(default="main", compare=False)

    @property
    def setting(self) -> tuple[Any, ...]:
        """Everything but the attack: cases with the same setting share one update."""
        return tuple(getattr(self, name) for name in KEY_FIELDS if name != "attack")


def key_text(value: Any) -> str:
    """A key value as comparable text: numbers by value (``8``, ``8.0``, ``"8"`` agree)."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(value)
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def case_key(case: Case | Mapping[str, Any]) -> tuple[str, ...]:
    """The resume key of a case or of a CSV row: the :data:`KEY_FIELDS` as text."""
    if isinstance(case, Case):
        return tuple(key_text(getattr(case, name)) for name in KEY_FIELDS)
    return tuple(key_text(case.get(name)) for name in KEY_FIELDS)


@dataclass(frozen=True)
class BenchConfig:
    """What to sweep. The main grid is the product of the tuples below.

    Two small extra sweeps vary one thing from the *reference setting* (the smallest batch
    size and the first value of every other list): ``dp_sweep`` (DP-SGD noise multipliers,
    every attack, side by side on the same noisy updates: the curve of
    ``psnr_vs_noise.png``) and ``clients_sweep`` (numbers of clients, every attack). Empty
    tuples turn them off. In the main grid a noise of 0 means no DP-SGD; in the DP sweep
    every case is DP-SGD (noise 0: clipping only). DP-SGD is
    simulated as one clipped, noised gradient, so it is never combined with FedAvg local
    steps (such combinations of the main grid are left out; the DP sweep uses FedSGD).

    Attributes
    ----------
    data:
        ``"builtin"`` (1000 shipped Fashion-MNIST images), ``"fashion-mnist"`` (the test
        split from local IDX files, see :func:`spear.data.load_fashion_mnist`) or ``"rgb"``
        (32x32 RGB photo patches).
    seeds:
        Number of seeds, ``0 .. seeds - 1``.
    dp_clip:
        Clipping norm of every DP-SGD case.
    time_budget:
        Seconds per attack run (``None``: each attack's default).
    gm_iterations:
        Adam steps of ``gradient-matching`` and ``breaching-ig``.
    client_lr:
        FedAvg local learning rate.
    """

    data: str = "builtin"
    batch_sizes: tuple[int, ...] = (8, 16)
    widths: tuple[int, ...] = (256,)
    depths: tuple[int, ...] = (2,)
    trained: tuple[int, ...] = (0,)
    local_steps: tuple[int, ...] = (0,)
    dp_noise: tuple[float, ...] = (0.0,)
    clients: tuple[int, ...] = (1,)
    seeds: int = 1
    attacks: tuple[str, ...] = ("spear", "gradient-matching")
    dp_sweep: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)
    clients_sweep: tuple[int, ...] = (1, 2)
    dp_clip: float = 1.0
    time_budget: float | None = 40.0
    gm_iterations: int = GM_ITERATIONS
    client_lr: float = 0.1


def _check_config(config: BenchConfig) -> None:
    if config.data not in DATASETS:
        raise InputError(f"unknown data {config.data!r}; choose one of {', '.join(DATASETS)}.")
    for name in config.attacks:
        get_bench_attack(name)
    if "breaching-ig" in config.attacks:
        load_breaching()  # the optional extra: one clear error before any case runs
    lists: dict[str, Sequence[float]] = {
        "batch sizes": config.batch_sizes,
        "widths": config.widths,
        "depths": config.depths,
        "trained": config.trained,
        "local steps": config.local_steps,
        "dp noise": config.dp_noise,
        "clients": config.clients,
        "attacks": [0] * len(config.attacks),
    }
    for name, values in lists.items():
        if not values:
            raise InputError(f"the list of {name} is empty; give at least one value.")
    positive = {
        "batch sizes": config.batch_sizes,
        "widths": config.widths,
        "depths": config.depths,
        "clients": (*config.clients, *config.clients_sweep),
    }
    for name, values in positive.items():
        if min(values) < 1:
            raise InputError(f"{name} must be >= 1; found {list(values)}.")
    non_negative = {
        "trained": config.trained,
        "local steps": config.local_steps,
        "dp noise": (*config.dp_noise, *config.dp_sweep),
    }
    for name, values in non_negative.items():
        if min(values) < 0:
            raise InputError(f"{name} must be >= 0; found {list(values)}.")
    if config.seeds < 1:
        raise InputError(f"seeds (the number of seeds) must be >= 1; found {config.seeds}.")
    if config.dp_clip <= 0:
        raise InputError(f"the DP clipping norm must be > 0; found {config.dp_clip}.")


def plan_cases(config: BenchConfig) -> list[Case]:
    """Every case of the sweep, in the order they run, without repeats.

    The main grid comes first (batch size outermost, attack innermost), then the DP and
    client sweeps at the reference setting (see :class:`BenchConfig`).

    Raises
    ------
    InputError
        For an unknown attack or dataset, an empty list, or out-of-range values.
    """
    _check_config(config)
    seeds = range(config.seeds)

    def make(values: tuple[Any, ...], attack: str, sweep: str, dp: bool) -> Case:
        b, width, depth, trained, local, noise, clients, seed = values
        return Case(
            data=config.data,
            batch_size=int(b),
            width=int(width),
            depth=int(depth),
            trained=int(trained),
            local_steps=int(local),
            dp_noise=float(noise),
            dp_clip=float(config.dp_clip) if dp else None,
            clients=int(clients),
            seed=int(seed),
            attack=attack,
            sweep=sweep,
        )

    cases: list[Case] = []
    grid = itertools.product(
        config.batch_sizes,
        config.widths,
        config.depths,
        config.trained,
        config.local_steps,
        config.dp_noise,
        config.clients,
        seeds,
    )
    for values in grid:
        if values[4] > 0 and values[5] > 0:
            continue  # DP-SGD is one clipped, noised gradient: no FedAvg local steps
        cases.extend(make(values, attack, "main", values[5] > 0) for attack in config.attacks)
    reference = (
        min(config.batch_sizes),
        config.widths[0],
        config.depths[0],
        config.trained[0],
    )
    for noise, seed in itertools.product(config.dp_sweep, seeds):  # DP-SGD even at noise 0
        values = (*reference, 0, noise, config.clients[0], seed)
        cases.extend(make(values, attack, "dp", True) for attack in config.attacks)
    for clients, seed in itertools.product(config.clients_sweep, seeds):
        values = (*reference, config.local_steps[0], config.dp_noise[0], clients, seed)
        dp = config.dp_noise[0] > 0
        cases.extend(make(values, attack, "clients", dp) for attack in config.attacks)
    unique: dict[tuple[str, ...], Case] = {}
    for case in cases:
        unique.setdefault(case_key(case), case)
    planned = list(unique.values())
    for case in planned:
        if case.clients > case.batch_size:
            raise InputError(
                f"{case.clients} clients cannot share a batch of {case.batch_size} images "
                "(each client needs at least one); use fewer clients or a larger batch."
            )
    return planned


# --------------------------------------------------------------------------------------
# data, model, client


def load_bench_data(name: str) -> tuple[ImageData, ImageData]:
    """``(attack pool, training pool)``: disjoint halves of the dataset ``name``.

    ``"builtin"``: the 1000 shipped Fashion-MNIST images; ``"fashion-mnist"``: the first
    2000 of the local test split; ``"rgb"``: 600 RGB 32x32 photo patches. Images are
    float64 in ``[0, 1]``, shape ``(N, C, H, W)``.

    Raises
    ------
    InputError
        For an unknown name. FileNotFoundError when Fashion-MNIST is not on this machine.
    """
    if name == "builtin":
        data = builtin_images()
    elif name == "fashion-mnist":
        data = load_fashion_mnist("test", n=2000)
    elif name == "rgb":
        data = rgb_patches(600, size=32, seed=0)
    else:
        raise InputError(f"unknown data {name!r}; choose one of {', '.join(DATASETS)}.")
    split = int(len(data) * (1.0 - TRAIN_FRACTION))

    def part(lo: int, hi: int) -> ImageData:
        return ImageData(data.images[lo:hi], data.labels[lo:hi], data.num_classes, data.name)

    return part(0, split), part(split, len(data))


def _pretrain(model: nn.Module, pool: ImageData, steps: int, seed: int) -> None:
    """``steps`` SGD steps of cross-entropy on random mini-batches of ``pool`` (in place)."""
    if steps == 0:
        return
    rng = np.random.default_rng(10_000 + seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=TRAIN_LR)
    size = min(TRAIN_BATCH, len(pool))
    for _ in range(steps):
        index = torch.from_numpy(rng.choice(len(pool), size=size, replace=False))
        optimiser.zero_grad()
        loss = functional.cross_entropy(model(pool.images[index]), pool.labels[index])
        loss.backward()
        optimiser.step()
    optimiser.zero_grad()


@dataclass
class _Prepared:
    model: nn.Module
    update: dict[str, torch.Tensor]
    update_kind: UpdateKind
    images: torch.Tensor
    labels: torch.Tensor
    epsilon: float | None


def _prepare(case: Case, pools: tuple[ImageData, ImageData], config: BenchConfig) -> _Prepared:
    """Model, batch and the (summed) client update of a case."""
    attack_pool, train_pool = pools
    model = build_model(
        case.width,
        case.seed,
        attack_pool.num_classes,
        input_shape=attack_pool.image_shape,
        depth=case.depth,
    )
    _pretrain(model, train_pool, case.trained, case.seed)
    images, labels = sample_batch(attack_pool, case.batch_size, seed=case.seed)
    parts = torch.tensor_split(torch.arange(case.batch_size), case.clients)
    updates: list[dict[str, torch.Tensor]] = []
    epsilon: float | None = None
    kind: UpdateKind = "gradient"
    for number, index in enumerate(parts):
        x, y = images[index], labels[index]
        client_seed = case.seed * 1000 + number
        if case.dp_clip is not None:
            dp = client.dp_sgd_update(
                model,
                x,
                y,
                max_grad_norm=case.dp_clip,
                noise_multiplier=case.dp_noise,
                seed=client_seed,
            )
            updates.append(dict(dp.update))
            epsilon = dp.epsilon if epsilon is None else max(epsilon, dp.epsilon)
        elif case.local_steps > 0:
            kind = "delta"
            updates.append(
                dict(
                    client.fedavg_update(
                        model,
                        x,
                        y,
                        epochs=case.local_steps,
                        batch_size=None,
                        lr=config.client_lr,
                        shuffle=False,
                        seed=client_seed,
                    )
                )
            )
        else:
            updates.append(dict(client.fedsgd_update(model, x, y, reduction="mean")))
    update = updates[0] if len(updates) == 1 else dict(client.aggregate(updates))
    return _Prepared(model, update, kind, images, labels, epsilon)


def _attack_options(case: Case, config: BenchConfig) -> dict[str, Any]:
    """Each attack's own keyword arguments for a case."""
    if case.attack == "spear":
        return {"use_batch_size": case.dp_noise > 0, "input_range": (0.0, 1.0)}
    if case.attack == "gradient-matching":
        return {"iterations": config.gm_iterations, "box": (0.0, 1.0)}
    if case.attack == "breaching-ig":
        return {"iterations": config.gm_iterations}
    return {}


# --------------------------------------------------------------------------------------
# one case


def _empty_metrics() -> dict[str, Any]:
    return dict.fromkeys(METRIC_FIELDS)


def _score(rec: Reconstruction, prepared: _Prepared, case: Case) -> dict[str, Any]:
    """Metric columns of one reconstruction (see :data:`METRIC_FIELDS`)."""
    row = _empty_metrics()
    found = int(rec.inputs.shape[0])
    row.update(
        b_found=int(rec.batch_size),
        found=found,
        found_rate=found / case.batch_size,
    )
    truth = prepared.images
    if not rec.feature_space and math.prod(rec.inputs.shape[1:]) == math.prod(truth.shape[1:]):
        inputs = rec.inputs.detach().to(torch.float64).reshape(found, *truth.shape[1:])
        labels = rec.labels if rec.labels is not None and len(rec.labels) == found else None
        summary = metrics.summarize(
            inputs, truth, labels, prepared.labels if labels is not None else None
        )
        for name in ("exact_rate", "psnr_mean", "psnr_median", "ssim_mean", "label_accuracy"):
            row[name] = summary[name]
        certificate = rec.certificate
        if certificate is None and labels is not None and found:
            try:  # the baselines leave it to the caller; same definition as spear's
                certificate = certify(
                    prepared.model,
                    prepared.update,
                    inputs.to(next(prepared.model.parameters()).dtype),
                    labels,
                    update_kind=prepared.update_kind,
                )
            except _RECORDED_ERRORS:
                certificate = None
        row["certificate"] = certificate
    row["verified"] = bool(rec.verified)
    return row


def _run_case(
    case: Case, prepared: _Prepared, config: BenchConfig
) -> tuple[dict[str, Any], Reconstruction | None]:
    fn = get_bench_attack(case.attack)
    row: dict[str, Any] = {name: getattr(case, name) for name in KEY_FIELDS}
    start = time.perf_counter()
    rec: Reconstruction | None = None
    try:
        rec = fn(
            prepared.model,
            prepared.update,
            batch_size=case.batch_size,
            input_shape=tuple(prepared.images.shape[1:]),
            update_kind=prepared.update_kind,
            seed=case.seed,
            time_budget=config.time_budget,
            **_attack_options(case, config),
        )
        seconds = time.perf_counter() - start
        row.update(_score(rec, prepared, case))
    except _RECORDED_ERRORS as exc:
        seconds = time.perf_counter() - start
        row.update(_empty_metrics())
        row.update(b_found=0, found=0, found_rate=0.0, exact_rate=0.0)
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["epsilon"] = prepared.epsilon
    row["seconds"] = seconds
    return row, rec


def _failed_row(case: Case, error: str) -> dict[str, Any]:
    """The row of a case whose run failed outside the attack (a lost Ray task)."""
    row: dict[str, Any] = {name: getattr(case, name) for name in KEY_FIELDS}
    row.update(_empty_metrics())
    row.update(b_found=0, found=0, found_rate=0.0, exact_rate=0.0, error=error)
    return row


@dataclass
class _CaseOutput:
    """What one case sends back from a Ray task: its row and, for grids, the images."""

    row: dict[str, Any]
    originals: torch.Tensor | None = None
    inputs: torch.Tensor | None = None


def _case_task(job: tuple[Case, BenchConfig, bool]) -> _CaseOutput:
    """One case, start to end (a Ray task): prepare, attack, score."""
    case, config, want_images = job
    pools = load_bench_data(config.data)
    prepared = _prepare(case, pools, config)
    row, rec = _run_case(case, prepared, config)
    if not want_images or rec is None or rec.feature_space:
        return _CaseOutput(row)
    return _CaseOutput(row, prepared.images, rec.inputs.detach().to(torch.float64))


def _write_grid(folder: Path, case: Case, originals: torch.Tensor, inputs: torch.Tensor) -> None:
    """``grid_<attack>_b<b>.png``: originals on top, the attack's images below."""
    shape = originals.shape
    if math.prod(inputs.shape[1:]) == math.prod(shape[1:]):
        grid = folder / f"grid_{case.attack}_b{case.batch_size}.png"
        report.image_grid(originals, inputs.reshape(-1, *shape[1:]), grid)


# --------------------------------------------------------------------------------------
# results files


def _parse(text: str) -> Any:
    """CSV text -> value: ``""`` -> None, numbers (``inf`` too), booleans, else text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and text.lstrip("-").isdigit():
        return int(text)
    return number


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` with values parsed back (empty list if there is none)."""
    target = Path(path)
    if not target.is_file():
        return []
    with target.open(newline="", encoding="utf-8") as handle:
        return [
            {name: _parse(value or "") for name, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def _median(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    numbers = [v for v in numbers if not math.isnan(v)]
    return float(np.median(numbers)) if numbers else None


def aggregate_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per case over seeds: key columns (without ``seed``), ``seeds`` (count),
    medians of the numeric metrics, ``verified`` (fraction) and ``errors`` (count).

    Examples
    --------
    >>> rows = [dict(attack="a", batch_size=2, seed=s, exact_rate=r, verified=True)
    ...         for s, r in ((0, 1.0), (1, 0.5), (2, 0.0))]
    >>> out = aggregate_rows(rows)
    >>> out[0]["seeds"], out[0]["exact_rate"], out[0]["verified"]
    (3, 0.5, 1.0)
    """
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        key = tuple(key_text(row.get(name)) for name in KEY_FIELDS if name != "seed")
        groups.setdefault(key, []).append(row)
    result: list[dict[str, Any]] = []
    for members in groups.values():
        first = members[0]
        out: dict[str, Any] = {name: first.get(name) for name in KEY_FIELDS if name != "seed"}
        out["seeds"] = len(members)
        for name in _NUMERIC_METRICS:
            out[name] = _median(row.get(name) for row in members)
        flags = [row.get("verified") for row in members if row.get("verified") is not None]
        out["verified"] = sum(bool(v) for v in flags) / len(flags) if flags else None
        out["errors"] = sum(bool(row.get("error")) for row in members)
        result.append(out)
    return result


#: Columns of the Markdown table, in order.
TABLE_COLUMNS = (
    "attack",
    "batch_size",
    "width",
    "depth",
    "trained",
    "local_steps",
    "dp_noise",
    "dp_clip",
    "clients",
    "seeds",
    "b_found",
    "found_rate",
    "exact_rate",
    "psnr_mean",
    "psnr_median",
    "ssim_mean",
    "label_accuracy",
    "certificate",
    "seconds",
    "errors",
)

_SETTING_FIELDS = ("width", "depth", "trained", "local_steps", "dp_noise", "dp_clip", "clients")
_SHORT = {
    "width": "w",
    "depth": "depth",
    "trained": "trained",
    "local_steps": "local",
    "dp_noise": "noise",
    "dp_clip": "clip",
    "clients": "clients",
    "batch_size": "b",
}


def _describe(name: str, value: Any) -> str:
    if name == "dp_clip" and value is None:
        return "no DP-SGD"
    return f"{_SHORT[name]}={value}"


def _series(
    rows: Sequence[Mapping[str, Any]],
    x_name: str,
    y_name: str,
    cap_inf: float | None = None,
    nothing_found: float | None = None,
) -> dict[str, tuple[list[float], list[float]]]:
    """Line series ``attack (+ varying settings) -> (xs, ys)`` sorted by x.

    ``cap_inf`` replaces an infinite y; ``nothing_found`` is the y of a row whose attack
    returned no example (whose metric is therefore missing).
    """
    others = [name for name in ("batch_size", *_SETTING_FIELDS) if name != x_name]
    varying = [n for n in others if len({key_text(r.get(n)) for r in rows}) > 1]
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        label = str(row["attack"])
        if varying:
            label += " (" + ", ".join(_describe(n, row.get(n)) for n in varying) + ")"
        y = row.get(y_name)
        value = math.nan if y is None else float(y)
        if y is None and nothing_found is not None and row.get("found") == 0:
            value = nothing_found
        if cap_inf is not None and math.isinf(value):
            value = cap_inf
        groups.setdefault(label, []).append((float(row[x_name]), value))
    return {
        label: ([x for x, _ in sorted(points)], [y for _, y in sorted(points)])
        for label, points in groups.items()
    }


def _write_plots(
    summary: Sequence[Mapping[str, Any]], plan: Sequence[Case], out: Path
) -> list[Path]:
    main_keys = {
        tuple(key_text(getattr(c, n)) for n in KEY_FIELDS if n != "seed")
        for c in plan
        if c.sweep == "main"
    }

    def key(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(key_text(row.get(n)) for n in KEY_FIELDS if n != "seed")

    main = [row for row in summary if key(row) in main_keys]
    paths = [
        report.plot_lines(
            _series(main, "batch_size", "exact_rate"),
            out / "exact_vs_b.png",
            "batch size b (images)",
            "exact recovery rate (fraction of b)",
            "Exactly recovered examples vs batch size",
        ),
        report.plot_lines(
            _series(main, "batch_size", "seconds"),
            out / "time_vs_b.png",
            "batch size b (images)",
            "attack time (s)",
            "Attack time vs batch size",
            logy=True,
        ),
    ]
    # PSNR vs noise: the smallest b at the reference setting, DP-SGD rows (any local steps
    # are 0 there) and the rows without DP-SGD (drawn as their own series)
    noise_rows: list[Mapping[str, Any]] = []
    if plan:
        reference, smallest = plan[0], min(c.batch_size for c in plan)
        for row in summary:
            same = all(
                key_text(row.get(n)) == key_text(getattr(reference, n))
                for n in ("data", "width", "depth", "trained", "clients")
            )
            local_ok = row.get("dp_clip") is not None or key_text(
                row.get("local_steps")
            ) == key_text(reference.local_steps)
            if same and local_ok and key_text(row.get("batch_size")) == key_text(smallest):
                noise_rows.append(row)
    paths.append(
        report.plot_lines(
            _series(noise_rows, "dp_noise", "psnr_mean", cap_inf=PSNR_PLOT_CAP, nothing_found=0.0),
            out / "psnr_vs_noise.png",
            "DP-SGD noise multiplier (log scale above the smallest, linear to 0)",
            f"mean PSNR (dB; exact at {PSNR_PLOT_CAP:g}, nothing found at 0)",
            "Reconstruction quality vs DP noise",
            symlogx=_smallest_noise(noise_rows),
        )
    )
    return paths


def _smallest_noise(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The smallest positive noise multiplier among ``rows`` (``None`` without one)."""
    positive = [float(r["dp_noise"]) for r in rows if float(r["dp_noise"] or 0) > 0]
    return min(positive) if positive else None


# --------------------------------------------------------------------------------------
# the sweep

_Finished = Callable[[Case, dict[str, Any]], None]


def _run_serial(
    settings: Mapping[tuple[Any, ...], list[Case]],
    first_setting: tuple[Any, ...],
    config: BenchConfig,
    folder: Path,
    finished: _Finished,
) -> None:
    """Every pending case here, one update per setting shared by its attacks."""
    pools: tuple[ImageData, ImageData] | None = None
    for setting, cases in settings.items():
        if pools is None:
            pools = load_bench_data(config.data)
        prepared = _prepare(cases[0], pools, config)
        for case in cases:
            row, rec = _run_case(case, prepared, config)
            if setting == first_setting and rec is not None and not rec.feature_space:
                _write_grid(folder, case, prepared.images, rec.inputs.detach().to(torch.float64))
            finished(case, row)


def _run_ray(
    pending: Sequence[Case],
    first_setting: tuple[Any, ...],
    config: BenchConfig,
    folder: Path,
    finished: _Finished,
    address: str,
    cpus: int | None,
) -> None:
    """Every pending case as a Ray task (each prepares its own update)."""
    from spear.parallel import describe_error, ray_map

    jobs = [(case, config, case.setting == first_setting) for case in pending]

    def failed(job: tuple[Case, BenchConfig, bool], error: BaseException) -> _CaseOutput:
        return _CaseOutput(_failed_row(job[0], f"Ray task failed: {describe_error(error)}"))

    for number, output in ray_map(_case_task, jobs, address=address, cpus=cpus, on_error=failed):
        case = pending[number]
        if output.originals is not None and output.inputs is not None:
            _write_grid(folder, case, output.originals, output.inputs)
        finished(case, output.row)


@dataclass
class BenchResult:
    """What :func:`run_bench` did.

    Attributes
    ----------
    rows:
        Every row of the plan read back from ``results.csv`` (one per case and seed).
    summary:
        :func:`aggregate_rows` of ``rows``.
    table:
        The Markdown table written to ``results.md``.
    ran, skipped:
        Cases run now, and cases found already done in ``results.csv``.
    files:
        Paths written (CSV, Markdown, plots, grids).
    """

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    table: str
    ran: int
    skipped: int
    files: list[Path]


def run_bench(
    config: BenchConfig,
    out: str | Path,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    ray: str | None = None,
    ray_cpus: int | None = None,
) -> BenchResult:
    """Run the sweep of ``config``, writing into the folder ``out``.

    Parameters
    ----------
    config:
        The sweep.
    out:
        Folder for ``results.csv`` (appended to after every case; cases already in it are
        skipped), ``results.md``, ``exact_vs_b.png``, ``time_vs_b.png``,
        ``psnr_vs_noise.png`` and ``grid_<attack>_b<b>.png`` (the first setting, per
        attack, originals on top).
    progress:
        A progress bar over cases on stderr; default only on a terminal.
    log:
        Called with a line for every failed attack run (default: print to stderr).
    ray:
        ``None`` runs the cases here, one after the other. Otherwise every case is a Ray
        task at this address (``"local"``: a Ray instance started for the run; ``"auto"``
        or ``"ray://HOST:10001"``: a running cluster; see :mod:`spear.parallel`). The CSV
        is the same; rows are appended as cases finish, and a task that fails (a lost
        worker) is recorded as a row with its ``error``.
    ray_cpus:
        CPUs of a local Ray instance (default: all of this machine's).

    Returns
    -------
    BenchResult
    """
    plan = plan_cases(config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "results.csv"
    done = {case_key(row) for row in read_results(csv_path)}
    pending = [case for case in plan if case_key(case) not in done]
    skipped = len(plan) - len(pending)
    say = log or (lambda line: print(line, file=sys.stderr))
    files: list[Path] = [csv_path]
    first_setting = plan[0].setting
    settings: dict[tuple[Any, ...], list[Case]] = {}
    for case in pending:
        settings.setdefault(case.setting, []).append(case)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(
        total=len(plan), initial=skipped, desc="spear bench", unit="case", disable=not show
    ) as bar:

        def finished(case: Case, row: dict[str, Any]) -> None:
            if row["error"]:
                say(f"spear bench: {case.attack} failed on {asdict(case)}: {row['error']}")
            report.write_csv([row], csv_path, append=True)
            bar.set_postfix_str(f"{case.attack} b={case.batch_size}", refresh=False)
            bar.update(1)

        if ray is None:
            _run_serial(settings, first_setting, config, folder, finished)
        else:
            _run_ray(pending, first_setting, config, folder, finished, ray, ray_cpus)
    keys = {case_key(case) for case in plan}
    rows = [row for row in read_results(csv_path) if case_key(row) in keys]
    summary = aggregate_rows(rows)
    table = report.markdown_table(summary, TABLE_COLUMNS)
    header = (
        f"# spear bench\n\nData: {config.data}; {len(plan)} cases ({config.seeds} seed(s)); "
        f"medians over seeds. Time budget per attack run: {config.time_budget} s.\n\n"
    )
    files.append(report.write_markdown(header + table, folder / "results.md"))
    files.extend(_write_plots(summary, plan, folder))
    files.extend(sorted(folder.glob(f"grid_*_b{plan[0].batch_size}.png")))
    return BenchResult(rows, summary, table, len(pending), skipped, files)
