"""Clients that train with Dropout active: what ``spear.attack`` gives back, and how fast.

Prints a Markdown table, one row per (model, b, p, dtype) over ``--seeds`` batches
(times: median, 90th percentile and worst). Examples::

    python benchmarks/bench_dropout.py
    python benchmarks/bench_dropout.py --models mlp --batch-sizes 64,128 --dtypes float32
    python benchmarks/bench_dropout.py --models cnn --batch-sizes 4,8,16 --budget 60

A case: ``b`` distinct images, one FedSGD step (mean cross-entropy) with the model in
training mode, so that its Dropout draws a mask per example; the server attacks the
update with the model in eval mode. Models (PyTorch default init, seed = the batch's):

* ``mlp``: Fashion-MNIST, ``784 -> 1000 -> 128 -> 10`` with ``Dropout(p)`` after the first
  ReLU (the attacked layer's): its masks are read off the update.
* ``mlp-functional``: the same with ``F.dropout(h, p, training=self.training)`` in
  ``forward`` instead of a module.
* ``mlp-input``: the same with ``Dropout(p)`` on the inputs instead (before the first
  layer): the truth is what that layer took, the images with their masks.
* ``mlp-deep``: the same with the Dropout after the second ReLU: its masks are not in the
  first layer's update.
* ``cnn``: 32x32 RGB patches through Flower's tutorial CNN with ``Dropout(p)`` after
  ``fc1``'s ReLU; ``fc1``'s input features are attacked (no images: ``image_budget=0``).
* ``mnist-net``: Fashion-MNIST through the PyTorch examples' MNIST network (its
  ``Dropout(0.25)`` before ``fc1`` masks the features ``fc1`` takes, which are the truth
  here; ``Dropout(p)`` after ``fc1``'s ReLU), trained with ``nll_loss``.

"exact": an example within 1e-6 (float64) or 1e-3 (float32) of the truth's scale;
"labels": right labels of the matched examples; "verified": batches ``spear.attack``
marks verified; "false": verified batches holding an example that is not exact.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import spear
from spear.data import builtin_images, rgb_patches, sample_batch


class DropoutCnn(nn.Module):
    """Flower's tutorial CNN with ``Dropout(p)`` after ``fc1``'s ReLU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.flatten(self.pool(torch.relu(self.conv2(x))), 1)
        h = self.drop(torch.relu(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(h)))


class MnistNet(nn.Module):
    """The PyTorch examples' MNIST network: two convolutions, ``Dropout(0.25)``, ``fc1``
    (9216 -> 128), ReLU, ``Dropout(p)`` (0.5 there), ``fc2``; log-softmax outputs."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(p)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.flatten(self.dropout1(nn.functional.max_pool2d(x, 2)), 1)
        x = self.dropout2(torch.relu(self.fc1(x)))
        return nn.functional.log_softmax(self.fc2(x), dim=1)


class FunctionalMlp(nn.Module):
    """``784 -> 1000 -> 128 -> 10`` with ``F.dropout(h, p, training=self.training)`` after
    the first ReLU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.fc1 = nn.Linear(784, 1000)
        self.fc2 = nn.Linear(1000, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(torch.relu(self.fc1(x.flatten(1))), self.p, self.training)
        return self.fc3(torch.relu(self.fc2(h)))


def build(model: str, p: float, seed: int, dtype: torch.dtype) -> nn.Module:
    """The model called ``model`` (see the module docstring) in ``dtype``."""
    torch.manual_seed(seed)
    if model == "cnn":
        return DropoutCnn(p).to(dtype)
    if model == "mnist-net":
        return MnistNet(p).to(dtype)
    if model == "mlp-functional":
        return FunctionalMlp(p).to(dtype)
    if model == "mlp-input":
        return nn.Sequential(
            nn.Flatten(),
            nn.Dropout(p),
            nn.Linear(784, 1000),
            nn.ReLU(),
            nn.Linear(1000, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        ).to(dtype)
    first: list[nn.Module] = [nn.Linear(784, 1000), nn.ReLU()]
    second: list[nn.Module] = [nn.Linear(1000, 128), nn.ReLU()]
    (second if model == "mlp-deep" else first).append(nn.Dropout(p))
    return nn.Sequential(nn.Flatten(), *first, *second, nn.Linear(128, 10)).to(dtype)


def run_case(
    model_name: str, b: int, p: float, dtype: torch.dtype, seed: int, budget: float
) -> tuple[int, int, bool, bool, float]:
    """One batch: (exact examples, right labels, verified, false verified, seconds)."""
    data = rgb_patches(1000) if model_name == "cnn" else builtin_images()
    x, y = sample_batch(data, b, seed)
    x = x.to(dtype)
    model = build(model_name, p, seed, dtype)
    model.train()
    torch.manual_seed(1000 + seed)  # the client's masks
    params = dict(model.named_parameters())
    # the truth: what the attacked layer (the first Linear) took in the client's pass
    first = next(mod for mod in model.modules() if isinstance(mod, nn.Linear))
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    out = model(x)
    hook.remove()
    loss = (
        nn.functional.nll_loss(out, y)
        if model_name == "mnist-net"
        else nn.functional.cross_entropy(out, y)
    )
    update = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    model.eval()
    start = time.perf_counter()
    rec = spear.attack(model, update, time_budget=budget, image_budget=0)
    seconds = time.perf_counter() - start
    truth = seen[0].reshape(b, -1).to(torch.float64)
    got = rec.inputs.reshape(rec.inputs.shape[0], truth.shape[1]).to(torch.float64)
    exact = labels = 0
    if got.shape[0]:
        dist = torch.cdist(got, truth, compute_mode="donot_use_mm_for_euclid_dist")
        rows, cols = linear_sum_assignment(dist.numpy())
        err = (got[rows] - truth[cols]).abs().amax(dim=1) / float(truth.abs().max())
        ok = err < (1e-6 if dtype == torch.float64 else 1e-3)
        exact = int(ok.sum())
        if rec.labels is not None:
            labels = int((rec.labels[rows] == y[cols]).sum())
    false = rec.verified and exact < got.shape[0]
    return exact, labels, rec.verified, false, seconds


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = float(np.percentile(ordered, 90))
    return f"{statistics.median(ordered):.2f} / {p90:.2f} / {ordered[-1]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,mlp-functional,mlp-input,mlp-deep,cnn,mnist-net")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--ps", default="0.2,0.5", help="Dropout probabilities")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| model | b | p | dtype | batches | all exact | examples exact | labels | verified "
        "| false | seconds (median / p90 / worst) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for p in (float(v) for v in args.ps.split(",")):
                for b in (int(v) for v in args.batch_sizes.split(",")):
                    runs = [
                        run_case(model_name, b, p, dtype, seed, args.budget)
                        for seed in range(args.seeds)
                    ]
                    n = len(runs)
                    whole = sum(r[0] == b for r in runs)
                    print(
                        f"| {model_name} | {b} | {p:g} | {dtype_name} | {n} | {whole}/{n} "
                        f"| {sum(r[0] for r in runs)}/{n * b} | {sum(r[1] for r in runs)}/{n * b} "
                        f"| {sum(r[2] for r in runs)}/{n} | {sum(r[3] for r in runs)} "
                        f"| {_spread([r[4] for r in runs])} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
