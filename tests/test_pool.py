"""The direction pool: one same-direction rule, removal up to sign, pruning of mixtures."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import layer_case, server_view

import spear
from spear.inversion.pool import (
    SAME_DIRECTION,
    DirectionPool,
    same_direction,
    same_direction_tolerance,
)
from spear.linalg import Tolerances


def _unit(*values: float) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float64)
    return v / v.norm()


def test_a_noisy_problem_pools_a_direction_once() -> None:
    """float32 directions found twice differ by about their noise floor (1e-3 here): the pool of
    a float32 problem takes one of them, a float64 problem's keeps its exact rule."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1000, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    again = u + 1e-3 * torch.randn(1000, generator=gen, dtype=torch.float64) / 1000**0.5
    again = again / again.norm()
    other = torch.randn(1000, generator=gen, dtype=torch.float64)
    other = other / other.norm()
    t32 = Tolerances.derive(torch.float32, 1e3, noise_floor=3e-5)
    t64 = Tolerances.derive(torch.float64, 1e3)
    assert same_direction_tolerance(t64.zero_tol) == SAME_DIRECTION
    noisy = DirectionPool([u], same_tol=same_direction_tolerance(t32.zero_tol))
    assert not noisy.add(again)
    assert noisy.add(other)
    exact = DirectionPool([u], same_tol=same_direction_tolerance(t64.zero_tol))
    assert exact.add(again)


def test_same_direction_is_up_to_sign_and_tight() -> None:
    u = _unit(1.0, 2.0, 3.0)
    assert same_direction(u, -u)
    tilted = _unit(1.0, 2.0, 3.0 + 1e-3)
    assert 1 - abs(float(u @ tilted)) > SAME_DIRECTION
    assert not same_direction(u, tilted)


def test_pool_adds_once_removes_up_to_sign_and_keeps_order() -> None:
    a, b, c = _unit(1.0, 0.0, 0.0), _unit(0.0, 1.0, 0.0), _unit(1.0, 1.0, 0.0)
    pool = DirectionPool([a])
    assert pool.add(b) and not pool.add(-a) and pool.add(c)
    assert len(pool) == 3 and pool.contains(-b)
    pool.remove(-b)
    assert [bool(torch.equal(d, e)) for d, e in zip(pool, [a, c], strict=True)] == [True, True]
    assert pool.stack(dim=1).shape == (3, 2)
    pool.keep_first(1)
    assert len(pool) == 1 and pool[:1][0] is a
    pool.clear()
    assert not pool


def test_drop_dependent_removes_the_mixture() -> None:
    case = layer_case(300, 100, 6, real=True, seed=4)
    fac, _, tol = server_view(case)
    cols = case.output_grads / case.output_grads.norm(dim=0)
    mix = cols[:, 0] + cols[:, 1]
    pool = DirectionPool([cols[:, 0], mix / mix.norm(), cols[:, 1], cols[:, 2]])
    assert pool.drop_dependent(fac.left, 6, tol.zero_tol) == 1
    assert len(pool) == 3
    assert not pool.contains(mix / mix.norm())


@pytest.mark.parametrize("zero_tol", [1e-3, 0.2])
def test_drop_dependent_judges_nothing_under_coarse_zero_tests(zero_tol: float) -> None:
    """Noisy updates' zero tolerances (1e-3 and up) would call true directions, 0.2 apart
    from each other's span, combinations: nothing is dropped, and nothing fails."""
    case = layer_case(300, 100, 6, real=True, seed=4)
    fac, _, _ = server_view(case)
    cols = case.output_grads / case.output_grads.norm(dim=0)
    pool = DirectionPool(cols[:, i] for i in range(4))
    assert pool.drop_dependent(fac.left, 6, zero_tol) == 0
    assert len(pool) == 4


def test_every_example_names_the_step_that_peeled_it() -> None:
    case = layer_case(400, 200, 12, real=True, seed=0)
    rec = spear.invert_layer(
        case.weight_grad, case.bias_grad, weight=case.weight, bias=case.bias, progress=False
    )
    assert rec.complete
    assert len(rec.found_by) == rec.found
    # each step's record counts exactly the examples credited to it
    for name in set(rec.found_by):
        assert sum(s.found for s in rec.solvers if s.name == name) == rec.found_by.count(name)
    assert sum(s.found for s in rec.solvers) == rec.found
