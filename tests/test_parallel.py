"""Sweeps as Ray tasks: a local Ray with two CPUs gives the CSV a serial run gives."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

import spear.parallel as parallel  # noqa: E402
from spear.bench import KEY_FIELDS, METRIC_FIELDS, BenchConfig, case_key, run_bench  # noqa: E402
from spear.cli import main  # noqa: E402

SWEEP = BenchConfig(
    batch_sizes=(2, 4),
    widths=(64,),
    attacks=("spear", "analytic"),
    dp_sweep=(),
    clients_sweep=(2,),
    time_budget=10.0,
)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One Ray instance with two CPUs for the module (runs reuse a Ray already started)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _rows(path: Path) -> tuple[list[str], dict[tuple[str, ...], dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    return list(reader.fieldnames or []), {case_key(row): row for row in rows}


def _same(name: str, a: str, b: str) -> bool:
    """Equal CSV cells; floats to 1e-6, and roundoff-sized numbers of exact runs alike."""
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if name.startswith("psnr") and min(x, y) > 200:  # exact: float64 roundoff either way
        return True
    if name == "certificate" and max(x, y) < 1e-12:
        return True
    return math.isclose(x, y, rel_tol=1e-6)


def test_parallel_and_serial_sweeps_agree(tmp_path: Path, local_ray: None) -> None:
    serial = run_bench(SWEEP, tmp_path / "serial", progress=False)
    parallel_run = run_bench(
        SWEEP, tmp_path / "ray", progress=False, ray=parallel.LOCAL, ray_cpus=2
    )
    assert serial.ran == parallel_run.ran == 6
    header_s, rows_s = _rows(tmp_path / "serial" / "results.csv")
    header_r, rows_r = _rows(tmp_path / "ray" / "results.csv")
    assert header_s == header_r == [*KEY_FIELDS, *METRIC_FIELDS]
    assert set(rows_s) == set(rows_r) and len(rows_r) == 6
    for key, row in rows_s.items():
        other = rows_r[key]
        differ = [n for n in METRIC_FIELDS if n != "seconds" and not _same(n, row[n], other[n])]
        assert not differ, (key, [(n, row[n], other[n]) for n in differ])
    assert all(r["error"] == "" for r in rows_r.values())
    assert {r["exact_rate"] for k, r in rows_r.items() if r["attack"] == "spear"} == {"1.0"}
    for name in ("grid_spear_b2.png", "grid_analytic_b2.png", "results.md", "exact_vs_b.png"):
        assert (tmp_path / "ray" / name).stat().st_size > 500
    again = run_bench(SWEEP, tmp_path / "ray", progress=False, ray=parallel.LOCAL, ray_cpus=2)
    assert again.ran == 0 and again.skipped == 6  # resumable as a serial sweep


def test_a_failed_task_is_a_result_not_a_lost_sweep(local_ray: None) -> None:
    import json

    def failed(item: str, error: BaseException) -> str:
        return parallel.describe_error(error)

    results = dict(parallel.ray_map(json.loads, ["4", "not json", "[9]"], on_error=failed))
    assert results[0] == 4 and results[2] == [9]
    assert results[1] == "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"


def test_failed_cases_become_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A case whose task dies is written as a row with its error; the others run."""
    import spear.bench as bench

    def one_task_dies(fn: Any, items: Any, *, address: str, cpus: Any, on_error: Any) -> Any:
        for number, item in enumerate(items):
            if number == 1:
                yield number, on_error(item, RuntimeError("worker died"))
            else:
                yield number, fn(item)

    monkeypatch.setattr(parallel, "ray_map", one_task_dies)
    config = BenchConfig(
        batch_sizes=(2,),
        widths=(32,),
        attacks=("spear", "analytic"),
        dp_sweep=(),
        clients_sweep=(),
        time_budget=5.0,
    )
    result = bench.run_bench(
        config, tmp_path, progress=False, ray=parallel.LOCAL, log=lambda _: None
    )
    _, rows = _rows(tmp_path / "results.csv")
    assert result.ran == 2 and len(rows) == 2
    errors = sorted(row["error"] for row in rows.values())
    assert errors == ["", "Ray task failed: RuntimeError: worker died"]


def test_cli_ray_option(
    tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    args = ["bench", "--batch-sizes", "2", "--widths", "32", "--attacks", "spear"]
    args += ["--dp-sweep", "none", "--clients-sweep", "none", "--out", str(out), "--ray"]
    assert main(args) == 0
    assert "1 case(s) run" in capsys.readouterr().out
    _, rows = _rows(out / "results.csv")
    assert [row["exact_rate"] for row in rows.values()] == ["1.0"]


def test_ray_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from spear.errors import InputError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match=r'pip install "spear\[ray\]"'):
        parallel.import_ray()


def test_audit_on_ray_agrees_with_serial(tmp_path: Path, local_ray: None) -> None:
    from spear.audit import AuditConfig, ModelSpec, run_audit

    config = AuditConfig(
        model=ModelSpec(width=64, dtype="float64"),
        batch_size=4,
        lr=0.05,
        clients=(1, 2),
        secure_aggregation=True,
        time_budget=5.0,
    )
    serial = run_audit(config, tmp_path / "serial", progress=False)
    on_ray = run_audit(config, tmp_path / "ray", progress=False, ray=parallel.LOCAL, ray_cpus=2)
    assert on_ray.ran == 2
    shown = ("clients", "examples", "exact", "b_found", "recovered", "label_accuracy", "error")
    assert [{k: r[k] for k in shown} for r in on_ray.rows] == [
        {k: r[k] for k in shown} for r in serial.rows
    ]
    assert (tmp_path / "ray" / "grid_clients1_noise0.png").stat().st_size > 1000
