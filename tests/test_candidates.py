"""Row candidates and the unknown subspace (fact 8 and the completion step)."""

from __future__ import annotations

import torch
from tests.conftest import LayerCase, layer_case, problem_for

from spear.candidates import (
    row_candidates,
    row_ratios,
    subspace_candidates,
    unknown_subspace,
)
from spear.inversion.pool import DirectionPool
from spear.inversion.problem import Problem
from spear.inversion.residual import Residual


def _setup(
    case: LayerCase, missing: list[int], time_budget: float = 60.0
) -> tuple[Residual, Problem]:
    """The case's problem, and a residual with the true directions of every example but
    ``missing`` pooled."""
    problem = problem_for(case, time_budget)
    cols = case.output_grads / case.output_grads.norm(dim=0)
    pooled = DirectionPool(cols[:, i] for i in range(cols.shape[1]) if i not in missing)
    state = Residual(
        left=problem.fac.left.clone(),
        bias=case.bias_grad.clone(),
        coords=[],
        grads=[],
        directions=pooled,
    )
    return state, problem


def test_unknown_subspace_holds_exactly_the_missing_examples() -> None:
    case = layer_case(300, 784, 20, real=True, seed=3)
    missing = [2, 7, 11, 19]
    state, problem = _setup(case, missing)
    rank = problem.rank
    span = unknown_subspace(state, rank)
    assert span.shape == (rank, len(missing))
    torch.testing.assert_close(span.T @ span, torch.eye(len(missing), dtype=torch.float64))
    coords = case.inputs @ problem.fac.right.T  # (b, b) every example's row-space coordinates
    inside = (coords - coords @ span @ span.T).norm(dim=1) / coords.norm(dim=1)
    assert float(inside[missing].max()) < 1e-10
    found = [i for i in range(20) if i not in missing]
    assert float(inside[found].min()) > 1e-3  # the pooled examples are not in it


def test_subspace_candidates_pool_exactly_the_missing_directions() -> None:
    case = layer_case(1000, 784, 40, real=True, seed=1)
    missing = [0, 5, 9, 22, 31, 39]
    state, problem = _setup(case, missing)
    added = subspace_candidates(problem, state)
    assert added == len(missing)
    cols = case.output_grads / case.output_grads.norm(dim=0)
    for d in state.directions[-added:]:
        cos = (cols.T @ d).abs()
        assert float(cos.max()) > 1 - 1e-10
        assert int(cos.argmax()) in missing


def test_subspace_candidates_need_some_pooled_directions() -> None:
    case = layer_case(200, 100, 8, real=True)
    state, problem = _setup(case, list(range(8)), time_budget=5.0)
    assert subspace_candidates(problem, state) == 0


def test_b64_batch_needing_the_completion_step_is_exact() -> None:
    """A batch of 64 shipped Fashion-MNIST images through 784 -> 1000 -> 10 (seed 0).

    Peeling and the sparse solver leave directions missing here; the subspace step
    finds them and every example comes back exact.
    """
    from torch import nn

    import spear
    from spear import metrics
    from spear.data import builtin_images, sample_batch

    images, labels = sample_batch(builtin_images(), 64, seed=0)
    x = images.reshape(64, -1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 10)).double()
    loss = nn.functional.cross_entropy(net(x), labels)
    gw, gb = torch.autograd.grad(loss, [net[0].weight, net[0].bias])
    rec = spear.invert_layer(
        gw, gb, weight=net[0].weight.detach(), bias=net[0].bias.detach(), progress=False
    )
    assert rec.complete and rec.found == 64
    assert "subspace" in [s.name for s in rec.solvers]
    assert metrics.exact_rate(rec.inputs, x) == 1.0


def test_row_scans_stop_after_patience_idle_rows() -> None:
    """Both scans give up after ``patience`` rows in a row that yield nothing new."""
    case = layer_case(300, 100, 12, real=True, seed=2)
    state, problem = _setup(case, [0, 1, 2], time_budget=10.0)
    tried: list[torch.Tensor] = []

    def nothing(*args: object, **kwargs: object) -> None:
        tried.append(args[2])  # type: ignore[arg-type]
        return None

    assert subspace_candidates(problem, state, patience=7, direction_of=nothing) == 0
    assert len(tried) == 7
    tried.clear()
    dirty = torch.ones(state.left.shape[0], dtype=torch.bool)
    assert row_candidates(problem, state, dirty, patience=7, direction_of=nothing) == 0
    assert len(tried) == 7


def test_subspace_scan_takes_rows_on_for_few_examples_first() -> None:
    """The first candidate projected is that of the smallest usable row of the residual."""
    case = layer_case(300, 100, 12, real=True, seed=2)
    state, problem = _setup(case, [0, 1, 2], time_budget=5.0)
    rank = problem.rank
    idx, ratios = row_ratios(state, problem.tol)
    norms = state.left[idx].norm(dim=1)
    span = unknown_subspace(state, rank)
    first = span @ (span.T @ ratios[int(norms.argmin())])
    got: list[torch.Tensor] = []

    def capture(*args: object, **kwargs: object) -> None:
        got.append(args[2])  # type: ignore[arg-type]
        return None

    subspace_candidates(problem, state, direction_of=capture)
    torch.testing.assert_close(got[0], first)
