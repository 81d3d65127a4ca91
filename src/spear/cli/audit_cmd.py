"""``spear audit``: simulate the described clients, attack every setting, one report page."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from spear import validate
from spear.audit import CAVEAT, AuditConfig, ModelSpec, run_audit
from spear.bench import read_results
from spear.cli.bench import _comma_list, add_ray_arguments
from spear.files import check_output_folder
from spear.report import markdown_table

__all__ = ["add_parser", "run"]

_DEFAULT = AuditConfig()
_SHOWN = ("clients", "dp_noise", "examples", "exact", "psnr_mean", "label_accuracy", "epsilon")


def add_parser(sub: Any) -> None:
    """Register the ``audit`` sub-command."""
    d = _DEFAULT
    p = sub.add_parser(
        "audit",
        help="does my federated setting leak? simulate it, attack it, one HTML page",
        description=(
            "Simulates the described clients on your data (or the shipped images): for every "
            "number of clients and DP-SGD noise multiplier, each client trains the model on "
            "its own --batch-size images and sends its weight delta; the server's view (every "
            "update, or only their sum with --secure-aggregation) is attacked and compared "
            "with the truth. Writes OUT/report.html (table, image grids, leakage against "
            "clients and against noise, the smallest aggregation and noise at which nothing "
            "was recovered), report.json and results.csv (one row per setting, appended as "
            "each finishes: run the same command again to continue an interrupted audit)."
        ),
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="torch.export program (.pt2) of your model, read without unpickling "
        "(default: an MLP with --width hidden units)",
    )
    p.add_argument(
        "--trust-model",
        action="store_true",
        help="load --model with torch.export.load (unpickles: trusted files only)",
    )
    p.add_argument(
        "--width",
        type=validate.positive_int_arg,
        default=d.model.width,
        help=f"hidden units of the default MLP ({d.model.width})",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=d.model.dtype,
        help=f"dtype of the default MLP ({d.model.dtype}); a --model keeps its own",
    )
    p.add_argument(
        "--data",
        default=d.data,
        help="builtin (1000 shipped Fashion-MNIST images), a .npz file (arrays 'images' and "
        "'labels') or a folder with one subfolder of images per class (builtin)",
    )
    p.add_argument(
        "--batch-size",
        type=validate.positive_int_arg,
        default=d.batch_size,
        help=f"images per client ({d.batch_size})",
    )
    p.add_argument(
        "--local-epochs",
        type=validate.positive_int_arg,
        default=d.local_epochs,
        help=f"local passes over the client's images ({d.local_epochs})",
    )
    p.add_argument(
        "--local-batch",
        type=validate.positive_int_arg,
        default=None,
        help="local mini-batch size (default: the batch size, one step per epoch)",
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"local SGD learning rate ({d.lr})")
    p.add_argument(
        "--clients",
        type=_comma_list(int, "integers"),
        default=d.clients,
        help="numbers of clients per aggregate to try, e.g. 1,4,16 (1)",
    )
    p.add_argument(
        "--dp-noise",
        type=_comma_list(float, "numbers"),
        default=d.dp_noise,
        help="DP-SGD noise multipliers to try, e.g. 0,1e-4,1e-2; 0 = plain SGD (0)",
    )
    p.add_argument(
        "--dp-clip",
        type=float,
        default=d.dp_clip,
        help=f"DP-SGD per-example clipping norm ({d.dp_clip})",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="the server sees only the sum of the clients' updates (attacked as one batch)",
    )
    p.add_argument(
        "--time-budget",
        type=validate.time_budget_arg,
        default=d.time_budget,
        help=f"seconds of search per attacked update ({d.time_budget})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed ({d.seed})")
    p.add_argument(
        "--threads",
        type=validate.positive_int_arg,
        default=d.threads,
        help=f"torch threads per attack ({d.threads})",
    )
    p.add_argument("--out", type=Path, default=Path("audit-out"), help="output folder (audit-out)")
    add_ray_arguments(p)
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> AuditConfig:
    model = ModelSpec(
        path=str(args.model) if args.model is not None else None,
        trust=args.trust_model,
        width=args.width,
        dtype=args.dtype,
    )
    return AuditConfig(
        model=model,
        data=args.data,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        local_batch=args.local_batch,
        lr=args.lr,
        clients=args.clients,
        dp_noise=args.dp_noise,
        dp_clip=args.dp_clip,
        secure_aggregation=args.secure_aggregation,
        time_budget=args.time_budget,
        seed=args.seed,
        threads=args.threads,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spear audit`` with parsed arguments; prints the table and the findings."""
    config = _config(args)
    check_output_folder(args.out)
    start = time.perf_counter()
    try:
        result = run_audit(config, args.out, ray=args.ray, ray_cpus=args.ray_cpus)
    except KeyboardInterrupt:
        csv_path = args.out / "results.csv"
        print(
            f"spear audit: interrupted; {len(read_results(csv_path))} setting(s) measured so "
            f"far are in {csv_path} (run the same command again to continue)",
            file=sys.stderr,
        )
        return 130
    print(markdown_table(result.rows, _SHOWN))
    for line in result.conclusions["lines"]:
        print(line)
    if any("nothing was recovered" in line for line in result.conclusions["lines"]):
        print(CAVEAT)
    print(
        f"{result.ran} setting(s) run, {result.skipped} already in {args.out / 'results.csv'}; "
        f"{time.perf_counter() - start:.1f} s"
    )
    print(f"report: {args.out / 'report.html'}")
    return 0
