"""Tests for spear.report: grids, plots and tables that a reader can open."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from spear.data import builtin_images, rgb_patches
from spear.metrics import Matching, match
from spear.report import (
    image_grid,
    markdown_table,
    plot_lines,
    to_jsonable,
    write_csv,
    write_json,
    write_markdown,
)

RED = np.array([0.85, 0.1, 0.1])


def _has_colour(pixels: np.ndarray, colour: np.ndarray, tol: float = 0.05) -> bool:
    return bool((np.abs(pixels[..., :3] - colour).max(axis=-1) < tol).any())


def test_image_grid_gray_with_missing_and_wrapping(tmp_path: Path) -> None:
    truth = builtin_images(10).images
    rec = truth[[3, 1, 0, 2, 5, 4, 6]]  # 7 of 10, shuffled
    path = image_grid(truth, rec, tmp_path / "sub" / "grid.png", max_columns=4)
    assert path == tmp_path / "sub" / "grid.png" and path.is_file()
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100
    assert _has_colour(pixels, RED)  # the missing marks
    complete = imread(image_grid(truth, truth.flip(0), tmp_path / "full.png", max_columns=4))
    assert not _has_colour(complete, RED)
    single_row = imread(image_grid(truth, rec, tmp_path / "wide.png", max_columns=16))
    # 3 row pairs are taller and narrower than 1
    assert pixels.shape[0] > 2 * single_row.shape[0]
    assert pixels.shape[1] < single_row.shape[1]


def test_image_grid_places_each_match_under_its_original(tmp_path: Path) -> None:
    # a black and a white original, reconstructions in the other order
    truth = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)]).double()
    rec = truth.flip(0)

    def black_in_darkest_column(matching: Matching | None, name: str) -> int:
        grid = imread(image_grid(truth, rec, tmp_path / name, captions=False, matching=matching))
        black = grid[..., :3].mean(-1) < 0.1
        return int(black.sum(axis=0).max())

    right = black_in_darkest_column(None, "right.png")
    wrong = black_in_darkest_column(match(rec.flip(0), truth), "wrong.png")  # white under black
    assert wrong > 10
    assert right == pytest.approx(2 * wrong, rel=0.1)


def test_image_grid_rgb_clips_and_validates(tmp_path: Path) -> None:
    truth = rgb_patches(3, size=16).images
    rec = truth * 3.0 - 1.0  # out of range: clipped, not an error
    assert image_grid(truth, rec, tmp_path / "rgb.png").is_file()
    assert image_grid(truth, torch.zeros(0, 3, 16, 16), tmp_path / "none.png").is_file()
    with pytest.raises(ValueError, match="C = 1 or 3"):
        image_grid(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="same images"):
        image_grid(truth, torch.zeros(2, 3, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="titles"):
        image_grid(truth, rec, tmp_path / "x.png", titles=["only one"])
    precomputed = match(truth[:1], truth)
    assert image_grid(truth, truth[:1], tmp_path / "m.png", matching=precomputed).is_file()


@dataclass
class _Record:
    name: str
    errors: torch.Tensor
    psnr: float


def test_write_json_is_strict_and_converts(tmp_path: Path) -> None:
    record = _Record("run", torch.tensor([0.5, float("nan")]), math.inf)
    payload = {
        "record": record,
        "array": np.arange(3, dtype=np.int64),
        "scalar": np.float32(0.25),
        "flag": np.bool_(True),
        "shape": (1, 28, 28),
        "path": tmp_path,
        1: -math.inf,
    }
    path = write_json(payload, tmp_path / "out" / "r.json")
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    loaded = json.loads(text, parse_constant=refuse)
    assert loaded["record"] == {"name": "run", "errors": [0.5, None], "psnr": "inf"}
    assert loaded["array"] == [0, 1, 2] and loaded["scalar"] == 0.25 and loaded["flag"] is True
    assert loaded["shape"] == [1, 28, 28] and loaded["path"] == str(tmp_path)
    assert loaded["1"] == "-inf"
    assert to_jsonable(torch.tensor(3)) == 3
    with pytest.raises(TypeError, match="cannot write a object"):
        write_json({"x": object()}, tmp_path / "bad.json")


def test_write_csv_and_append(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_csv([{"b": 4, "psnr": math.inf}, {"b": 8, "note": "a,b"}], path)
    write_csv([{"b": 16, "psnr": 0.1 + 0.2}], path, append=True)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["b"] for row in rows] == ["4", "8", "16"]
    assert rows[0]["psnr"] == "inf" and float(rows[0]["psnr"]) == math.inf
    assert rows[1]["note"] == "a,b" and rows[1]["psnr"] == ""
    assert float(rows[2]["psnr"]) == 0.1 + 0.2  # full precision
    with pytest.raises(ValueError, match="header"):
        write_csv([{"new": 1}], path, append=True)
    write_csv([{"x": 1}], path)  # no append: overwritten
    assert path.read_text().splitlines() == ["x", "1"]


def test_markdown_table() -> None:
    rows = [
        {"method": "spear", "exact": 1.0, "psnr": math.inf},
        {"method": "a|b", "exact": 0.123456, "time_s": 2},
    ]
    expected = "\n".join(
        [
            "| method | exact | psnr |",
            "| --- | ---: | ---: |",
            "| spear | 1 | inf |",
            "| a\\|b | 0.1235 |  |",
        ]
    )
    assert markdown_table(rows, columns=["method", "exact", "psnr"]) == expected
    assert markdown_table(rows).splitlines()[0] == "| method | exact | psnr | time_s |"
    assert markdown_table([]) == ""


def test_write_markdown_and_plot_lines(tmp_path: Path) -> None:
    md = write_markdown("| a |\n| --- |\n| 1 |", tmp_path / "t.md")
    assert md.read_text().endswith("| 1 |\n")
    series: dict[str, tuple[Any, Any]] = {
        "spear": ([1, 2, 4, 8], [1e-12, 1e-10, math.inf, 1e-3]),
        "baseline": (np.arange(4), np.array([0.1, 0.2, 0.0, 0.4])),
    }
    path = plot_lines(series, tmp_path / "p" / "err.png", "batch size", "error", "t", logy=True)
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.01
    assert plot_lines({}, tmp_path / "empty.png", "x", "y", "t").is_file()
    with pytest.raises(ValueError, match="pair up"):
        plot_lines({"bad": ([1, 2], [1])}, tmp_path / "bad.png", "x", "y", "t")
