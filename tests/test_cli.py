"""The command line: demo end to end, attack from files, clear errors."""

from __future__ import annotations

import importlib.metadata
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import spear
from spear import client
from spear.cli import attack_cmd, demo, main, version
from spear.cli.demo import max_batch_size, run_demo
from spear.data import builtin_images, sample_batch
from spear.errors import InputError
from spear.networks import build_model


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
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
    # copying the loaded program raises a deprecation notice inside torch: not shown
    assert not any("LeafSpec" in str(w.message) for w in caught), [str(w.message) for w in caught]
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


def _files(tmp_path: Path, batch: int, *, export_batch: int = 4, seed: int = 3) -> list[str]:
    """A model exported at ``export_batch`` and the update of a batch of ``batch``."""
    x, y = sample_batch(builtin_images(), batch, seed=seed)
    model = build_model(160, seed=seed)
    example = torch.zeros(export_batch, 1, 28, 28, dtype=torch.float64)
    torch.export.save(torch.export.export(model, (example,)), str(tmp_path / "model.pt2"))
    update = client.fedsgd_update(model, x, y, reduction="sum")
    save_file({k: v.contiguous() for k, v in update.items()}, str(tmp_path / "update.safetensors"))
    return [
        "--model",
        str(tmp_path / "model.pt2"),
        "--update",
        str(tmp_path / "update.safetensors"),
    ]


def test_attack_verbose_shows_each_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _files(tmp_path, 8)
    assert main(["attack", *files, "--out", str(tmp_path / "out"), "--verbose"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("step "))
    assert header.split() == ["step", "pooled", "found", "samples", "seconds"]
    by = next(line for line in out.splitlines() if line.startswith("examples peeled by: "))
    counts = [int(part.split()[-1]) for part in by.removeprefix("examples peeled by: ").split(",")]
    assert sum(counts) == 8


def test_attack_a_batch_other_than_the_exported_one(tmp_path: Path) -> None:
    files = _files(tmp_path, 8)  # exported at batch 4, client batch 8
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("example_000.png", "example_099.png", "grid.png"):
        (out / stale).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert main(["attack", *files, "--out", str(out)]) == 0
    report = json.loads((out / "reconstruction.json").read_text())
    assert report["found"] == 8 and report["verified"] is True
    names = sorted(p.name for p in out.glob("example_*.png"))
    assert names == [f"example_{i:03d}.png" for i in range(8)]  # example_099 removed
    assert (out / "example_000.png").read_bytes() != b"old"
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept


def test_attack_duplicates_certify_fewer_examples_than_exported(tmp_path: Path) -> None:
    x, y = sample_batch(builtin_images(), 3, seed=5)
    x, y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])  # 4 examples, 3 distinct
    model = build_model(160, seed=5)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    update = client.fedsgd_update(model, x, y, reduction="sum")
    save_file({k: v.contiguous() for k, v in update.items()}, str(tmp_path / "update.safetensors"))
    out = tmp_path / "out"
    argv = ["attack", "--model", str(tmp_path / "model.pt2")]
    assert main([*argv, "--update", str(tmp_path / "update.safetensors"), "--out", str(out)]) == 0
    report = json.loads((out / "reconstruction.json").read_text())
    assert report["found"] == 3 and report["verified"] is True  # model run on 3, not 4


