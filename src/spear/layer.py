"""Invert one linear layer followed by ReLU: ``(dW, db[, W, c]) -> inputs``.

The driver of the attack (docs/algorithm.md, facts 1-8):

1. the numerical rank of ``dW`` gives ``b``; its truncated SVD gives ``dW = L R``;
2. with the layer's weights, every row of ``dW`` gives a candidate (``dW[j] / db[j]``)
   whose own ReLU pattern yields the exact gradient direction of the nearest example;
   candidates two rows agree on are exact examples and are peeled off the gradient
   (fact 8; :mod:`spear.candidates`, verified by :mod:`spear.verify`);
3. a solver (:mod:`spear.solvers`) finds the sparse directions of what is left;
4. when some directions are still missing, row candidates projected on the subspace where
   the missing examples must lie give them
   (:func:`spear.candidates.subspace_candidates`), and row subsets steered by their
   predicted ReLU patterns find the rest (:func:`spear.focused.focused_sampling`); with
   all of them, the bias gradient fixes their scales and ``X`` follows; every example is
   verified again and the verified ones are peeled (facts 5-7);
5. 2-4 repeat until all ``b`` are found or the budget ends; only verified examples are
   returned, and a partial answer says how many of ``b`` are missing.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from spear import validate
from spear.candidates import (
    Residual,
    drop_dependent,
    guided_weights,
    pool_add,
    pool_remove,
    row_candidates,
    subspace_candidates,
)
from spear.errors import BatchTooLargeError, InputError, NoReluSparsityError
from spear.exhaustive import (
    EXHAUSTIVE_MAX_SUBSETS,
    candidate_directions,
    exhaustive_subsets,
    verified_combination,
)
from spear.focused import focused_sampling
from spear.linalg import (
    Tolerances,
    factorise,
    kernel,
    noise_floor,
    orthonormal_basis,
    unit_rows,
    zero_mask,
)
from spear.realizable import RealizabilityTest
from spear.results import LayerReconstruction, SolverStats
from spear.solvers import get_solver
from spear.solvers.base import Budget, Directions, SearchSpec
from spear.solvers.polish import live_rows
from spear.solvers.sampling import expected_samples
from spear.verify import LayerView, exact_precision, pattern_check, pre_activations

__all__ = ["invert_layer"]

#: A rank is accepted only when ``s_b / s_{b+1}`` is at least this (exact gradients give
#: gaps of many orders of magnitude; pass ``batch_size`` for noisy ones).
MIN_RANK_GAP = 1e3
#: Default minimal fraction of zero entries for a direction to count as a ReLU column.
DEFAULT_MIN_ZERO_FRACTION = 0.1
#: Noisy updates (DP noise): zero tolerance = this times sigma_{b+1} / sigma_b, capped.
NOISY_ZERO_FACTOR = 3.0
NOISY_MAX_ZERO_TOL = 0.2
#: Mixed-precision update dtypes: too few digits for exact recovery (refused).
HALF_PRECISIONS = (torch.float16, torch.bfloat16)
#: A failing complete solve is repaired (:func:`_repair_one_direction`) when at most this
#: many of its examples fail (a very wrong direction can make the bias scales fail every
#: example: measured 60 of 60 on a float32 batch of 64, repaired); the example completed
#: from the others takes the units it turns off by at least ``REPAIR_MARGIN`` of their
#: roundoff bound.
MAX_REPAIRS = 64
REPAIR_MARGIN = 1e-6
#: Updates whose largest entry lies outside this range are solved rescaled (exactly, by a
#: power of two): beyond it, sums of squares under- or overflow in float64.
SAFE_SCALE_LOW = 1e-100
SAFE_SCALE_HIGH = 1e100
#: Complete solves in a row that peel nothing before the search gives up on the rest.
MAX_FAILED_SOLVES = 3
#: Refinement of solved directions (:func:`_refine_columns`): a direction is replaced by its
#: projection on the kernel of its zero set when that keeps all but this much of it (the
#: accumulated peel error is orders of magnitude smaller, a different example larger);
#: the zero set is the units the example turns off by at least ``REFINE_MARGIN`` of their
#: roundoff bound, where the column is at most ``REFINE_SMALL`` of its largest entry.
REFINE_AGREEMENT = 1e-3
REFINE_MARGIN = 1e-8
REFINE_SMALL = 1e-6
#: With the layer's weights (and no noise), peel a complete solve only when every example
#: verifies (see ``peel_verified`` in :func:`invert_layer`); off, the verified part is
#: peeled.
STRICT_COMPLETE_SOLVES = True
#: Largest rank the plain sampling solver is asked to handle alone under ``solver="auto"``.
AUTO_SAMPLING_MAX_RANK = 20
#: Largest rank sampling still takes on when the sparse solver stalls (about H_r 2^(r-1)
#: samples: some 10^8 at 28, minutes on a laptop CPU).
SAMPLING_AFFORDABLE_RANK = 28
#: When no direction at all is found after this many times the samples expected for the
#: first one, the gradient is declared free of ReLU zeros.
NO_SPARSITY_FACTOR = 30.0


def _validate(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Raise :class:`InputError` when the arguments do not fit together."""
    if not isinstance(weight_grad, torch.Tensor) or weight_grad.dim() != 2:
        found = (
            f"shape {tuple(weight_grad.shape)}"
            if isinstance(weight_grad, torch.Tensor)
            else type(weight_grad).__name__
        )
        raise InputError(
            f"weight_grad must be a 2-D tensor (m, n) (out_features x in_features), found "
            f"{found}. For a convolution or a batched gradient, reshape to the linear "
            "layer's (out, in) first."
        )
    m, n = weight_grad.shape
    named = {"weight_grad": weight_grad, "bias_grad": bias_grad, "weight": weight, "bias": bias}
    expected = {"weight_grad": (m, n), "bias_grad": (m,), "weight": (m, n), "bias": (m,)}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, found {type(tensor).__name__}.")
        if tuple(tensor.shape) != expected[name]:
            raise InputError(
                f"{name} must have shape {expected[name]} to match weight_grad {(m, n)}, "
                f"found {tuple(tensor.shape)}. Pass the gradient and parameters of the same "
                "nn.Linear (weight is (out_features, in_features))."
            )
        if not tensor.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, found {tensor.dtype}.")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError(
                f"{name} contains {bad} NaN or infinite entries; the attack needs a finite "
                "update. Check the client's training (a diverged step) or the file it came "
                "from."
            )
    if weight is not None and bias_grad is not None and bias is None:
        # a layer with weights given but no bias is fine (bias=False layers); nothing to do
        pass


