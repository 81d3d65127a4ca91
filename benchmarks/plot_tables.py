"""Plot exact-recovery fraction against b from tables printed by ``bench_layer.py``.

    python benchmarks/plot_tables.py OUT.png LABEL=table.md [LABEL=table.md ...]

Each table is the Markdown that ``bench_layer.py`` printed (columns b, m, exact, ...); one
line per (label, m).
"""

from __future__ import annotations

import sys
from pathlib import Path

from spear.report import plot_lines


def read_table(path: Path) -> list[tuple[int, int, float]]:
    """``(b, m, exact)`` rows of a bench_layer.py table."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            rows.append((int(cells[0]), int(cells[1]), float(cells[2])))
    return rows


def main(argv: list[str]) -> int:
    out, specs = Path(argv[0]), argv[1:]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for spec in specs:
        label, _, file = spec.partition("=")
        for b, m, exact in read_table(Path(file)):
            xs, ys = series.setdefault(f"{label}, m={m}", ([], []))
            xs.append(b)
            ys.append(exact)
    # tables may list a width's batch sizes out of order (rows appended later)
    ordered = {
        label: ([x for x, _ in pts], [y for _, y in pts])
        for label, (xs, ys) in series.items()
        for pts in [sorted(zip(xs, ys, strict=True))]
    }
    plot_lines(
        ordered,
        out,
        xlabel="batch size b",
        ylabel="exact fraction (median over seeds)",
        title="spear.invert_layer, solver='auto', 2-core CPU",
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
