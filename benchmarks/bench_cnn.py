"""Benchmark the attack on the first linear layer (``fc1``) of small CNNs.

``spear.attack`` inverts ``fc1`` of Flower's tutorial CNN (400 -> 120) and of a small
VGG-style CNN (1024 -> 256; ``vgg-bn``: with BatchNorm in training mode after each
convolution, as a client trains it) and returns the features entering it. For each case: a batch
of ``b`` distinct 32x32 RGB patches (:func:`spear.data.rgb_patches`, the first half of
the pool), one FedSGD step with mean cross-entropy, the network untrained or after 200
SGD steps (lr 0.05, mini-batches of 32) on the other half (:func:`spear.networks.pretrain`).
Prints a Markdown table: features exact (max abs error below 1e-6 of the batch's scale in
float64, 1e-3 in float32), labels right, seconds, whether the layer's result is verified,
and ``false`` verifications (a verified result holding an example that is not exact).
``--singled-out`` adds how many examples the zero sets of the true gradient columns, of
the true inputs of ``fc1``, and of both single out as examples are peeled
(:func:`spear.metrics.singled_out`, on a float64 copy of the network and batch): what
an attack that reads zero sets could recover. Examples::

    python benchmarks/bench_cnn.py
    python benchmarks/bench_cnn.py --models vgg --batch-sizes 8,16 --dtypes float32
    python benchmarks/bench_cnn.py --batch-sizes 32 --dtypes float64 --seed 1 --singled-out
    python benchmarks/bench_cnn.py --models flower-cnn --batch-sizes 32 --attack-seeds 0-9

``--told-batch-size`` gives the attack the batch size (``batch_size=b``), as a Flower
server knows it from the client's ``num_examples``; without it the attack reads the
batch size off the update. ``--attack-seeds`` attacks each update once per attack seed
and prints the spread: the features exact (median and worst), how many attacks gave
every example exactly and were verified, and the seconds (median, 90th percentile,
worst). Which vertices and samples the search draws decides how far it gets within the
budget.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import numpy as np
import torch


def singled_out_counts(
    net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[int, int, int]:
    """Examples of the batch ``images`` ``(b, 3, 32, 32)`` singled out by the zero sets of
    ``fc1``'s true gradient columns, of its true inputs, and of both (float64)."""
    from spear import metrics
    from spear.client import layer_truth

    double = copy.deepcopy(net).to(torch.float64)
    inputs, columns = layer_truth(double, "fc1", images.to(torch.float64), labels)
    return (
        sum(metrics.singled_out(columns, read="columns")),
        sum(metrics.singled_out(columns, inputs, read="inputs")),
        sum(metrics.singled_out(columns, inputs)),
    )


