"""Complete solves: with every direction of a (residual) problem known, ``X`` follows.

With all ``r`` unit gradient directions, the bias gradient fixes their scales and the
examples' coordinates follow by least squares (docs/algorithm.md, facts 5-7). This module
also holds the repairs of a solve with one wrong direction, the refinement of directions
against the original factorisation, and the joint check of everything found.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from spear.downstream import Downstream, range_tolerance
from spear.inversion.residual import Residual
from spear.linalg import Tolerances, kernel, least_absolute_fit, least_squares, orthonormal_basis
from spear.solvers.polish import live_rows
from spear.verify import LayerView, movement, pre_activations, pure_direction

__all__ = [
    "complete_last",
    "joint_check",
    "refine_columns",
    "repair_one_direction",
    "solve_complete",
    "verified_solve",
]

#: A failing complete solve is repaired (:func:`repair_one_direction`) when at most this
#: many of its examples fail (a very wrong direction can make the bias scales fail every
#: example: measured 60 of 60 on a float32 batch of 64, repaired); the example completed
#: from the others takes the units it turns off by at least ``REPAIR_MARGIN`` of their
#: roundoff bound.
MAX_REPAIRS = 64
REPAIR_MARGIN = 1e-6
#: Refinement of solved directions (:func:`refine_columns`): a direction is replaced by its
#: projection on the kernel of its zero set when that keeps all but this much of it (the
#: accumulated peel error is orders of magnitude smaller, a different example larger);
#: the zero set is the units the example turns off by at least ``REFINE_MARGIN`` of their
#: roundoff bound, where the column is at most ``REFINE_SMALL`` of its largest entry.
REFINE_AGREEMENT = 1e-3
REFINE_MARGIN = 1e-8
REFINE_SMALL = 1e-6


def solve_complete(
    left: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All directions of a (residual) problem known: scales from the bias, then coordinates.

    Parameters
    ----------
    left:
        ``(m, b)`` left factor of the (residual) weight gradient, ``dW = left @ right``.
    bias:
        ``(m,)`` its bias gradient, or ``None`` (unit columns are returned then).
    cols:
        ``(m, r)`` unit gradient directions of its ``r`` examples.

    Returns
    -------
    coords:
        ``(r, b)`` row-space coordinates of the examples.
    grads:
        ``(m, r)`` their gradient columns.
    """
    if bias is None:
        # no bias gradient: each example only up to scale (unit gradient columns)
        grads = cols
    else:
        scales = least_squares(cols, bias[:, None])[:, 0]
        if bool((scales == 0).any()):
            return None
        grads = cols * scales
    coords = least_squares(grads, left)  # (r, b)
    return coords, grads


