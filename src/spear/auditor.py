"""Attack every client update a federated server receives, and keep a report of it.

This is the framework-free part of the Flower audit (:mod:`spear.flower`): it takes what a
server sent and what a client returned as named NumPy arrays, runs :func:`spear.attack` on
the difference (or on the returned arrays when clients send gradients) and records what
came out. After each round it rewrites ``report.json``, ``report.md`` and ``report.html`` in
its folder, so an interrupted run keeps everything audited until then.

Folder layout::

    out/report.json                         {"records": [...], "rounds": [...], "settings": {...}}
    out/report.md, out/report.html          the same as a table; the page shows the grids
    out/report.png                          examples recovered per round, the first grids
    out/round_001/node_<id>/grid.png        the reconstructed images of one update
    out/round_001/node_<id>/reconstruction.safetensors   inputs (k, ...) and labels (k,)

A record (one per attacked update) has the keys ``round``, ``node``, ``clients`` (updates
summed into what was attacked: 1, or the number of clients under secure aggregation),
``update_kind``, ``batch_size`` (found in the update), ``recovered`` (examples the attack
returned, each checked against its own ReLU pattern; 0 when it fell back to an estimate),
``complete``, ``verified`` and ``examples_verified`` (the meanings of
:class:`spear.Reconstruction`: only when ``examples_verified`` is every returned example
certified against the update; otherwise some may be inexact), ``certificate``, ``labels``,
``estimate``, ``seconds``, ``layer``, ``dtype``, ``grid``, ``reconstruction``, ``notes`` and
``error`` (``None``, or the exception that stopped the attack: a failing attack never stops
training).

Examples
--------
>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> names = match_arrays(model, {"0": (3, 4), "1": (3,), "2": (2, 3), "3": (2,)})
>>> names["0"], names["3"]
('0.weight', '2.bias')
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from numpy.typing import NDArray
from safetensors.torch import save_file
from torch import nn

import spear
from spear import validate
from spear.errors import InputError
from spear.model import dropout_off
from spear.pages import html_page, html_table, image_tiles, write_text_atomic
from spear.report import markdown_table, to_jsonable
from spear.update import UpdateKind, check_update_kind

__all__ = [
    "RECORD_KEYS",
    "AuditOptions",
    "UpdateAuditor",
    "match_arrays",
    "select_updates",
    "torch_threads",
]

#: Keys of every record in ``report.json``, in order.
RECORD_KEYS = (
    "round",
    "node",
    "clients",
    "update_kind",
    "batch_size",
    "recovered",
    "complete",
    "verified",
    "examples_verified",
    "certificate",
    "labels",
    "estimate",
    "seconds",
    "layer",
    "dtype",
    "grid",
    "reconstruction",
    "notes",
    "error",
)

#: Columns of the Markdown and HTML tables.
TABLE_COLUMNS = (
    "round",
    "node",
    "clients",
    "batch_size",
    "recovered",
    "verified",
    "examples_verified",
    "certificate",
    "seconds",
    "error",
)

#: Wrapper prefixes stripped from array names before they are matched to the model's.
_PREFIXES = ("module.", "_module.", "model.", "net.")

Arrays = Mapping[str, NDArray[Any]]


# --------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class AuditOptions:
    """How the updates of a federation are attacked.

    Attributes
    ----------
    update_kind:
        ``"delta"`` (clients return trained weights; the update is returned minus sent)
        or ``"gradient"`` (clients return a gradient; it is attacked as it is).
    time_budget:
        Seconds of layer inversion per update (:func:`spear.attack`'s ``time_budget``):
        the most an update holds up its round, plus a second or so for labels and the
        certificate.
    every:
        Attack rounds ``1, 1 + every, 1 + 2 * every, ...`` only.
    sample:
        Updates attacked per audited round: ``None`` for all, a float in ``(0, 1]`` for
        that fraction (rounded up), an integer ``>= 1`` for that many; drawn at random from
        ``seed`` and the round.
    seed:
        Seed of the sampling and of the attacks.
    batch_size:
        The clients' batch size when it is known (needed to estimate from noisy updates);
        ``None`` reads it off each update.
    input_shape:
        Shape of one model input, e.g. ``(1, 28, 28)`` (default: guessed by the attack).
    save_images:
        Write ``grid.png`` and ``reconstruction.safetensors`` for every update.
    threads:
        torch threads during an attack (restored afterwards); ``None`` leaves torch's
        setting. One thread by default: the attacks run beside training and take one core
        (one and two threads give the same results).
    """

    update_kind: UpdateKind = "delta"
    time_budget: float = 30.0
    every: int = 1
    sample: float | int | None = None
    seed: int = 0
    batch_size: int | None = None
    input_shape: tuple[int, ...] | None = None
    save_images: bool = True
    threads: int | None = 1

    def __post_init__(self) -> None:
        check_update_kind(self.update_kind)
        validate.time_budget(self.time_budget)
        validate.positive_int(self.every, "every", hint="pass every=1 to attack every round")
        validate.batch_size(self.batch_size)
        _check_sample(self.sample)
        if self.threads is not None:
            validate.positive_int(self.threads, "threads", hint="or None for torch's setting")


def _check_sample(sample: object) -> None:
    if sample is None:
        return
    if isinstance(sample, bool) or not isinstance(sample, int | float):
        raise InputError(
            f"sample must be None, a fraction in (0, 1] or a number of updates >= 1, found "
            f"{sample!r} ({type(sample).__name__}); pass e.g. sample=0.5 or sample=3."
        )
    if isinstance(sample, float) and not 0 < sample <= 1:
        raise InputError(
            f"sample as a float is a fraction of the updates and must lie in (0, 1], found "
            f"{sample!r}; pass an integer (e.g. sample=3) for a number of updates."
        )
    if isinstance(sample, int) and sample < 1:
        raise InputError(f"sample as an integer is a number of updates >= 1, found {sample}.")


def select_updates(nodes: Sequence[Any], server_round: int, options: AuditOptions) -> list[Any]:
    """The nodes whose updates are attacked in ``server_round`` (in the given order).

    Examples
    --------
    >>> select_updates([5, 6, 7], 2, AuditOptions(every=2))
    []
    >>> len(select_updates([5, 6, 7, 8], 1, AuditOptions(sample=0.5)))
    2
    """
    if (server_round - 1) % options.every != 0:
        return []
    if options.sample is None:
        return list(nodes)
    count = (
        math.ceil(options.sample * len(nodes))
        if isinstance(options.sample, float)
        else min(options.sample, len(nodes))
    )
    rng = np.random.default_rng([options.seed, server_round])
    keep = set(rng.choice(len(nodes), size=count, replace=False).tolist())
    return [node for index, node in enumerate(nodes) if index in keep]


# --------------------------------------------------------------------------------------
# names


def _shapes_fit(shapes: Sequence[tuple[int, ...]], targets: Sequence[tuple[int, ...]]) -> bool:
    return len(shapes) == len(targets) and all(a == b for a, b in zip(shapes, targets, strict=True))


def match_arrays(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Map array names (as a client sent them) to ``model.state_dict()`` names.

    Tried in order: the names themselves; the names without a wrapper prefix such as
    ``module.``; position, against ``state_dict()`` (parameters and buffers) and then
    against ``named_parameters()`` (Flower's NumPy clients send ``"0"``, ``"1"``, ...).
    Shapes must agree in every case.

    Parameters
    ----------
    model:
        The model the federation trains.
    shapes:
        Array name -> shape, in the order the arrays came.

    Returns
    -------
    dict[str, str]
        Array name -> state-dict name, for every array.

    Raises
    ------
    InputError
        When no rule fits; the message lists both sets of names and shapes.
    """
    state = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    keys = list(shapes)

    def named(mapping: dict[str, str]) -> dict[str, str] | None:
        if all(state.get(target) == tuple(shapes[key]) for key, target in mapping.items()):
            return mapping
        return None

    direct = {key: key for key in keys}
    if set(keys) <= set(state) and (found := named(direct)):
        return found
    for prefix in _PREFIXES:
        if all(key.startswith(prefix) for key in keys):
            stripped = {key: key[len(prefix) :] for key in keys}
            if set(stripped.values()) <= set(state) and (found := named(stripped)):
                return found
    given = [tuple(shapes[key]) for key in keys]
    for names in (list(state), [name for name, _ in model.named_parameters()]):
        if _shapes_fit(given, [state[name] for name in names]):
            return dict(zip(keys, names, strict=True))
    raise InputError(
        f"cannot match the {len(keys)} arrays the clients sent to the model's parameters: "
        f"sent {[(key, tuple(shapes[key])) for key in keys]}, model.state_dict() has "
        f"{list(state.items())}. Expected the names of model.state_dict() (for example "
        "ArrayRecord(model.state_dict())) or the arrays in the order of state_dict() or "
        "named_parameters(). Pass the model the federation trains."
    )


# --------------------------------------------------------------------------------------
# one update


@dataclass
class _RoundModel:
    """The model as the server sent it in one round, and how arrays map onto it."""

    model: nn.Module
    names: dict[str, str]
    dtype: torch.dtype
    missing: list[str] = field(default_factory=list)


def _float_dtype(arrays: Arrays) -> torch.dtype:
    for value in arrays.values():
        if np.issubdtype(value.dtype, np.floating):
            return torch.from_numpy(np.zeros(0, dtype=value.dtype)).dtype
    raise InputError(
        f"none of the {len(arrays)} arrays sent is floating point (dtypes "
        f"{sorted({str(v.dtype) for v in arrays.values()})}); there are no weights to attack."
    )


def _round_model(model: nn.Module, sent: Arrays) -> _RoundModel:
    """A copy of ``model`` holding the weights ``sent``, in their floating dtype, with its
    Dropout layers in eval mode."""
    names = match_arrays(model, {key: tuple(value.shape) for key, value in sent.items()})
    dtype = _float_dtype(sent)
    work = copy.deepcopy(model).to(dtype)
    state = work.state_dict()
    for key, name in names.items():
        state[name] = torch.from_numpy(np.array(sent[key], copy=True)).to(state[name].dtype)
    work.load_state_dict(state)
    # Dropout is the identity on the server; the masks of clients that trained with it
    # active are read off their updates (spear.dropout)
    dropout_off(work)
    present = set(names.values())
    missing = [name for name, _ in work.named_parameters() if name not in present]
    return _RoundModel(work, names, dtype, missing)


def _update(
    round_model: _RoundModel, sent: Arrays, returned: Arrays, update_kind: UpdateKind
) -> dict[str, torch.Tensor]:
    """Parameter name -> update tensor (``returned - sent`` for a delta)."""
    absent = [key for key in round_model.names if key not in returned]
    if absent:
        raise InputError(
            f"the reply lacks arrays {absent} that the server sent; it holds {list(returned)}."
        )
    params = dict(round_model.model.named_parameters())
    update: dict[str, torch.Tensor] = {}
    for key, name in round_model.names.items():
        if name not in params:
            continue  # a buffer
        back = np.asarray(returned[key])
        if back.shape != params[name].shape:
            raise InputError(
                f"array {key!r} ({name}) came back with shape {back.shape}, sent "
                f"{tuple(params[name].shape)}."
            )
        value = back - np.asarray(sent[key]) if update_kind == "delta" else back
        update[name] = torch.from_numpy(np.array(value, copy=True)).to(params[name].dtype)
    for name in round_model.missing:
        update[name] = torch.zeros_like(params[name]).detach()
    return update


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (``None``: unchanged), restored on exit."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _empty_record(server_round: int, node: Any, clients: int, kind: UpdateKind) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record.update(
        round=server_round,
        node=node,
        clients=clients,
        update_kind=kind,
        batch_size=None,
        recovered=0,
        complete=False,
        verified=False,
        examples_verified=False,
        estimate=False,
        notes=[],
    )
    return record


