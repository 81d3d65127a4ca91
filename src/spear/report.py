"""Figures and tables for reconstructions: image grids, line plots, JSON, CSV, Markdown.

Everything renders off-screen (matplotlib's Agg canvas, no display needed) and writes to
a path the caller chooses, creating parent directories. Functions return the path written.

Examples
--------
>>> print(markdown_table([{"batch": 4, "exact": 1.0}, {"batch": 16, "exact": 0.9375}]))
| batch | exact |
| ---: | ---: |
| 4 | 1 |
| 16 | 0.9375 |
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray

from spear.metrics import Matching, match, psnr

__all__ = [
    "image_grid",
    "markdown_table",
    "plot_lines",
    "to_jsonable",
    "write_csv",
    "write_json",
    "write_markdown",
]

_MISSING_GREY = 0.6  # fill of a slot with no reconstruction
_MISSING_MARK = (0.85, 0.1, 0.1)  # red cross drawn over it
_INCHES_PER_IMAGE = 0.75
_LEFT_MARGIN = 0.3  # inches, for the row labels


def _prepare(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


# --------------------------------------------------------------------------------------
# image grid


def _to_rgb(images: torch.Tensor | NDArray[Any], name: str) -> NDArray[np.float64]:
    """``(N, C, H, W)`` (C = 1 or 3) -> ``(N, H, W, 3)`` float64 clipped to ``[0, 1]``."""
    if isinstance(images, torch.Tensor):
        array = images.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must be images of shape (N, C, H, W) with C = 1 or 3 (or (N, H, W)); "
            f"found {array.shape}. Reshape flat inputs first, e.g. x.reshape(-1, 1, 28, 28)."
        )
    array = np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0)
    rgb: NDArray[np.float64] = np.repeat(array, 3 // array.shape[1], axis=1).transpose(0, 2, 3, 1)
    return rgb


def _missing_tile(height: int, width: int) -> NDArray[np.float64]:
    tile = np.full((height, width, 3), _MISSING_GREY)
    steps = np.arange(max(height, width) * 2)
    rows = (steps * (height - 1) / max(len(steps) - 1, 1)).round().astype(int)
    cols = (steps * (width - 1) / max(len(steps) - 1, 1)).round().astype(int)
    for thickness in (0, 1):
        tile[rows, np.clip(cols + thickness, 0, width - 1)] = _MISSING_MARK
        tile[rows, np.clip(width - 1 - cols - thickness, 0, width - 1)] = _MISSING_MARK
    return tile


def image_grid(
    originals: torch.Tensor | NDArray[Any],
    reconstructions: torch.Tensor | NDArray[Any],
    path: str | os.PathLike[str],
    *,
    max_columns: int = 16,
    titles: Sequence[str] | None = None,
    matching: Matching | None = None,
    captions: bool = True,
    dpi: int = 100,
) -> Path:
    """PNG of true images with their matched reconstruction directly below each.

    The ``b`` originals are laid out in row pairs of at most ``max_columns``: a row of
    originals, then the row of their reconstructions. A true image with no reconstruction
    gets a grey tile with a red cross. Values are clipped to ``[0, 1]`` (pixel space).

    Parameters
    ----------
    originals:
        ``(b, C, H, W)`` true images, C = 1 or 3 (``(b, H, W)`` is read as C = 1).
    reconstructions:
        ``(k, C, H, W)`` reconstructed images in any order; they are paired with the
        originals by :func:`spear.metrics.match` unless ``matching`` is given.
    path:
        Output file; the format follows the suffix (``.png`` recommended).
    max_columns:
        Examples per row before wrapping to a new row pair.
    titles:
        ``b`` strings shown above the originals (default: their index).
    matching:
        A precomputed pairing of ``reconstructions`` to ``originals``.
    captions:
        Show each pair's PSNR (dB, ``inf`` when exact) or ``missing`` under it.
    dpi:
        Resolution; one image is drawn about 0.75 inch wide.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    truth = _to_rgb(originals, "originals")
    rec = _to_rgb(reconstructions, "reconstructions") if len(reconstructions) else None
    count, height, width = truth.shape[:3]
    if rec is not None and rec.shape[1:] != truth.shape[1:]:
        raise ValueError(
            f"reconstructions have image shape {rec.shape[1:3]} but originals have "
            f"{truth.shape[1:3]}; they must be the same images."
        )
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles has {len(titles)} entries for {count} originals.")
    if max_columns < 1:
        raise ValueError(f"max_columns must be >= 1; found {max_columns}.")
    if matching is None:
        empty = np.zeros((0, *truth.shape[1:]))
        matching = match(rec if rec is not None else empty, truth)
    partner = {
        int(t): int(r) for r, t in zip(matching.rec_index, matching.truth_index, strict=True)
    }
    scores: dict[int, float] = {}
    if rec is not None:
        values = psnr(rec, truth, matching=matching, reduction="none")
        scores = dict(zip(matching.truth_index.tolist(), values.tolist(), strict=True))

    columns = max(1, min(max_columns, count))
    row_pairs = max(1, math.ceil(count / columns))
    pad = max(1, round(0.08 * max(height, width)))
    pixels_per_inch = max(height, width) / _INCHES_PER_IMAGE
    band = math.ceil(0.2 * pixels_per_inch)  # room for a line of text above and below a pair
    cell_h, cell_w = height + pad, width + pad
    pair_h = 2 * band + 2 * height + pad
    canvas = np.ones((row_pairs * pair_h, columns * cell_w + pad, 3))
    for index in range(count):
        pair, column = divmod(index, columns)
        top, left = pair * pair_h + band, column * cell_w + pad
        canvas[top : top + height, left : left + width] = truth[index]
        below = top + cell_h
        if index in partner and rec is not None:
            tile = rec[partner[index]]
        else:
            tile = _missing_tile(height, width)
        canvas[below : below + height, left : left + width] = tile

    figure = Figure(
        figsize=(
            canvas.shape[1] / pixels_per_inch + _LEFT_MARGIN,
            canvas.shape[0] / pixels_per_inch,
        ),
        dpi=dpi,
    )
    FigureCanvasAgg(figure)
    margin = _LEFT_MARGIN / figure.get_figwidth()
    axes = figure.add_axes((margin, 0.0, 1.0 - margin, 1.0))
    axes.imshow(canvas, interpolation="nearest", aspect="equal")
    axes.set_axis_off()
    font = 6.5
    for pair in range(row_pairs):
        top = pair * pair_h + band
        for label, offset in (("original", 0), ("reconstructed", cell_h)):
            axes.text(
                -pad,
                top + offset + height / 2,
                label,
                ha="right",
                va="center",
                fontsize=font,
                rotation=90,
            )
    for index in range(count):
        pair, column = divmod(index, columns)
        top, left = pair * pair_h + band, column * cell_w + pad
        title = titles[index] if titles is not None else str(index)
        axes.text(
            left + width / 2, top - 0.15 * pad, title, ha="center", va="bottom", fontsize=font
        )
        if captions:
            if index in partner:
                value = scores[index]
                caption = "inf dB" if math.isinf(value) else f"{value:.1f} dB"
            else:
                caption = "missing"
            axes.text(
                left + width / 2,
                top + cell_h + height + 0.15 * pad,
                caption,
                ha="center",
                va="top",
                fontsize=font,
                color="black" if index in partner else _MISSING_MARK,
            )
    target = _prepare(path)
    figure.savefig(target, dpi=dpi)
    return target


