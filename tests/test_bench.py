"""Tests for spear.bench and ``spear bench``: a tiny sweep, resume, aggregation, errors."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

import spear.bench as bench
from spear.bench import (
    KEY_FIELDS,
    METRIC_FIELDS,
    BenchConfig,
    case_key,
    plan_cases,
    read_results,
    run_bench,
)
from spear.cli import main
from spear.errors import InputError

TINY = BenchConfig(
    batch_sizes=(2, 4),
    widths=(64,),
    attacks=("spear", "analytic"),
    dp_sweep=(),
    clients_sweep=(),
    time_budget=10.0,
)


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bench.BenchResult]:
    out = tmp_path_factory.mktemp("bench")
    return out, run_bench(TINY, out, progress=False)


def test_tiny_sweep_writes_csv_markdown_plots_and_grids(
    tiny_run: tuple[Path, bench.BenchResult],
) -> None:
    out, result = tiny_run
    header, rows = _csv_rows(out / "results.csv")
    assert header == [*KEY_FIELDS, *METRIC_FIELDS]
    assert [(r["batch_size"], r["attack"]) for r in rows] == [
        ("2", "spear"),
        ("2", "analytic"),
        ("4", "spear"),
        ("4", "analytic"),
    ]
    assert result.ran == 4 and result.skipped == 0
    for row in rows:
        assert row["width"] == "64" and row["depth"] == "2" and row["seed"] == "0"
        assert row["data"] == "builtin" and row["clients"] == "1" and row["error"] == ""
        assert float(row["seconds"]) >= 0
    spear_rows = [r for r in rows if r["attack"] == "spear"]
    for row in spear_rows:  # exact: every example found, PSNR written as inf or huge
        assert float(row["exact_rate"]) == 1.0 and float(row["found_rate"]) == 1.0
        assert row["b_found"] == row["batch_size"]
        assert float(row["label_accuracy"]) == 1.0 and float(row["certificate"]) < 1e-8
        assert row["psnr_mean"] == "inf" or float(row["psnr_mean"]) > 100
    analytic = [r for r in rows if r["attack"] == "analytic"]
    assert all(r["found"] == "1" and float(r["exact_rate"]) < 1.0 for r in analytic)

    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "| attack | batch_size |" in markdown and markdown.count("| spear |") == 2
    assert result.table in markdown
    for name in ("exact_vs_b.png", "time_vs_b.png", "psnr_vs_noise.png"):
        assert (out / name).stat().st_size > 1000
    for name in ("grid_spear_b2.png", "grid_analytic_b2.png"):
        assert (out / name).stat().st_size > 1000
    assert not (out / "grid_spear_b4.png").exists()  # only the first case gets a grid
    parsed = read_results(out / "results.csv")
    assert parsed[0]["batch_size"] == 2 and isinstance(parsed[0]["seconds"], float)


def test_resume_skips_cases_already_in_the_csv(
    tiny_run: tuple[Path, bench.BenchResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, _ = tiny_run
    out = tmp_path / "resume"
    out.mkdir()
    header, rows = _csv_rows(source / "results.csv")
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows[:3])  # an interrupted sweep: the last case is missing
    calls: list[str] = []
    real = bench._run_case

    def counting(case: bench.Case, *args: Any) -> Any:
        calls.append(case.attack)
        return real(case, *args)

    monkeypatch.setattr(bench, "_run_case", counting)
    result = run_bench(TINY, out, progress=False)
    assert calls == ["analytic"] and result.ran == 1 and result.skipped == 3
    # run again through the command line: nothing left to do, no duplicate rows
    argv = ["bench", "--batch-sizes", "2,4", "--widths", "64", "--attacks", "spear,analytic"]
    argv += ["--dp-sweep", "none", "--clients-sweep", "none", "--time-budget", "10"]
    assert main([*argv, "--out", str(out)]) == 0
    assert calls == ["analytic"]
    _, after = _csv_rows(out / "results.csv")
    assert len(after) == 4 and len({case_key(r) for r in after}) == 4
    printed = capsys.readouterr().out
    assert "| spear |" in printed and "0 case(s) run, 4 already in" in printed


def test_secure_aggregation_of_two_clients_is_one_batch_for_spear(tmp_path: Path) -> None:
    config = BenchConfig(
        batch_sizes=(4,),
        widths=(64,),
        clients=(2,),
        attacks=("spear",),
        dp_sweep=(),
        clients_sweep=(),
        time_budget=10.0,
    )
    result = run_bench(config, tmp_path, progress=False)
    (row,) = result.rows
    assert row["clients"] == 2 and row["batch_size"] == 4
    assert row["b_found"] == 4 and row["exact_rate"] == 1.0  # 2 + 2 images, all exact


def test_default_plan_has_main_grid_dp_and_client_sweeps() -> None:
    cases = plan_cases(BenchConfig())
    described = [(c.batch_size, c.dp_noise, c.clients, c.attack, c.sweep) for c in cases]
    assert described == [
        (8, 0.0, 1, "spear", "main"),
        (8, 0.0, 1, "gradient-matching", "main"),
        (16, 0.0, 1, "spear", "main"),
        (16, 0.0, 1, "gradient-matching", "main"),
        *[
            (8, noise, 1, attack, "dp")  # noise 0: DP-SGD with clipping only
            for noise in (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)
            for attack in ("spear", "gradient-matching")
        ],
        (8, 0.0, 2, "spear", "clients"),
        (8, 0.0, 2, "gradient-matching", "clients"),
    ]
    assert all(c.dp_clip == (1.0 if c.sweep == "dp" else None) for c in cases)
    assert all(c.width == 256 and c.depth == 2 and c.seed == 0 for c in cases)


def test_plan_leaves_out_dp_with_local_steps() -> None:
    config = BenchConfig(
        batch_sizes=(4,), local_steps=(0, 2), dp_noise=(0.0, 0.1), attacks=("spear",)
    )
    cases = plan_cases(config)
    described = {(c.local_steps, c.dp_noise, c.dp_clip, c.clients) for c in cases}
    assert described == {
        (0, 0.0, None, 1),
        (2, 0.0, None, 1),  # FedAvg without DP; (2, 0.1) is left out
        (0, 0.1, 1.0, 1),
        (0, 0.0, 1.0, 1),  # DP sweep: clipping only
        (0, 1e-5, 1.0, 1),
        (0, 1e-4, 1.0, 1),
        (0, 1e-3, 1.0, 1),
        (0, 0.01, 1.0, 1),
        (0, 0.0, None, 2),  # clients sweep
    }
    assert len(cases) == len({case_key(c) for c in cases}) == 9


def test_bad_attack_name_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InputError, match=r"unknown attack 'nope'.*gradient-matching.*spear"):
        plan_cases(BenchConfig(attacks=("spear", "nope")))
    status = main(["bench", "--attacks", "spear,nope", "--out", str(tmp_path / "x")])
    assert status == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written before the check


def test_too_many_clients_for_the_batch_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="3 clients cannot share a batch of 2"):
        plan_cases(BenchConfig(batch_sizes=(2,), clients=(3,), clients_sweep=(), dp_sweep=()))


def test_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--batch-sizes",
        "--widths",
        "--depths",
        "--trained",
        "--local-steps",
        "--dp-noise",
        "--clients",
        "--seeds",
        "--attacks",
        "--data",
        "--out",
        "--time-budget",
        "continue",
    ):
        assert option in text


def test_ctrl_c_keeps_the_rows_measured_so_far(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = bench._run_case
    calls: list[str] = []

    def interrupted_second(case: bench.Case, *args: Any) -> Any:
        calls.append(case.attack)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case, *args)

    monkeypatch.setattr(bench, "_run_case", interrupted_second)
    out = tmp_path / "out"
    argv = ["bench", "--batch-sizes", "2,4", "--widths", "64", "--attacks", "analytic"]
    argv += ["--dp-sweep", "none", "--clients-sweep", "none", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "interrupted; 1 case(s) measured so far" in err and "results.csv" in err
    rows = read_results(out / "results.csv")
    assert len(rows) == 1 and rows[0]["batch_size"] == 2
    # the same command continues the sweep
    monkeypatch.setattr(bench, "_run_case", real)
    assert main(argv) == 0
    assert [row["batch_size"] for row in read_results(out / "results.csv")] == [2, 4]


def test_out_naming_a_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").write_text("a file")
    assert main(["bench", "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
