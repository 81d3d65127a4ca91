"""The checks every example passes before it is returned (docs/algorithm.md, facts 6-7).

The one place the search reaches the pattern checks of :mod:`spear.verify` (an example's
gradient column is zero exactly where its own ``W x + c`` turns the unit off) and the
realizability test of :mod:`spear.realizable` (some input turns off exactly a zero set).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from spear.downstream import fits_whole, range_tolerance
from spear.inversion.problem import Problem
from spear.inversion.solve import verified_solve
from spear.linalg import zero_mask
from spear.realizable import RealizabilityTest
from spear.verify import exact_precision, pattern_check

__all__ = ["exact_patterns", "not_refuted", "verified_indices", "whole_batch_solve"]


def verified_indices(
    problem: Problem, coords: torch.Tensor, grads: torch.Tensor, live: torch.Tensor
) -> list[int]:
    """Indices of a solve's examples that pass verification.

    Every example's gradient column must be zero exactly where its own ReLU pattern puts
    it (:func:`spear.verify.pattern_check`) and, when the model after the layer is known
    (:attr:`Problem.downstream`), lie in the range of the Jacobian at its own input
    (:meth:`spear.downstream.Downstream.off_range`): a direction of a zero set whose
    kernel has several dimensions can be wrong by a small multiple of another example's
    column and still pass every pattern check, and the Jacobian catches it. The examples
    mixed into such a direction are shifted without leaving their Jacobian's range; once
    examples have fitted softmax cross-entropy with the divisor of a plain mean or sum
    (:attr:`spear.inversion.problem.Evidence.whole`), every example must fit that divisor
    (over its count of copies), and a shifted one fails (its divisor moves with the shift).

    Parameters
    ----------
    coords, grads:
        ``(r, b)`` row-space coordinates and ``(m, r)`` gradient columns of a solve.
        Without a bias gradient the sign is free and the pattern decides it: both are
        flipped in place where the negated example passes.
    live:
        ``(m,)`` bool: rows of the basis that are not zero.

    Returns
    -------
    list[int]
        Every index when the layer's weights are not given (nothing to check against).
    """
    layer = problem.layer
    if layer is None:
        return list(range(coords.shape[0]))
    eps, delta = problem.eps, problem.delta
    accepted = []
    grad_zero = zero_mask(grads, problem.tol.zero_tol)
    for i in range(coords.shape[0]):
        ok, _ = pattern_check(layer, coords[i], grad_zero[:, i], live, eps, delta)
        if not ok and problem.bias_grad is None:
            ok, _ = pattern_check(layer, -coords[i], grad_zero[:, i], live, eps, delta)
            if ok:
                coords[i] = -coords[i]
                grads[:, i] = -grads[:, i]
        if ok:
            accepted.append(i)
    downstream = problem.downstream
    if downstream is not None and accepted:
        pick = torch.tensor(accepted, device=coords.device)
        inputs = coords[pick] @ layer.right
        far, fit, divisor = downstream.checks(inputs, grads[:, pick])
        near = far <= range_tolerance(problem.tol.zero_tol)
        evidence, rank, dtype = problem.evidence, problem.rank, downstream.dtype
        for j in torch.nonzero(near).flatten().tolist():
            evidence.tally(float(fit[j]), float(divisor[j]), inputs[j], rank, dtype)
        whole = evidence.whole
        if whole is not None:
            # duplicates (an example counted c times) have the update's divisor over c
            near &= fits_whole(fit, divisor, whole, rank, dtype, copies=True)
        accepted = [i for i, ok in zip(accepted, near.tolist(), strict=True) if ok]
    return accepted


def exact_patterns(problem: Problem) -> bool:
    """The gradient's zero pattern is exactly the ReLU pattern (one step, fine dtype, no
    active Dropout after the ReLU)."""
    return not problem.delta and not problem.request.dropout and exact_precision(problem.eps)


def not_refuted(problem: Problem, live: torch.Tensor) -> Callable[[torch.Tensor], bool]:
    """A zero-set filter ``(m,) bool -> bool`` dropping only sets the realizability test
    refutes outright (``live``: ``(m,)`` bool rows considered). Needs the weights."""
    assert problem.layer is not None
    test = RealizabilityTest(problem.layer, live, problem.generator)
    return lambda zeros: not test.refutes(zeros)


def whole_batch_solve(
    problem: Problem, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The whole batch solved from the original factorisation with the unit directions
    ``cols`` ``(m, b)``: ``(coords (b, b), grads (m, b))`` when every example verifies
    (:func:`spear.inversion.solve.verified_solve`), else ``None`` (also without a bias
    gradient)."""
    db = problem.bias_grad
    if db is None:
        return None
    _, live = problem.original
    return verified_solve(
        problem.fac.left,
        db,
        cols,
        live,
        problem.rank,
        lambda c, g, rows: verified_indices(problem, c, g, rows),
    )