# --------------------------------------------------------------------------------------
# the auditor


class UpdateAuditor:
    """Attacks client updates and keeps ``report.json``, ``report.md`` and ``report.html``.

    Parameters
    ----------
    model:
        The model the federation trains (its architecture; the weights of each round come
        from what the server sent). Any model :func:`spear.attack` accepts.
    out:
        Folder of the report (created when missing).
    options:
        What to attack and for how long.
    title:
        Heading of the HTML page.
    """

    def __init__(
        self,
        model: nn.Module,
        out: str | Path,
        options: AuditOptions | None = None,
        *,
        title: str = "spear audit of a federated run",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(
                f"model must be the torch.nn.Module the federation trains, found "
                f"{type(model).__name__}."
            )
        self.model = model
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"audit folder {self.out} exists and is not a folder; pass another.")
        self.options = options or AuditOptions()
        self.title = title
        self.records: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self._cache: tuple[Hashable, _RoundModel] | None = None

    # ---- one update ------------------------------------------------------------------

    def _model_for(self, sent: Arrays, sent_key: Hashable | None) -> _RoundModel:
        if sent_key is None:
            return _round_model(self.model, sent)
        if self._cache is None or self._cache[0] != sent_key:
            self._cache = (sent_key, _round_model(self.model, sent))
        return self._cache[1]

    def attack_update(
        self,
        server_round: int,
        node: Any,
        sent: Arrays,
        returned: Arrays,
        *,
        clients: int = 1,
        note: str | None = None,
        sent_key: Hashable | None = None,
    ) -> dict[str, Any]:
        """Attack one update and append its record (also returned).

        Parameters
        ----------
        server_round, node:
            Where the update came from (``node`` is any JSON-able id).
        sent:
            Array name -> array the server sent this round (what the client started from).
        returned:
            Array name -> array the client returned (weights, or a gradient).
        clients:
            Client updates summed into ``returned`` (secure aggregation), 1 otherwise.
        note:
            A note added to the record (e.g. what secure aggregation leaves visible).
        sent_key:
            Identifies ``sent`` within the round: updates with the same key reuse one copy
            of the model (``None``: build a copy for this update).

        Any exception of the attack is recorded in ``"error"``; Ctrl-C during the search
        keeps what was verified, records it and is raised again after the report is
        written.
        """
        kind = self.options.update_kind
        record = _empty_record(server_round, node, clients, kind)
        if note:
            record["notes"].append(note)
        start = time.perf_counter()
        interrupted = False
        try:
            round_model = self._model_for(sent, sent_key)
            update = _update(round_model, sent, returned, kind)
            record["dtype"] = str(round_model.dtype).replace("torch.", "")
            if round_model.missing:
                record["notes"].append(
                    f"parameters {round_model.missing} were not sent; their update is taken as 0."
                )
            with torch_threads(self.options.threads):
                rec = spear.attack(
                    round_model.model,
                    update,
                    update_kind=kind,
                    batch_size=self.options.batch_size,
                    seed=self.options.seed,
                    input_shape=self.options.input_shape,
                    time_budget=self.options.time_budget,
                    progress=False,
                    # the audit judges the leak by the recovered features; rebuilding
                    # images from them would cost a minute per client and round
                    image_budget=0,
                )
            self._fill(record, rec, server_round, node)
            interrupted = rec.interrupted
        except Exception as exc:  # a failing attack must never stop training
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["seconds"] = time.perf_counter() - start
        self.records.append(record)
        if interrupted:
            self.write()
            raise KeyboardInterrupt
        return record

    def _fill(
        self, record: dict[str, Any], rec: spear.Reconstruction, server_round: int, node: Any
    ) -> None:
        estimate = (
            rec.layer_result is not None
            and rec.layer_result.found == 0
            and (rec.inputs.shape[0] > 0)
        )
        recovered = 0 if estimate else int(rec.inputs.shape[0])
        record.update(
            batch_size=int(rec.batch_size),
            recovered=recovered,
            complete=bool(rec.complete) and not estimate,
            verified=bool(rec.verified),
            examples_verified=bool(rec.examples_verified),
            certificate=rec.certificate,
            labels=rec.labels.tolist() if rec.labels is not None else None,
            estimate=estimate,
            layer=rec.layer,
        )
        record["notes"].extend(rec.notes)
        if self.options.save_images and rec.inputs.shape[0] > 0:
            self._save(record, rec, server_round, node)

    def _save(
        self, record: dict[str, Any], rec: spear.Reconstruction, server_round: int, node: Any
    ) -> None:
        folder = self.out / f"round_{server_round:03d}" / f"node_{node}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"inputs": rec.inputs.detach().cpu().contiguous()}
        if rec.labels is not None:
            tensors["labels"] = rec.labels.detach().cpu().contiguous()
        save_file(tensors, str(folder / "reconstruction.safetensors"))
        record["reconstruction"] = (
            (folder / "reconstruction.safetensors").relative_to(self.out).as_posix()
        )
        captions = [str(v) for v in rec.labels.tolist()] if rec.labels is not None else None
        try:
            image_tiles(rec.inputs, folder / "grid.png", captions=captions)
            record["grid"] = (folder / "grid.png").relative_to(self.out).as_posix()
        except ValueError as exc:
            record["notes"].append(f"no grid: {exc}")

    # ---- rounds and files ------------------------------------------------------------

    def end_round(
        self, server_round: int, updates: int, attacked: Iterable[dict[str, Any]]
    ) -> None:
        """Record a round's totals and rewrite the report files."""
        done = list(attacked)
        self.rounds.append(
            {
                "round": server_round,
                "updates": updates,
                "attacked": len(done),
                "recovered": sum(int(r["recovered"]) for r in done),
                "attack_seconds": sum(float(r["seconds"] or 0.0) for r in done),
            }
        )
        self._cache = None
        self.write()

    def settings(self) -> dict[str, Any]:
        """The options and the library version, as written to ``report.json``."""
        options = self.options
        return {
            "spear_version": spear.__version__,
            "update_kind": options.update_kind,
            "time_budget": options.time_budget,
            "every": options.every,
            "sample": options.sample,
            "seed": options.seed,
            "batch_size": options.batch_size,
            "input_shape": options.input_shape,
            "threads": options.threads,
        }

    def write(self) -> list[Path]:
        """Rewrite ``report.json``, ``report.md`` and ``report.html`` (each atomically)."""
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"records": self.records, "rounds": self.rounds, "settings": self.settings()}
        text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n"
        paths = [write_text_atomic(text, self.out / "report.json")]
        paths.append(write_text_atomic(self.markdown(), self.out / "report.md"))
        paths.append(write_text_atomic(self.html(), self.out / "report.html"))
        paths.append(self.overview(self.out / "report.png"))
        return paths

    def overview(self, path: Path) -> Path:
        """``report.png``: examples recovered per round and the first grids, at a glance."""
        grids = [r for r in self.records if r.get("grid")][:4]
        images = [imread(self.out / r["grid"]) for r in grids]
        heights = [2.2] + [9.5 * image.shape[0] / image.shape[1] + 0.3 for image in images]
        figure = Figure(figsize=(10.0, sum(heights) + 0.3), dpi=100)
        FigureCanvasAgg(figure)
        layout = figure.add_gridspec(len(heights), 1, height_ratios=heights)
        self._round_chart(figure.add_subplot(layout[0]))
        for index, (record, image) in enumerate(zip(grids, images, strict=True), start=1):
            axes = figure.add_subplot(layout[index])
            axes.imshow(image)
            axes.set_axis_off()
            certified = " (certified)" if record["examples_verified"] else ""
            axes.set_title(
                f"round {record['round']}, node {record['node']}: {record['recovered']} of "
                f"{record['batch_size']} recovered{certified}",
                fontsize=8,
            )
        figure.tight_layout()
        figure.savefig(path)
        return path

    def _round_chart(self, chart: Any) -> None:
        """Stacked bars per round: certified examples, other returned ones, and the total."""
        rounds = [int(r["round"]) for r in self.rounds]
        certified, other, total = [], [], []
        for number in rounds:
            these = [r for r in self.records if r["round"] == number]
            certified.append(sum(int(r["recovered"]) for r in these if r["examples_verified"]))
            other.append(sum(int(r["recovered"]) for r in these if not r["examples_verified"]))
            total.append(sum(int(r["batch_size"] or 0) for r in these))
        chart.bar(rounds, certified, width=0.6, color="#c0392b", label="recovered, certified")
        chart.bar(
            rounds,
            other,
            width=0.6,
            bottom=certified,
            color="#f5b041",
            label="returned, not certified",
        )
        chart.scatter(rounds, total, marker="_", s=900, color="black", label="examples found")
        chart.set_xticks(rounds)
        chart.set_xlabel("round")
        chart.set_ylabel("examples")
        chart.set_ylim(0, max([1, *total]) * 1.15)
        chart.set_title(self.title)
        if rounds:
            chart.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    def summary_line(self) -> str:
        """Updates attacked; examples from certified updates; what else came back."""
        certified = [r for r in self.records if r["examples_verified"]]
        others = [r for r in self.records if not r["examples_verified"] and r["recovered"]]
        failed = sum(1 for r in self.records if r["error"])
        return (
            f"{len(self.records)} update(s) attacked in {len(self.rounds)} round(s): "
            f"{sum(int(r['recovered']) for r in certified)} example(s) recovered from "
            f"{len(certified)} certified update(s) (every example checked against the "
            f"update); {sum(int(r['recovered']) for r in others)} more returned from "
            f"{len(others)} update(s) that could not be certified (some may be inexact); "
            f"{failed} attack(s) stopped with an error."
        )

    def markdown(self) -> str:
        """``report.md``: the summary line and one table row per attacked update."""
        return (
            f"# {self.title}\n\n{self.summary_line()}\n\n"
            + markdown_table(self.records, TABLE_COLUMNS)
            + "\n"
        )

    def html(self) -> str:
        """``report.html``: summary, the table, then every update's grid."""
        body = [
            f"<p>{self.summary_line()}</p>",
            '<p class="note">Rows in red: updates from which examples were recovered. '
            "<em>verified</em>: every example and label checked against the update; "
            "<em>examples verified</em>: every example checked (a FedAvg delta's labels "
            "cannot be). Attack settings: "
            + ", ".join(f"{k}={v}" for k, v in self.settings().items())
            + ".</p>",
            html_table(self.records, TABLE_COLUMNS, highlight="recovered"),
            "<h2>Reconstructions</h2>",
        ]
        for record in self.records:
            if not record.get("grid"):
                continue
            caption = (
                f"round {record['round']}, node {record['node']}: {record['recovered']} of "
                f"{record['batch_size']} recovered"
                + (" (verified)" if record["verified"] else "")
                + ("" if record["clients"] == 1 else f", sum of {record['clients']} clients")
            )
            body.append(
                f'<figure><img src="{record["grid"]}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        return html_page(self.title, body)
