"""Mixed columns in a complete batch: found by the examples' own ReLU patterns, replaced.

Where the pattern checks allow some disagreement (FedAvg deltas, whose units may switch
between local steps; float32 updates, whose zero tests are blurred), a pooled direction
``u = g_i + t g_k`` can pass for example ``i``. A complete solve with it returns ``x_i``
exactly (``u`` carries ``i``'s whole share of the update) and, in place of ``x_k``, the
affine mixture ``(a_k x_k - t a_i x_i) / (a_k - t a_i)`` (``a``: the bias scales), whose
pattern differs from ``x_k``'s too little to fail the loose checks. Measured on a float32
FedAvg delta (``784 -> 1000 -> 128 -> 10``, b = 128, Fashion-MNIST): ``u = g_94 + 0.24
g_100`` came back as ``x_94`` exactly and ``1.29 x_100 - 0.29 x_94`` (0.26 off on the
pixel scale); ``u`` disagreed with ``x_94``'s pattern on 5.3% of its clear units, the
true examples on at most 1.5%.

The exact example ``x_i`` gives its own column back: the units it clearly switches off
share one kernel vector of the basis (fact 7), up to the few that local training switched
on (:func:`spear.verify.direction_for` with ``settle`` trims them). Replacing ``u`` by it
and solving again restores ``x_k``. The examples are tried in order of their
disagreement; a replacement is kept only when every example of the new solve verifies
and the batch's summed disagreement falls.
"""

from __future__ import annotations

import time

import torch

from spear.inversion.checks import verified_indices
from spear.inversion.problem import Problem
from spear.inversion.solve import solve_complete
from spear.linalg import zero_mask
from spear.verify import direction_for, pattern_check

__all__ = ["MAX_DEMIX_EXAMINED", "demix", "disagreement"]

#: Examples examined in a row (in order of disagreement) without a replacement kept,
#: before the rest (which disagree less) are left as they are.
MAX_DEMIX_EXAMINED = 16
#: Seconds the demixing may take past the time budget (a search that used the whole
#: budget still has its complete batch checked; 16 examples of b = 128 take about 1 s).
MIN_DEMIX_SECONDS = 10.0
#: A column within this of its pattern's own direction (``1 - |cos|``) is not replaced.
SAME_COLUMN = 1e-6


def disagreement(
    problem: Problem, coords: torch.Tensor, grads: torch.Tensor, live: torch.Tensor
) -> torch.Tensor:
    """``(r,)`` fraction of each example's clear units where its ReLU pattern and its
    gradient column ``grads`` ``(m, r)`` disagree (coordinates ``coords`` ``(r, b)``;
    ``live``: ``(m,)`` the units on for some example, :attr:`Problem.original`)."""
    layer = problem.layer
    assert layer is not None
    zero = zero_mask(grads, problem.tol.zero_tol)
    eps, delta = problem.eps, problem.delta
    out = [
        1.0 - pattern_check(layer, coords[i], zero[:, i], live, eps, delta)[1]
        for i in range(coords.shape[0])
    ]
    return torch.tensor(out, dtype=torch.float64)


def demix(
    problem: Problem, coords: torch.Tensor, grads: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Replace mixed columns of a complete solve of the original factorisation.

    Parameters
    ----------
    coords, grads:
        ``(b, b)`` coordinates and ``(m, b)`` gradient columns of every example.

    Returns
    -------
    tuple | None
        The new ``(coords, grads)`` and how many columns were replaced, or ``None`` when
        none was (also without the layer's weights or bias gradient).
    """
    layer = problem.layer
    if layer is None or problem.bias_grad is None:
        return None
    deadline = max(problem.deadline, time.perf_counter() + MIN_DEMIX_SECONDS)
    full, live = problem.original
    b = problem.rank
    dis = disagreement(problem, coords, grads, live)
    replaced, examined = 0, 0
    tried: set[int] = set()
    while examined < MAX_DEMIX_EXAMINED and replaced < b and time.perf_counter() < deadline:
        pick = [int(i) for i in torch.argsort(dis, descending=True) if int(i) not in tried]
        if not pick or float(dis[pick[0]]) <= 0.0:
            break
        i = pick[0]
        tried.add(i)
        examined += 1
        own = direction_for(layer, full, coords[i], problem.tol, problem.eps, settle=True)
        better = _replaced(problem, (coords, grads), dis, live, i, own)
        if better is not None:
            coords, grads, dis = better
            replaced, examined = replaced + 1, 0
            tried = set()
    return (coords, grads, replaced) if replaced else None


def _replaced(
    problem: Problem,
    solve: tuple[torch.Tensor, torch.Tensor],
    dis: torch.Tensor,
    live: torch.Tensor,
    i: int,
    own: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The solve with example ``i``'s column replaced by ``own`` ``(m,)``, when that
    column differs, every example verifies, and the summed disagreement ``dis`` ``(b,)``
    of ``solve`` (``coords (b, b), grads (m, b)``) falls: the new ``(coords, grads,
    disagreement)``; else ``None``."""
    assert problem.bias_grad is not None
    if own is None:
        return None
    grads = solve[1]
    cols = grads / grads.norm(dim=0)
    unit = own / own.norm()
    if 1.0 - abs(float(unit @ cols[:, i])) <= SAME_COLUMN:
        return None
    cols[:, i] = unit
    solved = solve_complete(problem.fac.left, problem.bias_grad, cols)
    if solved is None or not bool(torch.isfinite(solved[0]).all()):
        return None
    new_coords, new_grads = solved
    if len(verified_indices(problem, new_coords, new_grads, live)) < problem.rank:
        return None
    new_dis = disagreement(problem, new_coords, new_grads, live)
    if float(new_dis.sum()) >= float(dis.sum()):
        return None
    return new_coords, new_grads, new_dis
