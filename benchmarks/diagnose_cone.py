"""Where the input side stops on a CNN batch: its thresholds against the roundoff the
true examples show.

For one batch of ``benchmarks/bench_cnn.py`` (same network, training, dtype, batch size
and seed), ``spear.attack`` runs until its input side first runs (docs/algorithm.md,
fact 13), and at that residual, against the true features entering ``fc1``, prints:

* **row space**: how far each example lies from the update's row space (relative),
  and for each example off it the example whose true gradient column is nearest to its
  own (two same-label examples whose columns agree to the update's rounding merge,
  docs/algorithm.md, fact 12);
* **input kernels**: at each example's true zero inputs, the smallest and the next
  singular value of the row space's rows, against the kernel threshold
  ``zero_tol sqrt(k)`` (:func:`spear.linalg.kernel`): how many read as faces (two or more
  singular values under it), and how many show one line at a gap of
  :data:`spear.linalg.KERNEL_GAP` (the smallest that many times under the next);
* **range test**: at the scale the bias gradient gives each example not yet peeled,
  how far the nearest and the next direction of the residual's column space lie from the
  range of the Jacobian of the model after the layer, against the range tolerance and
  the gap one direction must clear (:meth:`spear.downstream.Downstream.intersections`,
  :func:`spear.downstream.nearest_directions`);
  and again how many show one direction at a gap of ``KERNEL_GAP``.

Every count is over the examples within ``1e-3`` of the row space, the range test's over
those of them the residual still holds::

    python benchmarks/diagnose_cone.py --model flower-cnn --trained no --dtype float32 \\
        --batch-size 64 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import spear
from bench_cnn import build_case
from spear.client import layer_truth
from spear.downstream import nearest_directions, range_tolerance
from spear.inversion.problem import Problem
from spear.inversion.state import SearchState
from spear.inversion.steps import cone
from spear.linalg import KERNEL_GAP, kernel, least_squares
from spear.solvers.polish import live_rows

#: An example lies in the update's row space when its relative distance is below this.
IN_ROW_SPACE = 1e-3
#: A scale the bias gradient gives that is this far off (relative) belongs to an
#: example already peeled (the residual no longer holds it).
PEELED_SCALE_ERROR = 1e-2


@dataclass
class FirstRound:
    """The problem and the residual's left factor ``(m, b)`` when the input side first
    runs, with the examples found by then."""

    problem: Problem
    left: torch.Tensor
    bias: torch.Tensor | None
    found: int


def first_input_round(net: torch.nn.Module, update: dict[str, torch.Tensor]) -> FirstRound:
    """Run ``spear.attack`` (short budget) and keep the state of the input side's first
    round."""
    kept: list[FirstRound] = []
    original = cone.InputCone.run

    def run(self: cone.InputCone, problem: Problem, state: SearchState) -> Any:
        # the step runs in rounds where the other steps neither peeled nor pooled
        moving = state.found > state.round_start[0] or len(state.pool) > state.round_start[1]
        if not kept and not moving and problem.rank > state.found:
            res = state.residual
            kept.append(FirstRound(problem, res.left.clone(), res.bias, state.found))
        return original(self, problem, state)

    cone.InputCone.run = run  # type: ignore[method-assign]
    try:
        spear.attack(net, update, seed=0, time_budget=10.0, progress=False, image_budget=0)
    finally:
        cone.InputCone.run = original  # type: ignore[method-assign]
    if not kept:
        raise SystemExit("the input side did not run on this batch (nothing to diagnose)")
    return kept[0]


def span(values: list[float]) -> str:
    """``min-max`` of ``values`` in short scientific notation."""
    return f"{min(values):.1e} to {max(values):.1e}" if values else "-"


def input_kernels(first: FirstRound, truth: torch.Tensor, near: list[int]) -> None:
    """Print the input kernels' spectrum at the true zero inputs of ``near`` examples."""
    problem = first.problem
    assert problem.layer is not None
    rows = problem.layer.right.T  # (n, r)
    tol = problem.tol.zero_tol
    live = live_rows(rows, tol)
    smallest, following, limits = [], [], []
    faces = gapped = 0
    for k in near:
        zeros = truth[k][live] == 0
        null, values = kernel(rows[live][zeros], tol)
        smallest.append(float(values[0]))
        following.append(float(values[1]))
        limits.append(tol * math.sqrt(int(zeros.sum())))
        faces += int(null.shape[1] >= 2)
        # fewer zero inputs than the rank leave padded zeros: no line then
        second, first_value = float(values[1]), float(values[0])
        gapped += int(second > 0.0 and second >= KERNEL_GAP * first_value)
    print(
        f"input kernels: smallest singular value {span(smallest)}, next {span(following)}, "
        f"threshold {span(limits)} (zero_tol {tol:.1e}); {faces} of {len(near)} read as "
        f"faces; {gapped} show one line at a gap of {KERNEL_GAP:g}"
    )


