"""DP-SGD noise against reconstruction quality: PSNR and label accuracy, with epsilon.

For each batch size and noise multiplier, one DP-SGD client (Opacus, clip norm 1, one
step, sampling rate b / 60000, delta 1e-5) on shipped Fashion-MNIST images and the demo's
784 -> 256 -> 128 -> 10 MLP; spear.attack is told the batch size when there is noise.
Prints a Markdown table::

    python benchmarks/bench_dp.py [--batch-sizes 8,16] [--noise 0,0.001,0.01,0.1,0.5,1]
"""

from __future__ import annotations

import argparse
import math
import statistics

from spear.cli.demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="8,16")
    parser.add_argument("--noise", default="0,0.001,0.01,0.1,0.5,1")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--time-budget", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        "| b | noise multiplier | epsilon (delta 1e-5) | returned | exact | PSNR dB (median) "
        "| labels correct | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b in [int(v) for v in args.batch_sizes.split(",")]:
        for noise in [float(v) for v in args.noise.split(",")]:
            s = run_demo(
                b,
                256,
                args.seed,
                None,
                dp=True,
                noise=noise,
                clip=args.clip,
                time_budget=args.time_budget,
                progress=False,
            )
            psnrs = [r["psnr_db"] for r in s["rows"] if r["psnr_db"] is not None]
            med = statistics.median(psnrs) if psnrs else math.nan
            eps = s["epsilon"]
            labels = s["labels_correct"]
            print(
                f"| {b} | {noise:g} | {'inf' if math.isinf(eps) else f'{eps:.3g}'} "
                f"| {s['found']}/{b} | {s['exact']}/{b} "
                f"| {'-' if math.isnan(med) else f'{med:.1f}'} "
                f"| {'-' if labels is None else f'{labels}/{b}'} | {s['seconds']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
