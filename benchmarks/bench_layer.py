"""Benchmark the layer inversion on real images: exactness, time, samples, memory.

Prints a Markdown table over seeds (times: median, 90th percentile and worst). Each case
runs in a fresh process so that peak memory is per case. Examples::

    python benchmarks/bench_layer.py                       # b 4..24, small layers
    python benchmarks/bench_layer.py --batch-sizes 25,32,64,128 --widths 1000 --seeds 3
    python benchmarks/bench_layer.py --data rgb --batch-sizes 32,64 --widths 2000
    python benchmarks/bench_layer.py --no-weights --solver sampling   # the paper's setting
    python benchmarks/bench_layer.py --attack --batch-sizes 64 --widths 1000  # spear.attack
    python benchmarks/bench_layer.py --dtype float32 --batch-sizes 25,64 --widths 1000
    python benchmarks/bench_layer.py --dtype float32 --attack --update fedavg --hidden 128

``--dtype float32``: the model, images and update are float32; an example is exact when
every pixel is within 1e-3 of the truth on the [0, 1] scale (8-bit rounding gives it back).

A case: ``b`` distinct images, a float64 MLP ``n -> m -> 10`` (``--hidden h``:
``n -> m -> h -> 10``; PyTorch default init, or
``--trained``: 50 SGD steps on other images first), one FedSGD step with mean
cross-entropy; the first layer's gradient goes to :func:`spear.invert_layer`. An example is
exact when its max abs error is below 1e-6 of the batch's scale.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import resource
import statistics
import sys
import time
from typing import Any

#: ``--update fedavg``: the client's mini-batch size and learning rate (one epoch).
FEDAVG_BATCH = 8
FEDAVG_LR = 0.1


def _warm_up() -> None:
    """One small inversion so that library start-up is not timed (fresh process per case)."""
    import torch

    import spear
    from spear.data import builtin_images

    x = builtin_images(4).images.reshape(4, -1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    net = net.double()
    loss = torch.nn.functional.cross_entropy(net(x), torch.arange(4))
    gw, gb = torch.autograd.grad(loss, [net[0].weight, net[0].bias])
    spear.invert_layer(gw, gb, weight=net[0].weight.detach(), bias=net[0].bias.detach())


def _client_update(
    name: str, model: Any, images: Any, labels: Any, seed: int
) -> tuple[dict[str, Any], str]:
    """The client's update of ``name`` (``--update``) and its ``update_kind``."""
    from spear import client

    if name == "sum":
        return client.fedsgd_update(model, images, labels, reduction="sum"), "gradient"
    if name == "fedavg":
        delta = client.fedavg_update(
            model, images, labels, epochs=1, batch_size=FEDAVG_BATCH, lr=FEDAVG_LR, seed=seed
        )
        return delta, "delta"
    if name == "clipped":
        clipped = client.dp_sgd_update(
            model, images, labels, max_grad_norm=1.0, noise_multiplier=0.0, seed=seed
        )
        return clipped.update, "gradient"
    return client.fedsgd_update(model, images, labels), "gradient"