# --------------------------------------------------------------------------------------
# data files


def to_jsonable(value: Any) -> Any:
    """Convert results to plain JSON values.

    Tensors and numpy arrays become (nested) lists, numpy/torch scalars become numbers,
    dataclasses and mappings become objects (keys turned into strings), tuples and sets
    become lists, paths become strings. Non-finite floats, which strict JSON cannot hold,
    become the strings ``"inf"`` and ``"-inf"`` (an exact reconstruction's PSNR) and
    ``null`` for NaN; read them back with ``float(x)`` where a number is expected.

    Examples
    --------
    >>> to_jsonable({"psnr": float("inf"), "errors": torch.tensor([0.5, float("nan")])})
    {'psnr': 'inf', 'errors': [0.5, None]}
    """
    if isinstance(value, bool | None | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isnan(number):
            return None
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist()) if value.ndim else to_jsonable(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: to_jsonable(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return [to_jsonable(item) for item in sorted(value, key=repr)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"cannot write a {type(value).__name__} to JSON; convert it to numbers, strings, "
        "lists or dicts first."
    )


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write results as strict, indented JSON (see :func:`to_jsonable` for conversions).

    ``inf`` becomes ``"inf"``, ``nan`` becomes ``null``; the file never contains the
    non-standard ``Infinity``/``NaN`` tokens.
    """
    target = _prepare(path)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    target.write_text(text + "\n", encoding="utf-8")
    return target


def _cell(value: Any) -> str:
    """One value as table text: floats to 4 significant digits, None as empty."""
    plain = to_jsonable(value)
    if plain is None:
        return ""
    if isinstance(plain, bool):
        return str(plain).lower()
    if isinstance(plain, float):
        return f"{plain:.4g}"
    if isinstance(plain, list | dict):
        return json.dumps(plain)
    return str(plain)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def write_csv(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], append: bool = False
) -> Path:
    """Write rows (one dict each) as CSV with a header.

    Columns are the union of the rows' keys in order of first appearance; missing values
    are empty. Numbers are written in full precision (``repr``), ``inf`` as ``inf``, None
    and NaN as empty. With ``append=True`` and an existing file, rows are added under its
    header; keys it does not have are an error.
    """
    target = _prepare(path)
    columns = _columns(rows)
    exists = append and target.is_file() and target.stat().st_size > 0
    if exists:
        with target.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        extra = [name for name in columns if name not in header]
        if extra:
            raise ValueError(
                f"cannot append rows with columns {extra} to {target}, whose header is "
                f"{header}; write to a new file or drop those keys."
            )
        columns = header

    def text(value: Any) -> str:
        plain = to_jsonable(value)
        if plain is None:
            return ""
        if isinstance(plain, list | dict):
            return json.dumps(plain)
        return str(plain)

    with target.open("a" if exists else "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if not exists:
            writer.writerow(columns)
        for row in rows:
            writer.writerow([text(row.get(name)) for name in columns])
    return target


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of rows (one dict each).

    Parameters
    ----------
    rows:
        The rows; missing keys give empty cells.
    columns:
        Which keys to show, in order (default: all, in order of first appearance).

    Returns
    -------
    str
        The table without a trailing newline; numeric columns are right-aligned, floats
        shown to 4 significant digits, ``|`` in text escaped. Empty when there are no
        columns.
    """
    names = list(columns) if columns is not None else _columns(rows)
    if not names:
        return ""

    def numeric(name: str) -> bool:
        values = [row.get(name) for row in rows if row.get(name) is not None]
        return bool(values) and all(
            isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values
        )

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(escape(str(name)) for name in names) + " |",
        "| " + " | ".join("---:" if numeric(name) else "---" for name in names) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(escape(_cell(row.get(name))) for name in names) + " |")
    return "\n".join(lines)


def write_markdown(text: str, path: str | os.PathLike[str]) -> Path:
    """Write Markdown (e.g. from :func:`markdown_table`) with a trailing newline."""
    target = _prepare(path)
    target.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return target


def plot_lines(
    series: Mapping[str, tuple[Sequence[float] | NDArray[Any], Sequence[float] | NDArray[Any]]],
    path: str | os.PathLike[str],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    symlogx: float | None = None,
) -> Path:
    """A line plot of several named series (one legend entry each).

    Parameters
    ----------
    series:
        ``name -> (xs, ys)``, equal lengths. Non-finite values (e.g. ``inf`` PSNR) and, on a
        log axis, non-positive ones are left out of the line rather than breaking the plot.
    path:
        Output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
    xlabel, ylabel, title:
        Axis labels (with units) and the title.
    logy:
        Logarithmic y axis.
    symlogx:
        A symmetric-log x axis, linear within this distance of 0 (noise levels spanning
        decades, with 0 among them).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    figure = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (xs, ys) in series.items():
        x = np.asarray(xs, dtype=np.float64).reshape(-1)
        y = np.asarray(ys, dtype=np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(
                f"series {name!r} has {x.shape[0]} x values and {y.shape[0]} y values; "
                "they must pair up."
            )
        keep = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
        y = np.where(keep, y, np.nan)
        axes.plot(x, y, marker="o", markersize=3, label=name)
    if logy:
        axes.set_yscale("log")
    if symlogx is not None:
        axes.set_xscale("symlog", linthresh=symlogx)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend()
    figure.tight_layout()
    target = _prepare(path)
    figure.savefig(target)
    return target
