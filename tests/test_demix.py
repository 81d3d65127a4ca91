"""Mixed columns in a complete batch whose checks are loose (a float32 FedAvg delta): a
direction ``g_i + t g_k`` passes every check with ``x_i`` exact and ``x_k`` shifted, and
the examples' own ReLU patterns replace it."""

from __future__ import annotations

import torch
from tests.conftest import problem_from
from torch import nn

from spear import client
from spear.data import builtin_images, sample_batch
from spear.inversion.checks import verified_indices
from spear.inversion.demix import demix, disagreement
from spear.inversion.driver import invert
from spear.inversion.problem import Problem
from spear.inversion.solve import solve_complete
from spear.verify import direction_for

#: Largest pixel error of a float32 reconstruction that counts as exact ([0, 1] scale).
PIXEL_TOL = 1e-3
#: A complete solve: ``(coords (b, b), grads (m, b))``.
Solve = tuple[torch.Tensor, torch.Tensor]


def _delta_problem(b: int, seed: int) -> tuple[Problem, torch.Tensor]:
    """The first layer's float32 FedAvg delta (one epoch, mini-batches of 4) of a
    ``784 -> 256 -> 100 -> 10`` MLP as an inversion problem, and the true inputs ``(b, 784)``."""
    x, y = sample_batch(builtin_images(), b, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )  # fmt: skip
    delta = client.fedavg_update(model, x.float(), y, epochs=1, batch_size=4, lr=0.1, seed=1)
    layer = model[1]
    assert isinstance(layer, nn.Linear)
    problem = problem_from(
        delta["1.weight"],
        delta["1.bias"],
        layer.weight.detach(),
        layer.bias.detach(),
        update_kind="delta",
    )
    return problem, x.reshape(b, -1).double()


def _solved(b: int, seed: int) -> tuple[Problem, torch.Tensor, torch.Tensor, Solve]:
    """The delta problem of :func:`_delta_problem` inverted: the problem, the truth, the
    unit columns ``(m, b)`` found and their complete solve, checked exact."""
    problem, truth = _delta_problem(b, seed)
    rec = invert(problem)
    assert rec.found == b, rec.notes
    assert problem.bias_grad is not None
    cols = rec.output_grads / rec.output_grads.norm(dim=0)
    solved = solve_complete(problem.fac.left, problem.bias_grad, cols)
    assert solved is not None
    assert float(_errors(problem, solved[0], truth).max()) < PIXEL_TOL
    return problem, truth, cols, solved


def _errors(problem: Problem, coords: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``(b,)`` each solved example's largest pixel error against its nearest true one."""
    inputs = coords @ problem.fac.right
    return torch.cdist(inputs, truth, p=float("inf")).min(dim=1).values


def test_demix_restores_the_example_a_mixed_column_shifted() -> None:
    problem, truth, cols, _ = _solved(12, seed=3)
    db = problem.bias_grad
    assert db is not None
    _, live = problem.original
    # the example whose column is closest to example 0's; mix it into example 0's column
    # with the largest weight whose solve still passes every (loose) check
    similar = (cols.T @ cols[:, 0]).abs()
    similar[0] = -1.0
    k = int(similar.argmax())
    mixed = None
    for t in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02):
        trial = cols.clone()
        trial[:, 0] = cols[:, 0] + t * cols[:, k]
        trial[:, 0] /= trial[:, 0].norm()
        out = solve_complete(problem.fac.left, db, trial)
        assert out is not None
        errors = _errors(problem, out[0], truth)
        if len(verified_indices(problem, *out, live)) == 12 and float(errors.max()) > PIXEL_TOL:
            mixed = out
            break
    assert mixed is not None, "no mixture passed the loose checks: the premise fails"
    # example 0 stays exact, example k is shifted
    errors = _errors(problem, mixed[0], truth)
    assert float(errors[0]) < PIXEL_TOL
    assert float(errors[k]) > PIXEL_TOL
    before = disagreement(problem, *mixed, live)
    assert int(before.argmax()) in (0, k)
    fixed = demix(problem, *mixed)
    assert fixed is not None
    coords, grads, replaced = fixed
    assert replaced >= 1
    assert float(_errors(problem, coords, truth).max()) < PIXEL_TOL
    assert float(disagreement(problem, coords, grads, live).sum()) < float(before.sum())
    assert float((grads[:, 0] / grads[:, 0].norm() @ cols[:, 0]).abs()) > 1 - 1e-6


def test_demix_leaves_an_exact_batch_alone() -> None:
    problem, _, _, solved = _solved(12, seed=4)
    assert demix(problem, *solved) is None


def test_settled_direction_on_a_float32_delta_is_a_true_column_or_none() -> None:
    """A solved example's own pattern gives a true column (its own, or that of an example
    whose zero set holds the same rows), or nothing: local training switched some of its
    predicted-off units on, and the trimmed fit leaves them out (measured: 58 of the 72
    give a true column, 56 their own)."""
    own_column = total = 0
    for seed in (4, 5):
        for b in (12, 24):
            problem, _, cols, solved = _solved(b, seed=seed)
            layer = problem.layer
            assert layer is not None
            full, _ = problem.original
            for i in range(b):
                coord = solved[0][i]
                own = direction_for(layer, full, coord, problem.tol, problem.eps, settle=True)
                total += 1
                if own is None:
                    continue
                cosines = (cols.T @ (own / own.norm())).abs()
                assert float(cosines.max()) > 1 - 1e-9, (seed, b, i)
                own_column += int(cosines.argmax()) == i
    assert own_column >= 0.7 * total, (own_column, total)
