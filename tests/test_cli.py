"""The command line: demo end to end, attack from files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spear import client
from spear.cli import main
from spear.cli.demo import build_model, run_demo
from spear.data import builtin_images, sample_batch


def test_demo_end_to_end_small_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--batch-size", "6", "--width", "128", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "exact: 6/6" in out and "labels: 6/6" in out and "(verified)" in out
    assert (tmp_path / "grid.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exact"] == 6 and summary["verified"] is True


def test_demo_fedavg_variant() -> None:
    summary = run_demo(8, 200, 1, None, fedavg=True, epochs=2, local_batch=4, progress=False)
    assert summary["exact"] == 8 and summary["labels_correct"] == 8


def test_attack_command_from_files(tmp_path: Path) -> None:
    x, y = sample_batch(builtin_images(), 5, seed=7)
    model = build_model(160, seed=7)
    update = client.fedsgd_update(model, x, y, reduction="sum")
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    save_file({k: v.contiguous() for k, v in update.items()}, str(tmp_path / "update.safetensors"))
    out = tmp_path / "out"
    status = main(
        [
            "attack",
            "--model",
            str(tmp_path / "model.pt2"),
            "--update",
            str(tmp_path / "update.safetensors"),
            "--out",
            str(out),
        ]
    )
    assert status == 0
    report = json.loads((out / "reconstruction.json").read_text())
    assert report["found"] == 5 and report["verified"] is True
    assert sorted(report["labels"]) == sorted(y.tolist())
    assert len(list(out.glob("example_*.png"))) == 5


def test_attack_command_refuses_a_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_model(64, seed=0)
    torch.export.save(
        torch.export.export(model, (torch.zeros(2, 1, 28, 28, dtype=torch.float64),)),
        str(tmp_path / "model.pt2"),
    )
    torch.save({"0.weight": torch.zeros(3)}, tmp_path / "update.pt")
    status = main(
        [
            "attack",
            "--model",
            str(tmp_path / "model.pt2"),
            "--update",
            str(tmp_path / "update.pt"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert status == 2
    assert "safetensors" in capsys.readouterr().err


def test_attack_command_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["attack", "--model", str(tmp_path / "nope.pt2"), "--update", "u", "--out", "o"])
    assert status == 2
    assert "does not exist" in capsys.readouterr().err