def range_test(first: FirstRound, truth: torch.Tensor, near: list[int]) -> None:
    """Print the range test at the bias gradient's scales of the examples not yet peeled."""
    problem, left = first.problem, first.left
    assert problem.layer is not None and problem.downstream is not None
    if first.bias is None:
        print("range test: no bias gradient")
        return
    right = problem.layer.right  # (r, n)
    wanted = problem.rank - first.found
    basis = cone._truncated_svd(left, wanted)[0]  # (m, wanted), as the input side's
    phi = least_squares(left, first.bias[:, None])[:, 0]
    nearest, following, errors = [], [], []
    for k in near:
        coord = truth[k] @ right.T
        coord = coord / float(coord @ phi)
        x = coord @ right
        error = abs(float(x.norm() / truth[k].norm()) - 1.0)
        if not error < PEELED_SCALE_ERROR:
            continue
        errors.append(error)
        _, jac = problem.downstream.logits_and_jacobians(x[None])
        _, dist = nearest_directions(basis, problem.downstream.ranges_at(jac)[0])
        nearest.append(float(dist[0]))
        following.append(float(dist[1]) if dist.numel() > 1 else math.inf)
    limit = range_tolerance(problem.tol.zero_tol)
    clear = sum(d > KERNEL_GAP * limit for d in following)
    pairs = zip(nearest, following, strict=True)
    gapped = sum(f > 0.0 and f >= KERNEL_GAP * d for d, f in pairs)
    print(
        f"range test ({len(nearest)} examples not yet peeled; bias-gradient scales off by "
        f"{float(np.median(errors)) if errors else math.nan:.1e} median, "
        f"{max(errors) if errors else math.nan:.1e} worst): nearest {span(nearest)}, next "
        f"{span(following)}; tolerance {limit:.1e}, one direction needs the next above "
        f"{KERNEL_GAP * limit:.1e}: {clear} do; {gapped} show one at a gap of {KERNEL_GAP:g}"
    )


def merged_pairs(
    net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, far: list[int]
) -> None:
    """Print, for each example off the row space, the example whose true gradient column
    (float64) is nearest to its own: ``1 - cosine`` and whether their labels agree."""
    if not far:
        return
    double = copy.deepcopy(net).to(torch.float64)
    _, columns = layer_truth(double, "fc1", images.to(torch.float64), labels)
    unit = columns / columns.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    cosine = unit.T @ unit
    cosine.fill_diagonal_(-math.inf)
    parts = []
    for k in far:
        j = int(cosine[k].argmax())
        same = "same label" if int(labels[k]) == int(labels[j]) else "other label"
        parts.append(f"{k}~{j} {1.0 - float(cosine[k, j]):.1e} {same}")
    print(f"nearest columns of the examples off it (1 - cosine): {'; '.join(parts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="flower-cnn", help="flower-cnn, vgg, vgg-bn")
    parser.add_argument("--trained", default="no", choices=["no", "yes"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, update, images, labels, truth = build_case(
        args.model, args.trained == "yes", args.dtype, args.batch_size, args.seed
    )
    first = first_input_round(net, update)
    problem = first.problem
    assert problem.layer is not None
    right = problem.layer.right
    dist = ((truth @ right.T) @ right - truth).norm(dim=1) / truth.norm(dim=1)
    near = [k for k in range(truth.shape[0]) if float(dist[k]) < IN_ROW_SPACE]
    far = [k for k in range(truth.shape[0]) if k not in near]
    print(
        f"{args.model} ({'trained' if args.trained == 'yes' else 'untrained'}, {args.dtype}), "
        f"b = {args.batch_size}, seed {args.seed}: rank {problem.rank}, {first.found} "
        f"examples found before the input side runs; zero_tol {problem.tol.zero_tol:.1e}, "
        f"degeneracy_tol {problem.tol.degeneracy_tol:.1e}"
    )
    inside = [float(dist[k]) for k in near]
    median = float(np.median(inside)) if inside else math.nan
    worst = max(inside) if inside else math.nan
    print(
        f"row space: {len(near)} examples within {IN_ROW_SPACE:g} (median {median:.1e}, "
        f"worst {worst:.1e}); {len(far)} off it ({span([float(dist[k]) for k in far])})"
    )
    merged_pairs(net, images, labels, far)
    input_kernels(first, truth, near)
    range_test(first, truth, near)


if __name__ == "__main__":
    main()