def build_case(
    model_name: str, trained: bool, dtype_name: str, b: int, seed: int
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network of ``seed`` (``trained``: after 200 SGD steps), a FedSGD update on ``b``
    RGB patches, the images ``(b, 3, 32, 32)``, labels ``(b,)`` and the true features
    entering ``fc1`` ``(b, n)`` (float64)."""
    from spear.client import fedsgd_update
    from spear.data import rgb_patches, sample_batch
    from spear.networks import build_cnn, pretrain

    dtype = torch.float64 if dtype_name == "float64" else torch.float32
    pool = rgb_patches(1000, seed=0)
    half = len(pool) // 2
    attack_pool = pool.subset(half)
    net = build_cnn(model_name, seed, dtype=dtype)
    if trained:
        pretrain(net, pool.images[half:], pool.labels[half:], seed=seed)
    images, labels = sample_batch(attack_pool, b, seed=seed + 1)
    images = images.to(dtype)
    update = fedsgd_update(net, images, labels)
    with torch.no_grad():
        truth = net.features(images).to(torch.float64)  # type: ignore[operator]
    return net, update, images, labels, truth


def attack_case(
    net: torch.nn.Module,
    update: dict[str, torch.Tensor],
    labels: torch.Tensor,
    truth: torch.Tensor,
    attack_seed: int,
    budget: float,
    told: bool = False,
) -> dict[str, Any]:
    """One attack of ``update`` with ``attack_seed`` (``told``: given the batch size, as
    a Flower server is by the client's ``num_examples``); its measurements against the
    true features ``truth`` ``(b, n)`` and ``labels`` ``(b,)``."""
    import spear
    from spear import metrics
    from spear.errors import BatchTooLargeError

    b = truth.shape[0]
    tol = 1e-6 if next(net.parameters()).dtype == torch.float64 else 1e-3
    start = time.perf_counter()
    try:
        rec = spear.attack(
            net,
            update,
            batch_size=b if told else None,
            seed=attack_seed,
            time_budget=budget,
            progress=False,
            image_budget=0,
        )
    except BatchTooLargeError as err:
        return {
            "exact": 0.0,
            "labels": 0.0,
            "seconds": time.perf_counter() - start,
            "verified": False,
            "false": False,
            "found": 0,
            "note": str(err)[:80],
        }
    seconds = time.perf_counter() - start
    found = rec.inputs.reshape(rec.inputs.shape[0], truth.shape[1]).to(torch.float64)
    k = found.shape[0]
    exact = labels_right = 0.0
    all_exact = True
    if k:
        match = metrics.match(found, truth)
        exact = metrics.exact_rate(found, truth, rel_tol=tol, matching=match)
        err = (found[match.rec_index] - truth[match.truth_index]).abs().amax(dim=1)
        all_exact = bool((err <= tol * float(truth.abs().max())).all())
        if rec.labels is not None:
            labels_right = (
                float((rec.labels[match.rec_index] == labels[match.truth_index]).sum()) / b
            )
    verified = rec.layer_result is not None and rec.layer_result.verified
    note = next((n for n in rec.notes if "identified" in n), "")
    return {
        "exact": exact,
        "labels": labels_right,
        "seconds": seconds,
        "verified": verified,
        "false": verified and not all_exact,
        "found": k,
        "note": note,
    }


def run_case(
    model_name: str,
    trained: bool,
    dtype_name: str,
    b: int,
    seed: int,
    budget: float,
    singled: bool = False,
    told: bool = False,
) -> dict[str, Any]:
    """One attack (attack seed ``seed``, ``told`` the batch size or not); its
    measurements, and with ``singled`` the examples the true zero sets single out."""
    net, update, images, labels, truth = build_case(model_name, trained, dtype_name, b, seed)
    singled_counts = singled_out_counts(net, images, labels) if singled else None
    found = attack_case(net, update, labels, truth, seed, budget, told)
    return {**found, "singled": singled_counts}


def seed_spread(
    model_name: str,
    trained: bool,
    dtype_name: str,
    b: int,
    seed: int,
    attack_seeds: list[int],
    budget: float,
    told: bool = False,
) -> dict[str, Any]:
    """The update of ``seed`` attacked once per attack seed: the spread of what comes back
    (which vertices and samples the search draws decides how far it gets in the budget)."""
    net, update, _, labels, truth = build_case(model_name, trained, dtype_name, b, seed)
    runs = [attack_case(net, update, labels, truth, s, budget, told) for s in attack_seeds]
    exact = sorted(r["exact"] for r in runs)
    seconds = sorted(r["seconds"] for r in runs)
    return {
        "runs": len(runs),
        "exact_median": statistics.median(exact),
        "exact_worst": exact[0],
        "whole": sum(r["exact"] == 1.0 for r in runs),
        "verified": sum(r["verified"] for r in runs),
        "false": sum(r["false"] for r in runs),
        "seconds": (statistics.median(seconds), float(np.percentile(seconds, 90)), seconds[-1]),
    }


def _seeds(text: str) -> list[int]:
    """``"0-9"`` or ``"0,3,5"``: the attack seeds."""
    if "-" in text:
        first, last = (int(v) for v in text.split("-"))
        return list(range(first, last + 1))
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="flower-cnn,vgg", help="flower-cnn, vgg, vgg-bn")
    parser.add_argument("--batch-sizes", default="4,8,16,32")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--trained", default="no,yes", help="no, yes or both (no,yes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=60.0, help="time budget per attack, s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--notes", action="store_true", help="print the attack's note per case")
    parser.add_argument(
        "--singled-out",
        action="store_true",
        help="add the examples the true zero sets single out (gradient columns / inputs / both)",
    )
    parser.add_argument(
        "--told-batch-size",
        action="store_true",
        help="give the attack the batch size (batch_size=b), as a Flower server knows it",
    )
    parser.add_argument(
        "--attack-seeds",
        default="",
        help="attack each update once per seed ('0-9' or '0,3,5') and print the spread",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.attack_seeds:
        print_seed_spread(args)
        return
    extra = " singled out (columns / inputs / both) |" if args.singled_out else ""
    print(
        "| b | model | trained | dtype | features exact | labels | seconds | verified | false |"
        + extra
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for model_name in args.models.split(","):
        for trained in args.trained.split(","):
            for dtype_name in args.dtypes.split(","):
                for b in (int(v) for v in args.batch_sizes.split(",")):
                    r = run_case(
                        model_name,
                        trained == "yes",
                        dtype_name,
                        b,
                        args.seed,
                        args.budget,
                        args.singled_out,
                        args.told_batch_size,
                    )
                    counts = r["singled"]
                    cell = "" if counts is None else " {} / {} / {} |".format(*counts)
                    print(
                        f"| {b} | {model_name} | {trained} | {dtype_name} | {r['exact']:.3f} | "
                        f"{r['labels']:.3f} | {r['seconds']:.1f} | "
                        f"{'yes' if r['verified'] else 'no'} | {'YES' if r['false'] else 'no'} |"
                        + cell,
                        flush=True,
                    )
                    if args.notes and r["note"]:
                        print(f"  note: {r['note']}", flush=True)


def print_seed_spread(args: argparse.Namespace) -> None:
    """The table of :func:`seed_spread`, a row per case."""
    seeds = _seeds(args.attack_seeds)
    print(
        "| b | model | trained | dtype | attacks | features exact (median / worst) | "
        "all exact | verified | false | seconds (median / p90 / worst) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for trained in args.trained.split(","):
            for dtype_name in args.dtypes.split(","):
                for b in (int(v) for v in args.batch_sizes.split(",")):
                    r = seed_spread(
                        model_name,
                        trained == "yes",
                        dtype_name,
                        b,
                        args.seed,
                        seeds,
                        args.budget,
                        args.told_batch_size,
                    )
                    n = r["runs"]
                    median, p90, worst = r["seconds"]
                    print(
                        f"| {b} | {model_name} | {trained} | {dtype_name} | {n} | "
                        f"{r['exact_median']:.3f} / {r['exact_worst']:.3f} | {r['whole']}/{n} | "
                        f"{r['verified']}/{n} | {r['false']} | "
                        f"{median:.1f} / {p90:.1f} / {worst:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
