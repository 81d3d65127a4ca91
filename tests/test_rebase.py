"""Found examples solved again from the original update once peels have compounded."""

from __future__ import annotations

import torch
from tests.conftest import layer_case, problem_from

from spear.inversion.pool import DirectionPool
from spear.inversion.rebase import needs_rebase, rebase, residual_noise
from spear.inversion.residual import Residual

FOUND = 16  # of 20: the rest are missing


def _peeled(dtype: torch.dtype, error: float, seed: int = 0):  # type: ignore[no-untyped-def]
    """A problem, the truth ``(coords (b, b), grads (m, b))`` and a residual whose first
    :data:`FOUND` examples were peeled with coordinates and columns ``error`` off.

    The examples are ordered by how many units they turn on, most first: those a row
    peel finds before the others (each on at units where all the missing ones are off).
    """
    case = layer_case(300, 100, 20, real=True, seed=seed, dtype=dtype)
    problem = problem_from(case.weight_grad, case.bias_grad, case.weight, case.bias)
    order = torch.argsort((case.output_grads != 0).sum(dim=0), descending=True, stable=True)
    coords = (case.inputs @ problem.fac.right.T)[order]  # (b, b)
    grads = case.output_grads[:, order]  # (m, b)
    gen = torch.Generator().manual_seed(seed)
    bumped_c = coords[:FOUND] * (
        1 + error * torch.randn(FOUND, 20, generator=gen, dtype=torch.float64)
    )
    bumped_g = grads[:, :FOUND] * (
        1 + error * torch.randn(300, FOUND, generator=gen, dtype=torch.float64)
    )
    assert problem.bias_grad is not None
    residual = Residual(
        left=problem.fac.left - bumped_g @ bumped_c,
        bias=problem.bias_grad - bumped_g.sum(dim=1),
        coords=list(bumped_c),
        grads=list(bumped_g.T),
        directions=DirectionPool(same_tol=1e-6),
    )
    return problem, coords, grads, residual


def _worst(found: list[torch.Tensor], truth: torch.Tensor) -> float:
    """Largest relative distance of ``found`` rows from the truth's first rows."""
    stacked = torch.stack(found)
    return float(
        ((stacked - truth[: len(found)]).norm(dim=1) / truth[: len(found)].norm(dim=1)).max()
    )


def test_peels_solved_again_from_the_original_update_are_exact_to_its_precision() -> None:
    problem, coords, grads, residual = _peeled(torch.float32, 1e-4)
    missing = 20 - FOUND
    assert needs_rebase(problem, residual)
    before = _worst(residual.coords, coords)
    assert before > 1e-5
    rebased = rebase(problem, residual)
    assert rebased is not None
    # float32 roundoff of the update, far below the peels' errors
    assert _worst(rebased.coords, coords) < 1e-5 < before
    assert _worst(rebased.grads, grads.T) < 1e-5
    truth = grads[:, FOUND:] @ coords[FOUND:]
    assert float((rebased.left - truth).norm() / truth.norm()) < 1e-5
    # the residual shows the missing examples and nothing past them
    _, grown = residual_noise(rebased.left, missing)
    _, was = residual_noise(residual.left, missing)
    assert grown < 1e-3 * was
    assert not needs_rebase(problem, rebased)


def test_float64_peels_are_solved_again_to_float64_roundoff() -> None:
    problem, coords, _, residual = _peeled(torch.float64, 1e-8)
    assert needs_rebase(problem, residual)
    rebased = rebase(problem, residual)
    assert rebased is not None
    assert _worst(rebased.coords, coords) < 1e-11


def test_a_clean_residual_is_left_alone() -> None:
    problem, _, _, residual = _peeled(torch.float32, 0.0)
    assert not needs_rebase(problem, residual)


def test_a_wrong_peel_is_not_rebased_into_an_answer() -> None:
    """An example peeled at the wrong place (a tenth off) moves more than a rebase may
    correct; nothing is replaced."""
    problem, coords, _, residual = _peeled(torch.float32, 1e-4)
    residual.coords[0] = residual.coords[0] + 0.1 * coords[1]
    assert rebase(problem, residual) is None