def complete_last(
    left: torch.Tensor,
    bias: torch.Tensor,
    basis: torch.Tensor,
    others: torch.Tensor,
    layer: LayerView,
    tol: Tolerances,
    downstream: Downstream | None = None,
    original: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The direction ``(m,)`` of the one example that ``others`` ``(m, r-1)`` leave out.

    With ``r - 1`` true directions known, the last example is exact in a complete solve
    with *any* further column outside their span (fact 5: the filler mixes none of them
    into it); its own ReLU pattern then gives its direction, the kernel of the rows of
    ``basis`` ``(m, r)`` it clearly turns off (by ``REPAIR_MARGIN`` of their roundoff
    bound). This holds even when that zero set has just ``r - 1`` live rows, where
    sparsity alone cannot single the direction out.

    Every peel leaves its roundoff in the residual (:func:`refine_columns`): after many
    float32 peels the last example's column lies further from the residual's column space
    than the degeneracy tolerance, and the kernel there is empty. ``original`` ``(m, b)``,
    the orthonormal basis of the original ``dW``, carries no such error: the same rows of
    it have the example's direction as their kernel (measured on float32 Fashion-MNIST,
    ``784 -> 1000``, b = 128, after 115 peels: smallest singular value of the residual's
    rows ``7.8e-5`` against a limit of ``6.7e-5``, of the original's ``2.5e-7``, the
    direction within ``1e-12`` of the truth). Either kernel must be one-dimensional; the
    example's whole solve is verified afterwards as always.

    A FedAvg delta's columns are zero where the example was off at the step that used it,
    and local training moves some units across zero even beyond the delta's own measure
    of the movement (fact 11; measured on ``784 -> 1000 -> 128 -> 10``, float64, b = 128,
    one epoch in mini-batches of 8: 41 of the 489 units the sent weights switch off for
    an example carry its update). A kernel of those rows is then empty; the direction is
    ``filler`` plus the combination of ``others`` that is zero on most of them, an L1 fit
    (:func:`least_absolute_fit`) exact on the rest (:func:`_least_absolute_last`).

    When none of these is, the range of the Jacobian at the example (``downstream``, the
    model after the layer) singles it out (:mod:`spear.downstream`); ``None`` when nothing
    does.
    """
    known = basis.T @ others  # (r, r-1)
    filler = basis @ torch.linalg.svd(known.T, full_matrices=True).Vh[-1]
    first = solve_complete(left, bias, torch.cat([others, filler[:, None]], dim=1))
    if first is None:
        return None
    coord = first[0][-1]
    z, bound = pre_activations(layer, coord)
    off = z < -REPAIR_MARGIN * bound
    for rows in (basis, original):
        if rows is None or int(off.sum()) < rows.shape[1] - 1:
            continue
        kern, _ = kernel(rows[off], tol.degeneracy_tol)
        if kern.shape[1] == 1:
            return rows @ kern[:, 0]
    moved = movement(layer, coord)
    if moved is not None:
        fitted = _least_absolute_last(basis, others, filler, off & (z.abs() > moved), tol)
        if fitted is not None:
            return fitted
    if downstream is None:
        return None
    x = (coord @ layer.right)[None]
    return downstream.directions(basis, x, range_tolerance(tol.zero_tol))[0]


def _least_absolute_last(
    basis: torch.Tensor,
    others: torch.Tensor,
    filler: torch.Tensor,
    off: torch.Tensor,
    tol: Tolerances,
) -> torch.Tensor | None:
    """The last direction ``(m,)`` when a minority of its predicted-off units ``off``
    ``(m,)`` bool carry an update (:func:`complete_last`), or ``None``.

    The direction is ``filler + others @ c`` up to scale (``others`` ``(m, r-1)`` and
    ``filler`` ``(m,)`` span the residual's column space, ``basis`` ``(m, r)``); ``c``
    makes it zero on as much of ``off`` as an L1 fit can. The fit is then settled on its
    own zero set: that set must have a pure one-dimensional kernel, whose vector is
    returned, exact to the basis's roundoff.
    """
    if int(off.sum()) < basis.shape[1] - 1:
        return None
    coeffs = least_absolute_fit(filler[off], others[off])
    if coeffs is None:
        return None
    return pure_direction(basis, filler + others @ coeffs, live_rows(basis, tol.zero_tol), tol)


def repair_one_direction(
    left: torch.Tensor,
    bias: torch.Tensor,
    cols: torch.Tensor,
    failing: list[int],
    layer: LayerView,
    tol: Tolerances,
    all_verify: Callable[[torch.Tensor, torch.Tensor], bool],
    deadline: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A complete solve with one wrong direction, repaired from the others.

    A wrong direction (a mixture) fails its own example and damages the examples mixed
    into it, so a failing solve has a few failing examples, one of them the wrong one's.
    For each failing index ``i`` (at most :data:`MAX_REPAIRS`), direction ``i`` is made
    again from the other ``r - 1`` (:func:`complete_last`), and the solve with it is kept
    when every example verifies.

    Parameters
    ----------
    left, bias:
        ``(m, b)`` and ``(m,)``: the (residual) problem.
    cols:
        ``(m, r)`` unit directions of the failing solve.
    failing:
        Indices of its examples that failed verification.
    all_verify:
        Whether every example of a solve ``(coords (r, b), grads (m, r))`` verifies.
    deadline:
        ``time.perf_counter()`` value after which no further index is tried.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor] | None
        The repaired solve ``(coords, grads)``, or ``None``.
    """
    r = cols.shape[1]
    if not failing or len(failing) > MAX_REPAIRS or r < 2:
        return None
    basis = orthonormal_basis(left, r)
    for i in failing:
        if time.perf_counter() > deadline:
            return None
        others = torch.cat([cols[:, :i], cols[:, i + 1 :]], dim=1)  # (m, r-1)
        direction = complete_last(left, bias, basis, others, layer, tol)
        if direction is None:
            continue
        repaired = torch.cat([cols[:, :i], direction[:, None], cols[:, i + 1 :]], dim=1)
        solved = solve_complete(left, bias, repaired)
        if solved is not None and all_verify(*solved):
            return solved
    return None


def joint_check(
    state: Residual,
    left: torch.Tensor,
    bias: torch.Tensor | None,
    live: torch.Tensor,
    rank: int,
    verified: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[int]],
) -> bool:
    """Solve every example again from the original factorisation; keep it if all verify.

    Examples peeled from a complete solve in which another example failed have true
    directions (each passed its own pattern with its own column) but coordinates a wrong
    direction may have shifted. With all ``b`` directions found, one complete solve from
    the original ``left`` ``(m, b)`` and ``bias`` ``(m,)`` recomputes every coordinate;
    when every example of it verifies, it replaces what was peeled (in place) and the
    result is checked as a whole. Returns whether that happened.
    """
    if bias is None or state.found < rank:
        return False
    grads = torch.stack(state.grads, dim=1)
    joint = verified_solve(left, bias, grads / grads.norm(dim=0), live, rank, verified)
    if joint is None:
        return False
    coords, new_grads = joint
    state.coords = list(coords)
    state.grads = list(new_grads.T)
    return True