def test_attack_out_naming_a_file_fails_before_the_attack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the attack ran")

    monkeypatch.setattr(spear, "attack", never)
    monkeypatch.setattr(attack_cmd, "load_model", never)
    (tmp_path / "taken").write_text("a file")
    argv = ["attack", "--model", "m.pt2", "--update", "u.safetensors"]
    assert main([*argv, "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and "--out" in err


def test_attack_folders_given_as_files_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(tmp_path, 4)
    out = str(tmp_path / "out")
    assert main(["attack", "--model", str(tmp_path), *files[2:], "--out", out]) == 2
    assert "is a directory, expected a .pt2 file" in capsys.readouterr().err
    assert main(["attack", *files[:2], "--update", str(tmp_path), "--out", out]) == 2
    assert "is a directory, expected a .safetensors file" in capsys.readouterr().err


def test_ctrl_c_during_attack_is_one_line_and_status_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(tmp_path, 4)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(spear, "attack", interrupted)
    out = tmp_path / "out"
    assert main(["attack", *files, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert not (out / "reconstruction.json").exists()


def test_ctrl_c_elsewhere_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "spear demo: interrupted\n"


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("batch_size", "expected"),
    [
        ("5000", "No width allows more than 784: use --batch-size 784 or less"),
        ("300", "Use --batch-size 255 or less, or --width 301 or more."),
    ],
)
def test_demo_refuses_a_batch_larger_than_it_supports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], batch_size: str, expected: str
) -> None:
    status = main(["demo", "--batch-size", batch_size, "--out", str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err
    assert f"a batch of {batch_size} is more than the demo supports" in err
    assert "at most 255 examples" in err and expected in err
    assert not (tmp_path / "summary.json").exists()


def test_demo_largest_batch_follows_the_width() -> None:
    assert max_batch_size(256, 1000) == 255
    assert max_batch_size(2000, 1000) == 784
    assert max_batch_size(2000, 100) == 100
    with pytest.raises(InputError, match="at most 9 examples"):
        run_demo(10, 10)
    with pytest.raises(InputError, match="batch_size must be a positive integer, found 0"):
        run_demo(0)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--batch-size", "0"],
        ["demo", "--batch-size", "-3"],
        ["demo", "--batch-size", "2.5"],
        ["demo", "--width", "0"],
        ["attack", "--model", "m", "--update", "u", "--out", "o", "--batch-size", "-1"],
    ],
)
def test_non_positive_sizes_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "expected a positive integer, found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "attack", "bench"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("inf", "found inf: a budget is required"),
        ("nan", "found nan"),
        ("-1", "found -1.0"),
        ("0", "found 0.0"),
        ("soon", "expected a number of seconds, found 'soon'"),
    ],
)
def test_time_budget_must_be_finite_and_positive(
    command: str, value: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--time-budget", value]
    if command == "attack":
        argv += ["--model", "m", "--update", "u", "--out", "o"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --time-budget" in err and expected in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"spear {version()}"
    assert re.fullmatch(r"spear \d+\.\d+\S*", out)


def test_version_falls_back_to_the_package_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version() == spear.__version__


def _interrupt_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C on the second row scan of the search (the first one has peeled examples)."""
    import spear.inversion.steps.peeling as peeling

    scan = peeling.row_candidates
    calls = []

    def interrupted(*args: object, **kwargs: object) -> int:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return scan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(peeling, "row_candidates", interrupted)


def test_ctrl_c_during_the_search_keeps_the_verified_examples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = sample_batch(builtin_images(), 16, seed=1)
    model = build_model(300, seed=1)
    update = client.fedsgd_update(model, x, y)
    _interrupt_the_search(monkeypatch)
    rec = spear.attack(model, update, time_budget=60.0)
    assert rec.interrupted and not rec.complete and not rec.verified
    assert 0 < rec.inputs.shape[0] < 16
    assert any("interrupted" in n for n in rec.notes)
    truth = x.reshape(16, -1).to(torch.float64)
    for row in rec.inputs.reshape(rec.inputs.shape[0], -1):
        assert float((truth - row).abs().amax(dim=1).min()) < 1e-8  # each one exact


def test_ctrl_c_during_attack_writes_what_was_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(tmp_path, 12)
    _interrupt_the_search(monkeypatch)
    out = tmp_path / "out"
    assert main(["attack", *files, "--out", str(out)]) == 130
    report = json.loads((out / "reconstruction.json").read_text())
    assert report["interrupted"] is True and report["verified"] is False
    assert 0 < report["found"] < 12
    assert len(list(out.glob("example_*.png"))) == report["found"]
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_attack_a_named_deeper_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--layer 3``: the second linear layer of ``784 -> 160 -> 128 -> 10``; its input
    features (160 per example) are written."""
    files = _files(tmp_path, 6)
    out = tmp_path / "out"
    argv = ["attack", *files, "--out", str(out), "--layer", "3", "--image-budget", "2"]
    assert main(argv) == 0
    assert "as asked" in capsys.readouterr().out
    from safetensors.torch import load_file

    saved = load_file(str(out / "reconstruction.safetensors"))
    assert saved["inputs"].shape == (6, 160)
    # images rebuilt from the features (estimates: 160 features for 784 pixels)
    assert saved["images"].shape == (6, 1, 28, 28)
    assert len(list(out.glob("example_*.png"))) == 6
    report = json.loads((out / "reconstruction.json").read_text())
    assert report["images"] is True and report["images_determined"] is False
    assert main([*argv[:-1], "0", "--out", str(tmp_path / "none")]) == 0
    assert "images" not in load_file(str(tmp_path / "none" / "reconstruction.safetensors"))


def test_attack_an_exported_cnn_writes_features_and_images(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from spear.data import rgb_patches
    from spear.networks import build_cnn

    model = build_cnn("flower-cnn", 0)
    x, y = sample_batch(rgb_patches(1000, seed=0), 4, seed=1)
    x = x.to(torch.float64)
    update = client.fedsgd_update(model, x, y)
    shapes = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    save_file({k: v.contiguous() for k, v in update.items()}, str(tmp_path / "update.safetensors"))
    out = tmp_path / "out"
    argv = ["attack", "--model", str(tmp_path / "model.pt2")]
    argv += ["--update", str(tmp_path / "update.safetensors"), "--out", str(out)]
    assert main([*argv, "--image-budget", "3", "--input-range", "0,1"]) == 0
    saved = load_file(str(out / "reconstruction.safetensors"))
    assert saved["inputs"].shape == (4, 400)
    with torch.no_grad():
        features = model.features(x)
    assert spear.metrics.exact_rate(saved["inputs"], features) == 1.0
    assert saved["images"].shape == (4, 3, 32, 32)
    assert float(saved["images"].min()) >= 0.0 and float(saved["images"].max()) <= 1.0
    assert len(list(out.glob("example_*.png"))) == 4


def test_cnn_demo_shows_features_and_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spear.cli.demo_cnn import print_cnn_summary, run_cnn_demo

    summary = run_cnn_demo("cnn", 2, 0, tmp_path, image_budget=3, compare=False, progress=False)
    assert summary["features_exact"] == 2 and summary["labels_correct"] == 2
    assert summary["psnr_median"] is not None and summary["baseline"] is None
    assert (tmp_path / "grid.png").stat().st_size > 1000
    print_cnn_summary(summary)
    out = capsys.readouterr().out
    assert "features exact: 2/2" in out and "image PSNR dB" in out
    with pytest.raises(InputError, match="--model"):
        run_cnn_demo("resnet", 2, 0, None)
    assert main(["demo", "--model", "cnn", "--dp"]) == 2


@pytest.mark.parametrize("value", ["0", "1,0", "a,b", "0,inf"])
def test_attack_input_range_must_be_low_comma_high(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    files = _files(tmp_path, 4)
    status = main(["attack", *files, "--out", str(tmp_path / "o"), "--input-range", value])
    assert status == 2
    assert "--input-range" in capsys.readouterr().err


def test_attack_out_that_cannot_be_created_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(attack_cmd, "load_model", never)
    (tmp_path / "afile").write_text("a file")
    argv = ["attack", "--model", "m.pt2", "--update", "u.safetensors"]
    assert main([*argv, "--out", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot be created" in err and "afile is a file, not a folder" in err


def test_attack_removes_the_out_folder_it_made_when_the_run_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(tmp_path, 4)
    out = tmp_path / "new" / "out"
    assert main(["attack", *files, "--out", str(out), "--input-shape", "3,7"]) == 2
    assert "input_shape (3, 7) has 21 entries" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value", ["99999999999999999999999", "-1", "x"])
def test_attack_seed_must_fit_torch(capsys: pytest.CaptureFixture[str], value: str) -> None:
    argv = ["attack", "--model", "m", "--update", "u", "--out", "o", "--seed", value]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "expected an integer from 0 to 2**63 - 1" in capsys.readouterr().err


def test_attack_input_shape_must_be_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(tmp_path, 4)
    assert main(["attack", *files, "--out", str(tmp_path / "o"), "--input-shape=-1,-20"]) == 2
    assert "--input-shape must be positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["auto", "binary_cross_entropy"])
def test_attack_command_on_a_one_logit_model_under_bce(tmp_path: Path, loss: str) -> None:
    x, labels = sample_batch(builtin_images(), 6, seed=3)
    y = (labels >= 5).long()
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 1)
    ).double()
    params = dict(model.named_parameters())
    bce = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y.double())
    grads = torch.autograd.grad(bce, list(params.values()))
    update = {k: g.contiguous() for k, g in zip(params, grads, strict=True)}
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    save_file(update, str(tmp_path / "update.safetensors"))
    out = tmp_path / "out"
    files = [
        "--model",
        str(tmp_path / "model.pt2"),
        "--update",
        str(tmp_path / "update.safetensors"),
    ]
    assert main(["attack", *files, "--out", str(out), "--loss", loss]) == 0
    report = json.loads((out / "reconstruction.json").read_text())
    assert report["found"] == 6 and report["verified"] is True
    assert sorted(report["labels"]) == sorted(y.tolist())
