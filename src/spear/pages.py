"""Report pages: atomic file writes, a grid of reconstructed images, a self-contained HTML page.

Used by the Flower audit (:mod:`spear.flower`) and ``spear audit`` (:mod:`spear.audit`).
Pages are plain HTML with inline CSS and relative links to the PNGs beside them, so a
folder of results can be copied or served as it is.

Examples
--------
>>> print(html_table([{"round": 1, "recovered": 16}], ["round", "recovered"]))
<table>
<tr><th>round</th><th>recovered</th></tr>
<tr><td class="num">1</td><td class="num">16</td></tr>
</table>
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spear.report import to_jsonable

__all__ = [
    "html_page",
    "html_table",
    "image_tiles",
    "write_text_atomic",
]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.leak td { background: #fde8e8; }
img { max-width: 100%; image-rendering: pixelated; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.8em; color: #555; }
.note { color: #555; font-size: 0.9em; }
"""


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` to ``path`` so that a reader never sees a half-written file.

    The text goes to a temporary file in the same folder, which then replaces ``path``
    (``os.replace``); an interruption leaves the previous version in place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _cell(value: Any) -> tuple[str, bool]:
    """Table text of one value and whether it is a number (right-aligned)."""
    plain = to_jsonable(value)
    if plain is None:
        return "", False
    if isinstance(plain, bool):
        return ("yes" if plain else "no"), False
    if isinstance(plain, int):
        return str(plain), True
    if isinstance(plain, float):
        return f"{plain:.3g}", True
    if plain in ("inf", "-inf"):
        return str(plain), True
    return str(plain), False


def html_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    headers: Mapping[str, str] | None = None,
    raw: Sequence[str] = (),
    highlight: str | None = None,
) -> str:
    """An HTML table of rows (one dict each).

    Parameters
    ----------
    rows:
        The rows; missing keys give empty cells.
    columns:
        Keys to show, in order.
    headers:
        Column title per key (default: the key).
    raw:
        Keys whose values are trusted HTML (links, images) and are not escaped.
    highlight:
        A key whose truthy value marks the row (class ``leak``).

    Returns
    -------
    str
        ``<table>...</table>``; every other value is HTML-escaped.
    """
    titles = headers or {}
    lines = [
        "<table>",
        "<tr>" + "".join(f"<th>{html.escape(titles.get(c, c))}</th>" for c in columns) + "</tr>",
    ]
    for row in rows:
        cells = []
        for column in columns:
            if column in raw:
                cells.append(f"<td>{row.get(column) or ''}</td>")
                continue
            text, number = _cell(row.get(column))
            css = ' class="num"' if number else ""
            cells.append(f"<td{css}>{html.escape(text)}</td>")
        mark = ' class="leak"' if highlight is not None and row.get(highlight) else ""
        lines.append(f"<tr{mark}>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def html_page(title: str, body: Sequence[str]) -> str:
    """A complete HTML document: ``title`` as heading, then the ``body`` fragments."""
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            *body,
            "</body></html>",
            "",
        ]
    )


def _as_tiles(images: torch.Tensor) -> np.ndarray[Any, np.dtype[np.float64]]:
    """``(k, C, H, W)`` (C = 1 or 3) or ``(k, n)`` -> ``(k, H, W, 3)`` in ``[0, 1]``.

    Flat rows are drawn as the most square image their length allows (a row of a
    feature-space reconstruction has no image shape). Values are min-max scaled per image
    when they leave ``[0, 1]`` (normalised inputs), else drawn as they are.
    """
    array = images.detach().to("cpu", torch.float64).numpy()
    if array.ndim == 4 and array.shape[1] in (1, 3):
        tiles = array.transpose(0, 2, 3, 1)
    else:
        flat = array.reshape(array.shape[0], -1)
        width = next(w for w in range(math.isqrt(flat.shape[1]), 0, -1) if flat.shape[1] % w == 0)
        tiles = flat.reshape(flat.shape[0], flat.shape[1] // width, width, 1)
    tiles = np.nan_to_num(tiles, nan=0.0, posinf=1.0, neginf=0.0)
    out = np.empty((*tiles.shape[:3], 3))
    for index, tile in enumerate(tiles):
        low, high = float(tile.min()), float(tile.max())
        if low < -1e-6 or high > 1 + 1e-6:
            tile = (tile - low) / (high - low) if high > low else np.zeros_like(tile)
        out[index] = np.repeat(np.clip(tile, 0.0, 1.0), 3 // tile.shape[2], axis=2)
    return out


def image_tiles(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    captions: Sequence[str] | None = None,
    max_columns: int = 16,
    dpi: int = 100,
) -> Path:
    """PNG of reconstructed images in rows, with an optional caption under each.

    Unlike :func:`spear.report.image_grid` there are no originals (the server has none).

    Parameters
    ----------
    images:
        ``(k, C, H, W)`` with C = 1 or 3, or ``(k, n)`` flat rows; ``k >= 1``.
    path:
        Output file (PNG).
    captions:
        ``k`` short strings (for example the recovered labels).
    max_columns:
        Images per row.
    dpi:
        Resolution; one image is drawn about 0.75 inch wide.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    tiles = _as_tiles(images)
    count, height, width = tiles.shape[:3]
    if count == 0:
        raise ValueError("image_tiles needs at least one image; found none.")
    if captions is not None and len(captions) != count:
        raise ValueError(f"captions has {len(captions)} entries for {count} images.")
    columns = max(1, min(max_columns, count))
    rows = math.ceil(count / columns)
    pad = max(1, round(0.08 * max(height, width)))
    band = round(0.35 * height) if captions is not None else 0
    cell_h, cell_w = height + pad + band, width + pad
    canvas = np.ones((rows * cell_h + pad, columns * cell_w + pad, 3))
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * cell_h + pad, column * cell_w + pad
        canvas[top : top + height, left : left + width] = tiles[index]
    pixels_per_inch = max(height, width) / 0.75
    figure = Figure(
        figsize=(canvas.shape[1] / pixels_per_inch, canvas.shape[0] / pixels_per_inch), dpi=dpi
    )
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axes.imshow(canvas, interpolation="nearest", aspect="equal")
    axes.set_axis_off()
    if captions is not None:
        for index, caption in enumerate(captions):
            row, column = divmod(index, columns)
            top, left = row * cell_h + pad, column * cell_w + pad
            axes.text(
                left + width / 2,
                top + height + 0.1 * pad,
                caption,
                ha="center",
                va="top",
                fontsize=6,
            )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi)
    return target