def _digits(dtype: torch.dtype) -> int:
    """Significant decimal digits of a floating dtype (3 for float16, 2 for bfloat16)."""
    return int(-math.log10(torch.finfo(dtype).eps))


def _unit_scale(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> float:
    """A power of two near the update's largest entry when that is far from 1, else 1.

    Entries outside ``[SAFE_SCALE_LOW, SAFE_SCALE_HIGH]`` make sums of squares under- or
    overflow in float64 (a norm of entries of size 1e-160 is 0).
    """
    largest = float(weight_grad.detach().abs().max())
    if bias_grad is not None:
        largest = max(largest, float(bias_grad.detach().abs().max()))
    if largest == 0.0 or SAFE_SCALE_LOW <= largest <= SAFE_SCALE_HIGH:
        return 1.0
    return float(2.0 ** math.floor(math.log2(largest)))


def _directions_missing(state: Residual, remaining: int, deadline: float) -> bool:
    """Some directions pooled but not all ``remaining``, and time left (weight-guided steps)."""
    return (
        bool(state.directions)
        and len(state.directions) < remaining
        and time.perf_counter() < deadline
    )


def _solve_complete(
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
        scales = torch.linalg.lstsq(cols, bias[:, None]).solution[:, 0]
        if bool((scales == 0).any()):
            return None
        grads = cols * scales
    coords = torch.linalg.lstsq(grads, left).solution  # (r, b)
    return coords, grads


def _complete_last(
    left: torch.Tensor,
    bias: torch.Tensor,
    basis: torch.Tensor,
    others: torch.Tensor,
    layer: LayerView,
    tol: Tolerances,
) -> torch.Tensor | None:
    """The direction ``(m,)`` of the one example that ``others`` ``(m, r-1)`` leave out.

    With ``r - 1`` true directions known, the last example is exact in a complete solve
    with *any* further column outside their span (fact 5: the filler mixes none of them
    into it); its own ReLU pattern then gives its direction, the kernel of the rows of
    ``basis`` ``(m, r)`` it clearly turns off (by ``REPAIR_MARGIN`` of their roundoff
    bound). This holds even when that zero set has just ``r - 1`` live rows, where
    sparsity alone cannot single the direction out. ``None`` when the kernel is not
    one-dimensional.
    """
    r = basis.shape[1]
    known = basis.T @ others  # (r, r-1)
    filler = basis @ torch.linalg.svd(known.T, full_matrices=True).Vh[-1]
    first = _solve_complete(left, bias, torch.cat([others, filler[:, None]], dim=1))
    if first is None:
        return None
    z, bound = pre_activations(layer, first[0][-1])
    off = z < -REPAIR_MARGIN * bound
    if int(off.sum()) < r - 1:
        return None
    kern, _ = kernel(basis[off], tol.degeneracy_tol)
    return basis @ kern[:, 0] if kern.shape[1] == 1 else None


def _repair_one_direction(
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
    again from the other ``r - 1`` (:func:`_complete_last`), and the solve with it is kept
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
        direction = _complete_last(left, bias, basis, others, layer, tol)
        if direction is None:
            continue
        repaired = torch.cat([cols[:, :i], direction[:, None], cols[:, i + 1 :]], dim=1)
        solved = _solve_complete(left, bias, repaired)
        if solved is not None and all_verify(*solved):
            return solved
    return None


def _joint_check(
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
    joint = _solve_complete(left, bias, grads / grads.norm(dim=0))
    if joint is None or len(verified(*joint, live)) < rank:
        return False
    coords, new_grads = joint
    state.coords = list(coords)
    state.grads = list(new_grads.T)
    return True


def _refine_columns(
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


def _not_refuted(test: RealizabilityTest) -> Callable[[torch.Tensor], bool]:
    """A zero-set filter that drops only the sets the test refutes outright."""
    return lambda zeros: not test.refutes(zeros)


def invert_layer(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    solver: str = "auto",
    update_kind: str = "gradient",
    time_budget: float = 120.0,
    max_samples: int | None = None,
    zero_tol: float | None = None,
    min_zero_fraction: float = DEFAULT_MIN_ZERO_FRACTION,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    search_with_weights: bool = True,
) -> LayerReconstruction:
    """Rebuild the ``b`` inputs of a linear layer followed by ReLU from its gradient.

    Parameters
    ----------
    weight_grad:
        ``(m, n)`` gradient (or FedAvg delta) of the layer's weight; any float dtype.
    bias_grad:
        ``(m,)`` gradient of its bias, or ``None`` for a layer without bias (inputs then
        come out only up to a positive scale each; see notes).
    weight, bias:
        ``(m, n)`` and ``(m,)``: the layer's parameters as the server sent them. Optional,
        but they enable peeling and the per-example verification (facts 7-8).
    batch_size:
        ``b`` when known; otherwise the numerical rank of ``weight_grad``.
    seed:
        Seed of every random choice (the result is deterministic given it).
    solver:
        ``"auto"`` (peeling, then sampling or the sparse solver by size), or a name from
        :func:`spear.solvers.available`.
    update_kind:
        ``"gradient"`` (FedSGD, DP clipping) or ``"delta"`` (FedAvg weight differences;
        the sign is irrelevant). Deltas let ReLU masks move between local steps.
    time_budget:
        Seconds after which the search stops and what is verified so far is returned.
    max_samples:
        Optional cap on samples drawn by the solvers.
    zero_tol:
        Relative zero tolerance; by default derived from the dtype and conditioning.
    min_zero_fraction:
        Fraction of zeros a direction needs to count as a ReLU column.
    device:
        Where to compute (``"cuda"`` when available); default: the gradient's device.
    progress:
        Show a progress bar of examples recovered; default: only on a terminal.
    search_with_weights:
        Use the weights to find examples (row candidates, guided sampling) and not only
        to verify them. When the guided search stalls on a small problem, a search
        without guidance runs in the remaining time and its examples are verified with
        the weights all the same.

    Returns
    -------
    LayerReconstruction
        ``.inputs`` ``(k, n)`` float64 of verified examples, ``k == b`` when complete.

    Raises
    ------
    InputError
        Shapes do not fit, non-finite values, unknown options.
    BatchTooLargeError
        The rank cannot reveal ``b`` (``b >= m`` or ``b > n``).
    NoReluSparsityError
        The gradient has no exact zeros where a ReLU would put them.
    """
    validate.batch_size(batch_size)
    validate.time_budget(time_budget)
    validate.device(device)
    start = time.perf_counter()
    _validate(weight_grad, bias_grad, weight, bias)
    if solver != "auto":
        get_solver(solver)  # an unknown name fails here, before any work
    validate.update_kind(update_kind)
    scale = _unit_scale(weight_grad, bias_grad)
    if scale != 1.0:
        # far from 1, squares under- or overflow inside the linear algebra; a power of two
        # rescales exactly and leaves the inputs unchanged (they are ratios of the two)
        rescaled = invert_layer(
            weight_grad / scale,
            bias_grad / scale if bias_grad is not None else None,
            weight=weight,
            bias=bias,
            batch_size=batch_size,
            seed=seed,
            solver=solver,
            update_kind=update_kind,
            time_budget=max(1e-3, time_budget - (time.perf_counter() - start)),
            max_samples=max_samples,
            zero_tol=zero_tol,
            min_zero_fraction=min_zero_fraction,
            device=device,
            progress=progress,
            search_with_weights=search_with_weights,
        )
        rescaled.output_grads = rescaled.output_grads * scale
        rescaled.notes.append(
            f"the update's entries are of size about {scale:.1e}; it was solved rescaled "
            "by that power of two (exactly), and the gradient columns scaled back."
        )
        return rescaled
    dev = torch.device(device) if device is not None else weight_grad.device
    in_dtype = weight_grad.dtype
    if in_dtype in HALF_PRECISIONS:
        # measured at b = 16, m = 1000: float16 blurs the rank gap to about 5e2 and
        # bfloat16 to 3; what the exact path returns from them is far off (max abs
        # error 9 on [0, 1] images), so it is refused rather than returned as an answer
        raise InputError(
            f"the update arrived as {in_dtype} (a mixed-precision client): its entries carry "
            f"about {_digits(in_dtype)} significant digits, which blurs the rank gap that "
            "reveals the batch size and every zero test of the exact attack. Exact recovery "
            "needs float32 or float64 updates: have the client send its update in float32 "
            "(torch.autocast keeps parameters and their gradients in float32), or compare "
            "with an optimisation baseline (spear.baselines.gradient_matching)."
        )
    eps = float(torch.finfo(in_dtype).eps)
    dw = weight_grad.detach().to(dev, torch.float64)
    db = bias_grad.detach().to(dev, torch.float64) if bias_grad is not None else None
    m, n = dw.shape
    notes: list[str] = []
    if not bool(dw.any()):
        raise InputError(
            "weight_grad is identically zero: there is nothing to invert (every unit of the "
            "layer is off for every example, or the update was not computed)."
        )
    if batch_size is not None and (batch_size >= m or batch_size > n):
        raise BatchTooLargeError(
            f"batch_size={batch_size} cannot be recovered from a ({m}, {n}) layer: exact "
            f"recovery needs b < m={m} and b <= n={n}. Attack a wider layer, or a smaller "
            "batch."
        )
    fac = factorise(dw, eps)
    rank = fac.rank
    if batch_size is None:
        if rank >= min(m, n):
            raise BatchTooLargeError(
                f"the weight gradient has full rank {rank} = min(m, n) for a ({m}, {n}) "
                f"layer, so the batch size cannot be read off it: the batch may have b >= "
                f"m={m} or b > n={n} examples, or the update is noisy. Pass batch_size= if "
                "it is known and smaller, or attack a wider layer."
            )
        if fac.gap < MIN_RANK_GAP:
            raise BatchTooLargeError(
                f"no clear rank gap in the weight gradient (largest ratio of consecutive "
                f"singular values {fac.gap:.3g} < {MIN_RANK_GAP:g}): the update looks noisy "
                "(DP-SGD) or the batch fills the layer. Pass batch_size= to truncate at a "
                "known size."
            )
    else:
        if rank < batch_size:
            notes.append(
                f"the weight gradient has rank {rank} < batch_size={batch_size}: some "
                f"examples are duplicates (or linearly dependent); recovering the {rank} "
                "distinct ones."
            )
        elif rank > batch_size:
            notes.append(
                f"the weight gradient's numerical rank is {rank} > batch_size={batch_size}: "
                "the update is noisy; truncating at the given batch size."
            )
            rank = batch_size
        fac = factorise(dw, eps, rank=rank)
        rank = fac.rank
    sv = fac.singular_values
    tol = Tolerances.derive(in_dtype, fac.condition, noise_floor=noise_floor(sv, rank))
    noisy = batch_size is not None and fac.gap < MIN_RANK_GAP
    if noisy:
        # noise fills the singular values past b: zeros are only approximately zero, at a
        # level set by the noise relative to the signal; results are best estimates
        s = fac.singular_values
        noise = float(s[rank] / s[rank - 1]) if rank < s.numel() else 0.0
        loose = min(NOISY_MAX_ZERO_TOL, max(tol.zero_tol, NOISY_ZERO_FACTOR * noise))
        tol = Tolerances(eps=tol.eps, zero_tol=loose, degeneracy_tol=loose)
        eps = max(eps, loose)
        notes.append(
            f"noisy update (rank gap {fac.gap:.3g}): zeros tested to {loose:.2g} relative and "
            "ReLU patterns allowed 10% disagreement; anything returned is an estimate, not "
            "exact (compare PSNR). Noise destroys the exact zeros the attack relies on."
        )
    if zero_tol is not None:
        tol = Tolerances(
            eps=tol.eps, zero_tol=zero_tol, degeneracy_tol=zero_tol, separation=tol.separation
        )
    delta = update_kind == "delta"
    layer: LayerView | None = None
    if weight is not None:
        w64 = weight.detach().to(dev, torch.float64)
        layer = LayerView(
            weight_coords=w64 @ fac.right.T,
            weight_abs_coords=w64.abs(),
            bias=bias.detach().to(dev, torch.float64) if bias is not None else None,
            right=fac.right,
        )
    state = Residual(left=fac.left.clone(), bias=db, coords=[], grads=[], directions=[])
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    deadline = start + time_budget
    budget = Budget(deadline=deadline, max_samples=max_samples or 10**12)
    stats: list[SolverStats] = []
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=rank, desc="examples recovered", disable=not show, leave=False)

    # exact float64 patterns: a complete solve is peeled only when every example verifies
    # (a wrong direction damages the examples mixed into it by less than their units'
    # margins, so they pass, but its own column is non-zero where its example is off, so
    # that one fails). float32 and FedAvg deltas peel the verified part (their true
    # examples can fail on blurred or moved patterns; measured: strict float32 solves
    # stall at b = 64) and are checked as a whole at the end (:func:`_joint_check`)
    strict = (
        STRICT_COMPLETE_SOLVES
        and layer is not None
        and not delta
        and not noisy
        and exact_precision(eps)
    )
    # where the first non-strict solve peeled its verified part (examples from there on
    # may carry a wrong direction's damage until the whole is checked again)
    loose_from: list[int | None] = [None]

    @functools.cache
    def original() -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, b)`` orthonormal basis of the original ``dW`` and its live rows (lazily)."""
        full = orthonormal_basis(fac.left, rank)
        return full, live_rows(full, tol.zero_tol)

    def verified(coords: torch.Tensor, grads: torch.Tensor, live: torch.Tensor) -> list[int]:
        """Indices of a solve's examples that pass verification (``live``: ``(m,)`` bool).

        Without a bias gradient the sign is free and the pattern decides it: ``coords``
        and ``grads`` are flipped in place where the negated example passes.
        """
        if layer is None:
            return list(range(coords.shape[0]))
        accepted = []
        grad_zero = zero_mask(grads, tol.zero_tol)
        for i in range(coords.shape[0]):
            ok, _ = pattern_check(layer, coords[i], grad_zero[:, i], live, eps, delta)
            if not ok and state.bias is None:
                ok, _ = pattern_check(layer, -coords[i], grad_zero[:, i], live, eps, delta)
                if ok:
                    coords[i] = -coords[i]
                    grads[:, i] = -grads[:, i]
            if ok:
                accepted.append(i)
        return accepted

    def peel_verified(cols: torch.Tensor) -> int:
        """Solve with all remaining directions ``(m, r)``; peel the examples that verify.

        When some fail, every direction (of the examples found so far and of these) is
        refined against the original factorisation (:func:`_refine_columns`), which
        removes the roundoff that peels leave in the residual. With the bias gradient the
        whole batch is then solved from the original factorisation; when every example
        verifies, that solve replaces everything found. Otherwise (a wrong direction
        among these damages the examples mixed into it, fact 5, and may spoil the
        others' coordinates slightly) the residual is solved again with the refined
        directions, and the solve that verifies more examples is kept.

        Exact float64 one-step gradients are all or nothing: a wrong direction in the
        solve damages the coordinates of the examples mixed into it, and a damage smaller
        than their units' margins still passes verification (measured on 32x32 RGB, b =
        25: two such examples 6e-3 and 6e-4 off were returned, and the residual they left
        held no sparse direction any more). So when some fail, nothing is peeled; the
        directions of the failed examples leave the pool and the verified ones stay, for
        the search to find the missing ones.
        """
        r = cols.shape[1]
        solved = _solve_complete(state.left, state.bias, cols)
        live = live_rows(orthonormal_basis(state.left, r), tol.zero_tol)
        accepted = verified(*solved, live) if solved is not None else []
        if solved is not None and layer is not None and state.bias is not None:
            repaired = _repair_one_direction(
                state.left,
                state.bias,
                cols,
                sorted(set(range(r)) - set(accepted)),
                layer,
                tol,
                lambda c, g: len(verified(c, g, live)) == r,
                deadline,
            )
            if repaired is not None:
                solved, accepted = repaired, list(range(r))
        if layer is not None and len(accepted) < r:
            full_basis, full_live = original()
            old = state.found
            if solved is None:
                coords_new = torch.linalg.lstsq(cols, state.left).solution  # (r, b), unscaled
            else:
                coords_new = solved[0]
            cols_all, coords_all = cols, coords_new
            if old:
                found_grads = torch.stack(state.grads, dim=1)
                cols_all = torch.cat([found_grads / found_grads.norm(dim=0), cols], dim=1)
                coords_all = torch.cat([torch.stack(state.coords), coords_new])
            refined = _refine_columns(layer, full_basis, coords_all, cols_all, tol)
            joint = _solve_complete(fac.left, db, refined) if db is not None else None
            if joint is not None and db is not None:
                ok = verified(*joint, full_live)
                if len(ok) == rank:
                    coords, grads = joint
                    state.left, state.bias = fac.left.clone(), db.clone()
                    state.coords, state.grads = [], []
                    for i in ok:
                        if i >= old:
                            pool_remove(state.directions, grads[:, i] / grads[:, i].norm())
                        state.peel(coords[i], grads[:, i])
                    bar.update(rank - old)
                    return rank - old
            again = _solve_complete(state.left, state.bias, refined[:, old:])
            if again is not None:
                accepted_again = verified(*again, live)
                if len(accepted_again) > len(accepted):
                    solved, accepted = again, accepted_again
        if solved is None:
            return 0
        if strict and len(accepted) < r:
            for i in sorted(set(range(r)) - set(accepted)):
                pool_remove(state.directions, cols[:, i] / cols[:, i].norm())
            return 0
        coords, grads = solved
        if len(accepted) < r and loose_from[0] is None:
            loose_from[0] = state.found
        for i in accepted:
            pool_remove(state.directions, grads[:, i] / grads[:, i].norm())
            state.peel(coords[i], grads[:, i])
        bar.update(len(accepted))
        return len(accepted)

    def solve_exhaustively() -> int:
        """Small layers: every row subset, then verified combinations (all or nothing)."""
        full_basis, full_live = original()
        if db is None or layer is None or noisy:
            return 0
        if exhaustive_subsets(int(full_live.sum()), rank) > EXHAUSTIVE_MAX_SUBSETS:
            return 0
        t0 = time.perf_counter()
        directions, _ = candidate_directions(
            full_basis,
            full_live,
            tol.zero_tol,
            tol.degeneracy_tol,
            None if delta else _not_refuted(RealizabilityTest(layer, full_live, generator)),
            deadline,
        )

        def solve_and_verify(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            solved = _solve_complete(fac.left, db, cols)
            if solved is None or len(verified(*solved, full_live)) < rank:
                return None
            return solved

        def complete(others: torch.Tensor) -> torch.Tensor | None:
            assert db is not None and layer is not None
            return _complete_last(fac.left, db, full_basis, others, layer, tol)

        solved = verified_combination(
            full_basis,
            fac.left,
            db,
            layer,
            full_live,
            directions,
            tol.zero_tol,
            complete,
            solve_and_verify,
            deadline,
        )
        stats.append(
            SolverStats(
                "exhaustive",
                candidates=int(directions.shape[0]),
                found=rank if solved is not None else 0,
                seconds=time.perf_counter() - t0,
            )
        )
        if solved is None:
            return 0
        coords, grads = solved
        state.directions = []
        for i in range(rank):
            state.peel(coords[i], grads[:, i])
        bar.update(rank)
        return rank

    interrupted = False
    try:
        solve_exhaustively()
        dirty = torch.ones(m, dtype=torch.bool, device=dev)
        stalled_rounds = 0
        failed_solves = 0
        sparse_stalled = False
        while state.found < rank and time.perf_counter() < deadline:
            progressed = False
            if layer is not None and state.bias is not None and search_with_weights:
                t0 = time.perf_counter()
                before, pooled = state.found, len(state.directions)
                while True:
                    added = row_candidates(state, layer, tol, eps, delta, rank, dirty, deadline)
                    bar.update(added)
                    if added == 0:
                        break
                    new = torch.stack(state.grads[-added:], dim=1)
                    dirty = ~zero_mask(new, tol.zero_tol).all(dim=1)
                dirty = torch.zeros(m, dtype=torch.bool, device=dev)
                gained = state.found - before + len(state.directions) - pooled
                if gained > 0:
                    progressed = True
                    stats.append(
                        SolverStats(
                            "peeling",
                            candidates=len(state.directions) - pooled + state.found - before,
                            found=state.found - before,
                            seconds=time.perf_counter() - t0,
                        )
                    )
            remaining = rank - state.found
            if remaining == 0 or time.perf_counter() >= deadline:
                break
            drop_dependent(state, rank, tol)
            basis = orthonormal_basis(state.left, remaining)
            known = (
                unit_rows(torch.stack(state.directions) @ basis)
                if state.directions
                else torch.zeros(0, remaining, dtype=torch.float64, device=dev)
            )
            if known.shape[0] < remaining:
                name = solver
                if solver == "auto":
                    # sampling for small residuals, the sparse solver beyond; when the sparse
                    # solver stalls on a residual that sampling can still afford, sample
                    small = remaining <= AUTO_SAMPLING_MAX_RANK
                    affordable = remaining <= SAMPLING_AFFORDABLE_RANK and sparse_stalled
                    name = "sampling" if small or affordable else "sparse"
                search = get_solver(name)
                weights = (
                    guided_weights(state, layer, tol)
                    if layer is not None and search_with_weights
                    else None
                )
                spec = SearchSpec(
                    basis=basis,
                    target=remaining - known.shape[0],
                    zero_tol=tol.zero_tol,
                    degeneracy_tol=tol.degeneracy_tol,
                    separation=tol.separation,
                    min_zero_fraction=min_zero_fraction,
                    row_weights=weights,
                    known=known,
                    generator=generator,
                    on_progress=lambda k: bar.set_postfix_str(f"directions {k}"),
                )
                t0 = time.perf_counter()
                search_budget = budget
                if name == "sampling" and state.found == 0 and not state.directions and not noisy:
                    # a first, capped search: enough samples to find a direction many times
                    # over when ReLU zeros exist; none found means there are none
                    evidence = int(NO_SPARSITY_FACTOR * expected_samples(remaining) / remaining)
                    search_budget = Budget(
                        deadline=budget.deadline,
                        max_samples=min(budget.max_samples, max(evidence, 4 * 8192)),
                    )
                dirs: Directions = search(spec, search_budget)
                stat = SolverStats(
                    name,
                    samples=dirs.samples,
                    candidates=int(dirs.vectors.shape[0]),
                    seconds=time.perf_counter() - t0,
                )
                stats.append(stat)
                if budget.max_samples < 10**12:
                    budget.max_samples = max(0, budget.max_samples - dirs.samples)
                usable = dirs.vectors
                if layer is None and dirs.weak:
                    # weak directions need the layer's ReLU patterns to be confirmed
                    usable = dirs.vectors[: dirs.vectors.shape[0] - dirs.weak]
                added_dirs = sum(pool_add(state.directions, basis @ v) for v in unit_rows(usable))
                if name == "sparse" and not added_dirs:
                    sparse_stalled = True
                if added_dirs:
                    progressed = True
                elif (
                    not noisy
                    and state.found == 0
                    and not state.directions
                    and name == "sampling"
                    and dirs.samples >= search_budget.max_samples
                ):
                    bar.close()
                    raise NoReluSparsityError(
                        f"no sparse direction in {dirs.samples} samples (about "
                        f"{expected_samples(remaining) / remaining:.0f} find the first one when a "
                        "ReLU zeroes about half of each example's units): the gradient has no "
                        "exact zeros where a ReLU after the layer would put them. The attack "
                        "needs a ReLU (smooth activations such as GELU, tanh or sigmoid leave "
                        "none) and a noise-free update; for noisy (DP) updates pass batch_size= "
                        "and a larger zero_tol."
                    )

            if (
                layer is not None
                and search_with_weights
                and _directions_missing(state, remaining, deadline)
            ):
                t0 = time.perf_counter()
                pooled = subspace_candidates(state, layer, tol, eps, delta, rank, deadline)
                if pooled:
                    progressed = True
                    stats.append(
                        SolverStats("subspace", candidates=pooled, seconds=time.perf_counter() - t0)
                    )
            if (
                layer is not None
                and search_with_weights
                and not noisy
                and remaining > AUTO_SAMPLING_MAX_RANK
                and _directions_missing(state, remaining, deadline)
            ):
                t0 = time.perf_counter()
                exact_patterns = not delta and exact_precision(eps)
                pooled, draws = focused_sampling(
                    state, layer, tol, rank, generator, deadline, min_zero_fraction, exact_patterns
                )
                stats.append(
                    SolverStats(
                        "focused",
                        samples=draws,
                        candidates=pooled,
                        seconds=time.perf_counter() - t0,
                    )
                )
                if pooled:
                    progressed = True
            drop_dependent(state, rank, tol)
            if (
                layer is not None
                and state.bias is not None
                and search_with_weights
                and not noisy
                and remaining >= 2
                and len(state.directions) == remaining - 1
            ):
                # one direction missing: its example is exact in a solve with any filler
                # column, and its own ReLU pattern gives the direction (sparsity alone may
                # not single it out)
                last = _complete_last(
                    state.left,
                    state.bias,
                    basis,
                    torch.stack(state.directions, dim=1),
                    layer,
                    tol,
                )
                if last is not None and pool_add(state.directions, last / last.norm()):
                    progressed = True
            if len(state.directions) >= remaining:
                dirs_now = torch.stack(state.directions[:remaining]) @ basis  # (r, r)
                peeled = peel_verified(basis @ unit_rows(dirs_now).T)
                if stats and stats[-1].name != "peeling":
                    stats[-1].found += peeled
                if peeled:
                    progressed = True
                    failed_solves = 0
                    dirty = torch.ones(m, dtype=torch.bool, device=dev)
                else:
                    # a wrong pooled direction: drop it (strict: the failed examples' ones;
                    # otherwise the newest) and search again, a few times in a row
                    failed_solves += 1
                    state.directions = state.directions[: remaining - 1]
                    if failed_solves >= MAX_FAILED_SOLVES:
                        notes.append(
                            "the directions found did not yield verifiable examples for the "
                            f"last {remaining}; the sparsity pattern is ambiguous there."
                        )
                        break
            if not progressed:
                stalled_rounds += 1
                if stalled_rounds >= 2:
                    break
            else:
                stalled_rounds = 0
    except KeyboardInterrupt:
        # Ctrl-C: keep every example verified so far (a peel cut short may have added
        # its coordinates but not its gradient column: pairs are trimmed to match)
        interrupted = True
        kept = min(len(state.coords), len(state.grads))
        state.coords, state.grads = state.coords[:kept], state.grads[:kept]
        notes.append(f"interrupted (Ctrl-C): the {kept} examples verified until then are returned.")
    bar.close()
    if (
        not interrupted
        and state.found < rank
        and layer is not None
        and search_with_weights
        and not noisy
        and rank <= SAMPLING_AFFORDABLE_RANK
        and time.perf_counter() < deadline
    ):
        # the weight-guided search can stall where plain sampling does not (narrow
        # layers, ambiguous residuals): search again without them, verify with them
        alt = invert_layer(
            weight_grad,
            bias_grad,
            weight=weight,
            bias=bias,
            batch_size=rank,
            seed=seed,
            solver="sampling" if solver == "auto" else solver,
            update_kind=update_kind,
            time_budget=deadline - time.perf_counter(),
            max_samples=max_samples,
            zero_tol=zero_tol,
            min_zero_fraction=min_zero_fraction,
            device=device,
            progress=False,
            search_with_weights=False,
        )
        interrupted = alt.interrupted
        if alt.found > state.found:
            alt.notes.insert(0, "found by sampling without the weights' guidance.")
            alt.solvers = stats + alt.solvers
            alt.seconds = time.perf_counter() - start
            return alt
    start_loose = loose_from[0]
    if start_loose is not None and not (
        not interrupted and _joint_check(state, fac.left, db, original()[1], rank, verified)
    ):
        withheld = state.found - start_loose
        state.coords, state.grads = state.coords[:start_loose], state.grads[:start_loose]
        if withheld:
            notes.append(
                f"{withheld} examples found after a complete solve in which some example failed "
                "its check are withheld: a wrong direction in such a solve shifts the examples "
                "mixed into it without flipping their ReLU patterns, and they could not be "
                "solved again as a whole."
            )
    result = _finish(state, fac, tol, layer, eps, delta, rank, stats, start, notes, in_dtype)
    if noisy:
        result.verified = False  # patterns were allowed to disagree: estimates, not checks
    result.interrupted = interrupted
    return result


def _finish(
    state: Residual,
    fac: object,
    tol: Tolerances,
    layer: LayerView | None,
    eps: float,
    delta: bool,
    rank: int,
    stats: list[SolverStats],
    start: float,
    notes: list[str],
    in_dtype: torch.dtype,
) -> LayerReconstruction:
    """Assemble the result record from the state."""
    from spear.linalg import Factorisation

    assert isinstance(fac, Factorisation)
    dev = fac.left.device
    m = fac.left.shape[0]
    n = fac.right.shape[1]
    k = state.found
    if k:
        coords = torch.stack(state.coords)
        grads = torch.stack(state.grads, dim=1)
        inputs = coords @ fac.right
    else:
        inputs = torch.zeros(0, n, dtype=torch.float64, device=dev)
        grads = torch.zeros(m, 0, dtype=torch.float64, device=dev)
        coords = torch.zeros(0, rank, dtype=torch.float64, device=dev)
    full = fac.left @ fac.right
    denom = float(full.norm()) or 1.0
    residual = float((full - grads @ inputs).norm()) / denom
    zeros = zero_mask(grads, tol.zero_tol) if k else torch.zeros(m, 0, dtype=torch.bool)
    sparsity = zeros.to(torch.float64).mean(dim=0) if k else torch.zeros(0)
    consistency: torch.Tensor | None = None
    if layer is not None and k:
        live_all = live_rows(fac.left / fac.left.norm(dim=0).clamp_min(1e-300), tol.zero_tol)
        consistency = torch.tensor(
            [
                pattern_check(layer, coords[i], zeros[:, i], live_all, eps, delta)[1]
                for i in range(k)
            ],
            dtype=torch.float64,
        )
    verified = layer is not None and k > 0
    if verified and delta and not exact_precision(eps):
        # the delta tolerances let ReLU masks move between local steps; under float32's
        # coarser zero test a mixture of similar examples is pooled as a direction and can
        # pass them too (measured: one-step float32 deltas, 784 -> 512, b = 32, four of
        # twelve batches held 1 to 21 such examples, 0.4 to 0.7 off): verified only where
        # every pattern holds as for a single step
        assert layer is not None
        strict = [
            pattern_check(layer, coords[i], zeros[:, i], live_all, eps, False)[0] for i in range(k)
        ]
        loose = k - sum(strict)
        if loose:
            verified = False
            notes.append(
                f"{loose} of the {k} examples match their ReLU patterns only within the "
                "tolerance for masks that move between local steps (multi-step FedAvg); "
                f"in {in_dtype} a mixture of similar examples can match that as well, so the "
                "examples are returned unverified."
            )
    complete = k == rank
    if not complete:
        notes.append(
            f"partial recovery: {k} of {rank} examples recovered; {rank - k} "
            "remain (raise time_budget, or try another solver)."
        )
    if layer is None and k:
        notes.append(
            "the layer's weight and bias were not given: examples are backed by the sparsity "
            "of their gradient columns only, not checked against their own ReLU patterns "
            "(.verified is False); on real images sparsity alone can accept mixtures."
        )
    if state.bias is None and k:
        notes.append(
            "no bias gradient: each example is recovered only up to a scale factor (and, "
            "without the layer's weights, a sign); the rows of .inputs are those directions."
        )
    if in_dtype != torch.float64 and complete:
        notes.append(
            f"the gradient arrived as {in_dtype}: exact means to that precision (relative "
            f"residual of the factorisation {residual:.1e}, machine epsilon {eps:.1e})."
        )
    return LayerReconstruction(
        inputs=inputs,
        batch_size=rank,
        complete=complete,
        verified=verified,
        output_grads=grads,
        singular_values=fac.singular_values,
        rank_gap=fac.gap,
        sparsity=sparsity,
        consistency=consistency,
        residual=residual,
        precision=eps,
        solvers=stats,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