def verified_solve(
    left: torch.Tensor,
    bias: torch.Tensor,
    cols: torch.Tensor,
    live: torch.Tensor,
    rank: int,
    verified: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[int]],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The complete solve (:func:`solve_complete`) of ``left`` ``(m, b)`` and ``bias``
    ``(m,)`` with the unit directions ``cols`` ``(m, b)``, when all ``rank`` of its
    examples verify (``verified(coords, grads, live)`` lists those that do); else ``None``.
    """
    joint = solve_complete(left, bias, cols)
    if joint is None or len(verified(*joint, live)) < rank:
        return None
    return joint


def refine_columns(
    layer: LayerView,
    full_basis: torch.Tensor,
    coords: torch.Tensor,
    cols: torch.Tensor,
    tol: Tolerances,
) -> torch.Tensor:
    """Gradient directions projected on their exact zero sets in the original basis.

    Every peel leaves its roundoff in the residual, so directions found in the residual
    vanish on their example's off-units only to that accumulated error (measured on
    32x32 RGB, b = 25, m = 2000, after 20 peels: 1e-11 relative, above the zero tolerance,
    so true examples failed verification). The units a solved example clearly turns off
    and where its column is already small select rows of the *original* basis; the column
    is projected on their kernel (fact 7). The kernel may hold other examples' columns
    too (an example whose on-units are a subset of this one's): the projection keeps
    the column, removes the drift off the kernel, and leaves it exactly zero there. A
    column that the projection would change by more than ``REFINE_AGREEMENT`` (a wrong
    direction) is kept as it was.

    Parameters
    ----------
    full_basis:
        ``(m, b)`` orthonormal basis of the original ``dW`` column space.
    coords:
        ``(r, b)`` the examples' coordinates from a first solve.
    cols:
        ``(m, r)`` their unit gradient directions.

    Returns
    -------
    torch.Tensor
        ``(m, r)`` unit directions, refined where the refinement agrees with the input.
    """
    out = cols.clone()
    b = full_basis.shape[1]
    z, bound = pre_activations(layer, coords)  # (m, r) each
    clear_off = z < -REFINE_MARGIN * bound
    small_tol = max(REFINE_SMALL, tol.zero_tol)  # float32: its zero tolerance is larger
    small = cols.abs() <= small_tol * cols.abs().amax(dim=0, keepdim=True)  # (m, r)
    for i in range(coords.shape[0]):
        rows = full_basis[clear_off[:, i] & small[:, i]]
        if rows.shape[0] < b - 1:
            continue
        kern, _ = kernel(rows, tol.degeneracy_tol)  # (b, d)
        if kern.shape[1] == 0:
            continue
        u = kern @ (kern.T @ (full_basis.T @ cols[:, i]))
        if float(u.norm()) > 1.0 - REFINE_AGREEMENT:
            out[:, i] = full_basis @ (u / u.norm())
    return out