def run_case(cfg: dict[str, Any]) -> dict[str, Any]:
    """One attack in this process; returns its measurements."""
    import torch

    import spear
    from spear import metrics
    from spear.data import builtin_images, load_fashion_mnist, rgb_patches, sample_batch
    from spear.solvers.sampling import expected_samples

    torch.set_num_threads(cfg["threads"])
    b, m, seed = cfg["b"], cfg["m"], cfg["seed"]
    if cfg["data"] == "rgb":
        data = rgb_patches(max(1000, 4 * b), seed=0)
    else:
        try:
            data = load_fashion_mnist("test")
        except FileNotFoundError:
            data = builtin_images()
    images, labels = sample_batch(data, b + 200, seed=seed)
    x = images[:b].reshape(b, -1)
    y = labels[:b]
    n = x.shape[1]
    torch.manual_seed(seed)
    hidden = cfg.get("hidden", 0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(n, m), torch.nn.ReLU()]
    if hidden:
        layers += [torch.nn.Linear(m, hidden), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(hidden or m, 10)).double()
    f32 = cfg.get("dtype", "float64") == "float32"
    exact_tol = 1e-3 if f32 else metrics.DEFAULT_REL_TOL
    if f32:
        net = net.float()
        images = images.float()
        x = x.float()
    if cfg["trained"]:
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        other = images[b:].reshape(-1, n)
        other_y = labels[b:]
        for step in range(50):
            idx = torch.arange(step * 4, step * 4 + 32) % other.shape[0]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(other[idx]), other_y[idx]).backward()
            opt.step()
    _warm_up()
    if cfg["attack"]:
        # the whole model, as a server has it: spear.attack picks the layer and the solver
        model = torch.nn.Sequential(torch.nn.Flatten(), *net)
        shaped = images[:b]
        update, kind = _client_update(cfg.get("update", "fedsgd"), model, shaped, y, seed)
        start = time.perf_counter()
        out = spear.attack(
            model,
            update,
            update_kind=kind,
            seed=seed,
            time_budget=cfg["budget"],
            progress=False,
        )
        seconds = time.perf_counter() - start
        found = out.inputs.shape[0]
        match = metrics.match(out.inputs, shaped) if found else None
        return {
            "b": b,
            "m": m,
            "seed": seed,
            "exact": (
                metrics.exact_rate(out.inputs.to(shaped.dtype), shaped, rel_tol=exact_tol)
                if found
                else 0.0
            ),
            "seconds": seconds,
            "samples": out.layer_result.samples,
            "expected": expected_samples(b),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "found": found,
            "labels": (
                metrics.label_accuracy(out.labels, y, match)
                if match is not None and out.labels is not None
                else 0.0
            ),
            "certificate": (
                float(out.certificate) if out.certificate is not None else float("nan")
            ),
        }
    loss = torch.nn.functional.cross_entropy(net(x), y)
    gw, gb = torch.autograd.grad(loss, [net[0].weight, net[0].bias])
    start = time.perf_counter()
    rec = spear.invert_layer(
        gw,
        gb,
        weight=None if cfg["no_weights"] else net[0].weight.detach(),
        bias=None if cfg["no_weights"] else net[0].bias.detach(),
        seed=seed,
        solver=cfg["solver"],
        time_budget=cfg["budget"],
        progress=False,
    )
    seconds = time.perf_counter() - start
    rate = metrics.exact_rate(rec.inputs.to(x.dtype), x, rel_tol=exact_tol) if rec.found else 0.0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "b": b,
        "m": m,
        "seed": seed,
        "exact": rate,
        "seconds": seconds,
        "samples": rec.samples,
        "expected": expected_samples(b),
        "peak_mb": peak_mb,
        "found": rec.found,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="4,8,12,16,20,24")
    parser.add_argument("--widths", default="200,1000")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--data", choices=["fashion", "rgb"], default="fashion")
    parser.add_argument("--trained", action="store_true")
    parser.add_argument("--no-weights", action="store_true", help="do not give W and c")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="model and update"
    )
    parser.add_argument(
        "--attack",
        action="store_true",
        help="run spear.attack on the whole model (labels, certificate) instead of the layer",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=0,
        help="a second ReLU layer of this width before the head (n -> m -> hidden -> 10)",
    )
    parser.add_argument(
        "--update",
        choices=["fedsgd", "sum", "fedavg", "clipped"],
        default="fedsgd",
        help="with --attack: FedSGD mean (default) or sum, a FedAvg delta (one epoch in "
        f"mini-batches of {FEDAVG_BATCH}, lr {FEDAVG_LR}), or per-example clipping to norm 1 "
        "(Opacus, no noise)",
    )
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    print(
        f"data={args.data} trained={args.trained} solver={args.solver} "
        f"weights={'no' if args.no_weights else 'yes'} seeds={args.seeds} "
        f"attack={args.attack} update={args.update} hidden={args.hidden}",
        file=sys.stderr,
    )
    header = (
        "| b | m | exact (median) | all exact | time s (median / p90 / worst) "
        "| samples (median) "
        "| H_b 2^(b-1) | peak MB |"
    )
    if args.attack:
        header += " labels (median) | certificate (max) |"
    print(header)
    print("|---" * header.count(" | ") + "|---|")
    for m in [int(v) for v in args.widths.split(",")]:
        for b in [int(v) for v in args.batch_sizes.split(",")]:
            results = []
            for seed in range(args.seeds):
                cfg = {
                    "b": b,
                    "m": m,
                    "seed": seed,
                    "solver": args.solver,
                    "data": args.data,
                    "trained": args.trained,
                    "no_weights": args.no_weights,
                    "budget": args.budget,
                    "threads": args.threads,
                    "attack": args.attack,
                    "dtype": args.dtype,
                    "update": args.update,
                    "hidden": args.hidden,
                }
                with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                    res = pool.submit(run_case, cfg).result()
                results.append(res)
                extra = (
                    f" labels {res['labels']:.3f} certificate {res['certificate']:.1e}"
                    if args.attack
                    else ""
                )
                print(
                    f"  b={b} m={m} seed={seed}: exact {res['exact']:.3f} "
                    f"{res['seconds']:.2f} s samples {res['samples']}{extra}",
                    file=sys.stderr,
                )
            rows.append(results)
            med = statistics.median
            print(
                f"| {b} | {m} | {med(r['exact'] for r in results):.3f} "
                f"| {sum(r['exact'] == 1.0 for r in results)}/{len(results)} "
                f"| {_spread([r['seconds'] for r in results])} "
                f"| {med(r['samples'] for r in results):.0f} "
                f"| {results[0]['expected']:.3g} "
                f"| {max(r['peak_mb'] for r in results):.0f} |"
                + (
                    f" {med(r['labels'] for r in results):.3f} "
                    f"| {max(r['certificate'] for r in results):.1e} |"
                    if args.attack
                    else ""
                ),
                flush=True,
            )
    return 0


def _spread(values: list[float]) -> str:
    """``median / 90th percentile / worst`` of per-batch values (seconds)."""
    p90 = (
        statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    )
    return f"{statistics.median(values):.2f} / {p90:.2f} / {max(values):.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
