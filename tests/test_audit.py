"""spear.audit and ``spear audit``: simulated clients, measured leakage, one report page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from spear import client
from spear.audit import (
    KEY_FIELDS,
    METRIC_FIELDS,
    AuditConfig,
    ModelSpec,
    Setting,
    _dp_gradients,
    conclusions,
    load_audit_data,
    run_audit,
    run_setting,
    simulate_client,
)
from spear.bench import read_results
from spear.cli import main
from spear.data import builtin_images
from spear.errors import InputError
from spear.imagefolder import load_image_folder

TINY = AuditConfig(
    model=ModelSpec(width=64, dtype="float64"),
    batch_size=4,
    lr=0.05,
    clients=(1, 2),
    dp_noise=(0.0, 0.1),
    secure_aggregation=True,
    # the exhaustive step of a b = 4 attack on 784 -> 64 takes 1.5-2 s on a 2-core
    # machine: a budget with room, since speed is measured by the benchmarks, not here
    time_budget=10.0,
)


def _mlp(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10)
    ).double()


def test_one_full_batch_step_is_minus_lr_times_the_gradient() -> None:
    data = builtin_images(8)
    x, y = data.images[:6], data.labels[:6]
    model = _mlp()
    config = AuditConfig(batch_size=6, lr=0.1)
    delta = simulate_client(model, x, y, config, 0.0, seed=0)
    gradient = client.fedsgd_update(model, x, y)
    for name, value in delta.items():
        torch.testing.assert_close(value, -0.1 * gradient[name], rtol=1e-9, atol=1e-12)


def test_dp_step_clips_like_opacus() -> None:
    data = builtin_images(8)
    x, y = data.images[:5], data.labels[:5]
    model = _mlp()
    config = AuditConfig(batch_size=5, dp_clip=0.05)
    params = list(model.parameters())
    ours = _dp_gradients(model, params, x, y, config, 0.0, torch.Generator().manual_seed(0))
    opacus = client.dp_sgd_update(model, x, y, max_grad_norm=0.05, noise_multiplier=0.0)
    for mine, (name, theirs) in zip(ours, opacus.update.items(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-12, msg=name)
    noisy = _dp_gradients(model, params, x, y, config, 1.0, torch.Generator().manual_seed(0))
    spread = float(torch.cat([(n - c).flatten() for n, c in zip(noisy, ours, strict=True)]).std())
    assert spread == pytest.approx(0.05 / 5, rel=0.05)  # sigma * C / batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("audit")
    return out, run_audit(TINY, out, progress=False, log=lambda _: None)


def test_tiny_audit_measures_every_setting(tiny: tuple[Path, object]) -> None:
    out, _ = tiny
    rows = read_results(out / "results.csv")
    assert [(r["clients"], r["dp_noise"]) for r in rows] == [(1, 0.0), (2, 0.0), (1, 0.1), (2, 0.1)]
    assert list(rows[0]) == [*KEY_FIELDS, *METRIC_FIELDS]
    by = {(r["clients"], r["dp_noise"]): r for r in rows}
    exact = by[(1, 0.0)]
    assert exact["examples"] == 4 and exact["exact"] == 4 and exact["exact_rate"] == 1.0
    assert exact["label_accuracy"] == 1.0 and exact["epsilon"] is None
    assert exact["updates"] == 1 and exact["b_found"] == 4  # the sum is one update
    assert by[(2, 0.0)]["examples"] == 8 and by[(2, 0.0)]["updates"] == 1
    for noise_row in (by[(1, 0.1)], by[(2, 0.1)]):
        assert noise_row["exact"] == 0 and noise_row["recovered"] == 0
        one_step = client.dp_epsilon(noise_multiplier=0.1, sample_rate=1.0, steps=1, delta=1e-5)
        assert noise_row["epsilon"] == pytest.approx(one_step) and one_step > 50
        assert noise_row["psnr_mean"] < 40  # a best estimate, far from the images
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["secure_aggregation"] is True
    assert len(report["rows"]) == 4 and report["conclusions"]["leaks"] is True
    lines = report["conclusions"]["lines"]
    assert "1 client(s): noise 0 leaked; from 0.1 on nothing was recovered exactly." in lines
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "leak_vs_clients.png" in page and "leak_vs_noise.png" in page
    assert page.count("<figure>") == 4 and "Does this setting leak?" in page
    for name in ("leak_vs_clients.png", "leak_vs_noise.png", "grid_clients1_noise0.png"):
        assert (out / name).stat().st_size > 1000


def test_an_audit_resumes_where_it_stopped(tiny: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = tiny
    again = run_audit(TINY, out, progress=False)
    assert again.ran == 0 and again.skipped == 4 and len(again.rows) == 4
    more = AuditConfig(**{**TINY.__dict__, "clients": (1, 2, 3), "dp_noise": (0.0,)})
    grown = run_audit(more, out, progress=False)
    assert grown.ran == 1 and grown.skipped == 2  # only (3, 0.0) is new
    assert [r["clients"] for r in grown.rows] == [1, 2, 3]


def test_conclusions_come_from_the_rows() -> None:
    rows = [
        {"clients": 1, "dp_noise": 0.0, "exact": 8},
        {"clients": 4, "dp_noise": 0.0, "exact": 3},
        {"clients": 16, "dp_noise": 0.0, "exact": 0},
        {"clients": 1, "dp_noise": 1e-4, "exact": 0},
        {"clients": 4, "dp_noise": 1e-4, "exact": 0},
        {"clients": 16, "dp_noise": 1e-4, "exact": 0},
    ]
    found = conclusions(rows)
    assert found["smallest_clients"] == [
        {"dp_noise": 0.0, "clients": 16, "holds_above": True},
        {"dp_noise": 1e-4, "clients": 1, "holds_above": True},
    ]
    assert found["smallest_noise"][0] == {"clients": 1, "dp_noise": 1e-4, "holds_above": True}
    assert (
        "noise 0: client count 1, 4 leaked; from 16 on nothing was recovered exactly."
        in (found["lines"])
    )
    assert conclusions([{"clients": 1, "dp_noise": 0.0, "exact": 2}])["lines"][0] == (
        "noise 0: examples were recovered exactly at every client count tried (1)."
    )


def test_without_secure_aggregation_every_client_is_attacked() -> None:
    config = AuditConfig(
        model=ModelSpec(width=64, dtype="float64"), batch_size=3, lr=0.05, time_budget=2.0
    )
    output = run_setting(config, Setting(2, 0.0))
    assert output.row["updates"] == 2 and output.row["examples"] == 6
    assert output.row["exact"] == 6 and output.row["b_found"] == 6
    assert output.reconstructions is not None and output.reconstructions.shape[0] == 6


def test_settings_that_cannot_run_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="need 2000 distinct images"):
        run_setting(AuditConfig(batch_size=1000), Setting(2, 0.0))
    with pytest.raises(InputError, match="clients must be integers >= 1"):
        AuditConfig(clients=(0,))
    with pytest.raises(InputError, match="dp_noise must be finite"):
        AuditConfig(dp_noise=(-1.0,))


def test_image_folder_and_npz(tmp_path: Path) -> None:
    data = builtin_images(6)
    for index in range(6):
        folder = tmp_path / "images" / ("shirt" if index % 2 else "shoe")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(data.images[index, 0].numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    loaded = load_image_folder(tmp_path / "images")
    assert tuple(loaded.images.shape) == (6, 1, 28, 28) and loaded.num_classes == 2
    assert loaded.labels.tolist() == [0, 0, 0, 1, 1, 1]  # shirt, then shoe (sorted)
    expected = (data.images * 255).round() / 255  # PNG keeps the 8-bit pixels exactly
    torch.testing.assert_close(loaded.images, expected[[1, 3, 5, 0, 2, 4]], rtol=0, atol=1e-12)
    assert load_audit_data(str(tmp_path / "images")).name == "images"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "images" / "shoe" / "odd.png")
    with pytest.raises(InputError, match="every image must have the same size"):
        load_image_folder(tmp_path / "images")
    np.savez(
        tmp_path / "d.npz",
        images=(data.images[:, 0].numpy() * 255).astype(np.uint8),
        labels=data.labels.numpy(),
    )
    assert len(load_audit_data(str(tmp_path / "d.npz"))) == 6
    with pytest.raises(InputError, match=r"neither 'builtin', a \.npz file nor a folder"):
        load_audit_data(str(tmp_path / "nothing.txt"))


def test_cli_audit_with_an_exported_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _mlp(64)
    example = torch.zeros(2, 1, 28, 28, dtype=torch.float64)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    out = tmp_path / "report"
    argv = ["audit", "--model", str(tmp_path / "model.pt2"), "--batch-size", "4"]
    argv += ["--lr", "0.05", "--clients", "1,2", "--time-budget", "5", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "noise 0: examples were recovered exactly at every client count tried (1, 2)." in printed
    rows = read_results(out / "results.csv")
    assert [r["exact"] for r in rows] == [4, 8] and rows[0]["model"] == "model.pt2"
    assert (out / "report.html").is_file()


def test_cli_audit_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(100, 8), nn.ReLU(), nn.Linear(8, 10))
    program = torch.export.export(wrong, (torch.zeros(2, 1, 10, 10),))
    torch.export.save(program, str(tmp_path / "wrong.pt2"))
    argv = ["audit", "--model", str(tmp_path / "wrong.pt2"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "cannot take the data's images of shape (1, 28, 28)" in capsys.readouterr().err
    assert main(["audit", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
