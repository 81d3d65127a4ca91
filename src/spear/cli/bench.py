"""``spear bench``: sweep attacks over client settings; CSV, Markdown table, plots, grids."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from spear import validate
from spear.bench import BENCH_ATTACKS, DATASETS, BenchConfig, read_results, run_bench
from spear.files import check_output_folder
from spear.parallel import LOCAL

__all__ = ["add_parser", "add_ray_arguments", "run"]

_T = TypeVar("_T")
_DEFAULT = BenchConfig()


def _comma_list(kind: Callable[[str], _T], name: str, allow_empty: bool = False) -> Any:
    """argparse type: ``"8,16"`` -> ``(8, 16)``; ``"none"`` -> ``()`` when allowed."""

    def parse(text: str) -> tuple[_T, ...]:
        if allow_empty and text.strip().lower() in ("", "none"):
            return ()
        try:
            values = tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {name}, e.g. 8,16; found {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {name}; found {text!r}")
        return values

    return parse


def _show(values: tuple[Any, ...]) -> str:
    return ",".join(str(v) for v in values) if values else "none"


def add_parser(sub: Any) -> None:
    """Register the ``bench`` sub-command."""
    d = _DEFAULT
    p = sub.add_parser(
        "bench",
        help="sweep attacks over batch sizes, widths, training, FedAvg, DP and clients",
        description=(
            "Simulate clients on real images and attack their updates, for every case of a "
            "sweep: the product of the comma lists below (the main grid), plus a DP-noise "
            "sweep for spear and a secure-aggregation sweep, both at the smallest batch size "
            "and the first value of every other list. One row per case is appended to "
            "OUT/results.csv as soon as it finishes; run the same command again to continue "
            "an interrupted sweep (cases already in the CSV are skipped). At the end: "
            "OUT/results.md (medians over seeds, also printed), exact_vs_b.png, "
            "time_vs_b.png, psnr_vs_noise.png and grid_<attack>_b<b>.png for the first case "
            "(originals on top). The defaults finish in a few minutes on a 2-core CPU."
        ),
    )
    ints = _comma_list(int, "integers")
    floats = _comma_list(float, "numbers")
    p.add_argument(
        "--attacks",
        type=_comma_list(str, "attack names"),
        default=d.attacks,
        help=f"attacks to run, of {', '.join(sorted(BENCH_ATTACKS))} ({_show(d.attacks)})",
    )
    p.add_argument(
        "--data",
        choices=DATASETS,
        default=d.data,
        help="builtin: 1000 shipped Fashion-MNIST images; fashion-mnist: local IDX files "
        "(apt-get install dataset-fashion-mnist, or $SPEAR_DATA_DIR); rgb: 32x32 RGB photo "
        f"patches ({d.data})",
    )
    p.add_argument(
        "--batch-sizes",
        type=ints,
        default=d.batch_sizes,
        help=f"b, images per round, summed over the clients ({_show(d.batch_sizes)})",
    )
    p.add_argument(
        "--widths", type=ints, default=d.widths, help=f"first-layer widths ({_show(d.widths)})"
    )
    p.add_argument(
        "--depths",
        type=ints,
        default=d.depths,
        help=f"hidden Linear+ReLU layers; those after the first have 128 units ({_show(d.depths)})",
    )
    p.add_argument(
        "--trained",
        type=ints,
        default=d.trained,
        help=f"SGD steps of pre-training on other images, 0 = untrained ({_show(d.trained)})",
    )
    p.add_argument(
        "--local-steps",
        type=ints,
        default=d.local_steps,
        help="FedAvg full-batch local steps, 0 = FedSGD (client sends its gradient) "
        f"({_show(d.local_steps)})",
    )
    p.add_argument(
        "--dp-noise",
        type=floats,
        default=d.dp_noise,
        help="DP-SGD noise multipliers, 0 = no DP-SGD; never combined with local steps "
        f"({_show(d.dp_noise)})",
    )
    p.add_argument(
        "--dp-clip",
        type=float,
        default=d.dp_clip,
        help=f"DP-SGD per-example clipping norm ({d.dp_clip})",
    )
    p.add_argument(
        "--clients",
        type=ints,
        default=d.clients,
        help="clients summed by secure aggregation, each with its own share of the b "
        f"images ({_show(d.clients)})",
    )
    p.add_argument(
        "--seeds", type=int, default=d.seeds, help=f"number of seeds, 0..N-1 ({d.seeds})"
    )
    p.add_argument(
        "--dp-sweep",
        type=_comma_list(float, "numbers", allow_empty=True),
        default=d.dp_sweep,
        help="extra DP-SGD noise multipliers for every attack at the smallest b, clipped at "
        "--dp-clip (0 = clipping only); 'none' to skip "
        f"({_show(d.dp_sweep)})",
    )
    p.add_argument(
        "--clients-sweep",
        type=_comma_list(int, "integers", allow_empty=True),
        default=d.clients_sweep,
        help="extra client counts at the smallest b, every attack; 'none' to skip "
        f"({_show(d.clients_sweep)})",
    )
    p.add_argument(
        "--time-budget",
        type=validate.time_budget_arg,
        default=d.time_budget,
        help=f"seconds per attack run ({d.time_budget})",
    )
    p.add_argument(
        "--gm-iterations",
        type=int,
        default=d.gm_iterations,
        help=f"Adam steps of gradient-matching and breaching-ig ({d.gm_iterations})",
    )
    p.add_argument(
        "--lr", type=float, default=d.client_lr, help=f"FedAvg local learning rate ({d.client_lr})"
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (bench-out)")
    add_ray_arguments(p)
    p.set_defaults(run=run)


def add_ray_arguments(p: Any) -> None:
    """``--ray [ADDRESS]`` and ``--ray-cpus`` (shared with ``spear audit``)."""
    p.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        default=None,
        metavar="ADDRESS",
        help="run the cases as Ray tasks (pip install 'spear[ray]'): alone, on a Ray started "
        "for this run; 'auto' or ray://HOST:10001 for a running cluster whose nodes have "
        "spear installed. Same CSV; rows are written as cases finish",
    )
    p.add_argument(
        "--ray-cpus",
        type=validate.positive_int_arg,
        default=None,
        help="CPUs of the Ray started for this run (default: all)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spear bench`` with parsed arguments; prints the Markdown table."""
    config = BenchConfig(
        data=args.data,
        batch_sizes=args.batch_sizes,
        widths=args.widths,
        depths=args.depths,
        trained=args.trained,
        local_steps=args.local_steps,
        dp_noise=args.dp_noise,
        clients=args.clients,
        seeds=args.seeds,
        attacks=args.attacks,
        dp_sweep=args.dp_sweep,
        clients_sweep=args.clients_sweep,
        dp_clip=args.dp_clip,
        time_budget=args.time_budget,
        gm_iterations=args.gm_iterations,
        client_lr=args.lr,
    )
    check_output_folder(args.out)
    start = time.perf_counter()
    try:
        result = run_bench(config, args.out, ray=args.ray, ray_cpus=args.ray_cpus)
    except KeyboardInterrupt:
        csv_path = args.out / "results.csv"
        rows = len(read_results(csv_path))
        print(
            f"spear bench: interrupted; {rows} case(s) measured so far are in {csv_path} "
            "(run the same command again to continue)",
            file=sys.stderr,
        )
        return 130
    seconds = time.perf_counter() - start
    print(result.table)
    print(
        f"{result.ran} case(s) run, {result.skipped} already in {args.out / 'results.csv'}; "
        f"{seconds:.1f} s"
    )
    print("wrote: " + ", ".join(str(path) for path in result.files))
    return 0
