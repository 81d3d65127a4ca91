"""The problem, made once from the update: factorisation, batch size, tolerances, flags.

:meth:`Problem.build` turns a :class:`Request` (the arguments of
:func:`spear.invert_layer`) into a frozen :class:`Problem` (docs/algorithm.md, facts 1-2:
the rank of ``dW`` gives ``b``, its truncated SVD gives ``dW = L R``). Every step reads it;
none changes it (the sample budget and the random generator are the only mutable parts:
they are shared by the steps of one run).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import torch

from spear.downstream import Downstream, implied_whole, other_divisor
from spear.errors import BatchTooLargeError, InputError
from spear.labels import label_fit_tol
from spear.linalg import (
    RANK_FLOOR,
    ROUNDING_CLEARANCE,
    Factorisation,
    Tolerances,
    factorise,
    noise_floor,
    orthonormal_basis,
    rounding_rank,
)
from spear.solvers.base import Budget
from spear.solvers.polish import live_rows
from spear.update import UpdateKind
from spear.verify import LayerView, exact_precision

__all__ = [
    "HALF_PRECISIONS",
    "MIN_RANK_GAP",
    "STRICT_COMPLETE_SOLVES",
    "UNLIMITED_SAMPLES",
    "VERIFIED_MIN_ZERO_FRACTION",
    "Evidence",
    "Problem",
    "Request",
]

#: A rank is accepted only when ``s_b / s_{b+1}`` is at least this (exact gradients give
#: gaps of many orders of magnitude; pass ``batch_size`` for noisy ones).
MIN_RANK_GAP = 1e3
#: Noisy updates (DP noise): zero tolerance = this times sigma_{b+1} / sigma_b, capped.
NOISY_ZERO_FACTOR = 3.0
NOISY_MAX_ZERO_TOL = 0.2
#: Mixed-precision update dtypes: too few digits for exact recovery (refused).
HALF_PRECISIONS = (torch.float16, torch.bfloat16)
#: With the layer's weights (and no noise), peel a complete solve only when every example
#: verifies (:mod:`spear.inversion.steps.complete`); off, the verified part is peeled.
STRICT_COMPLETE_SOLVES = True
#: Sparsity threshold (``tau``) of the search when the layer's weights verify an exact
#: update (:attr:`Problem.strict`): every example is then checked against its own ReLU
#: pattern and every complete solve against the update, so sparsity only has to tell a
#: zero set from the ``r - 1`` rows a kernel is fitted to, which the solvers' structural
#: minimum of ``r`` zeros and the kernel tests do. Where the bias dominates small inputs
#: (conv features, norm about 1 over 400 entries, through an untrained 400 -> 120 layer),
#: most live units are on for the whole batch and true columns have 6 to 16 zeros among
#: 72 to 75 live units: under the request's default of 0.1 at b = 4.
VERIFIED_MIN_ZERO_FRACTION = 0.0
#: Sample cap standing for "no cap" when ``max_samples`` is not given: no search draws
#: this many, and the budget is not counted down from it.
UNLIMITED_SAMPLES = 10**12


@dataclass(frozen=True)
class Request:
    """The arguments of :func:`spear.invert_layer`, checked (see its docstring)."""

    weight_grad: torch.Tensor  # (m, n), any float dtype
    bias_grad: torch.Tensor | None  # (m,)
    weight: torch.Tensor | None  # (m, n)
    bias: torch.Tensor | None  # (m,)
    batch_size: int | None
    seed: int
    solver: str
    update_kind: UpdateKind
    time_budget: float
    max_samples: int | None
    zero_tol: float | None
    min_zero_fraction: float
    device: str | torch.device | None
    progress: bool | None
    search_with_weights: bool
    strict_solves: bool = STRICT_COMPLETE_SOLVES
    downstream: Downstream | None = None
    #: The power of two the update was divided by (:func:`spear.invert_layer`).
    scale: float = 1.0
    #: A Dropout right after the layer's ReLU was active (:func:`spear.invert_layer`).
    dropout: bool = False
    #: With ``dropout``: the model after the layer and the Dropout's ``p``, where known.
    masked: MaskedModel | None = None


@dataclass(frozen=True)
class MaskedModel:
    """The model after the layer (in eval mode) and the drop probability ``p`` of an
    active Dropout right after the layer's ReLU: run with an example's mask (its units
    on with a zero gradient entry dropped, the others scaled by ``1 / (1 - p)``), the
    model reproduces the client's pass for that example (:mod:`spear.dropout`)."""

    model: Downstream
    p: float


#: Two inputs are one example when they differ by at most this fraction of the larger's
#: norm (the same example reached twice carries the update's roundoff; two examples, or
#: an example and a mixture, differ by far more).
SAME_INPUT = 1e-3
#: An update read as a mean over more examples than it shows needs that count from this
#: many distinct inputs: one example counted twice, or two that merge at the update's
#: precision, make such a count, but a single mixture can fit one by chance.
CORROBORATE_LARGER_COUNT = 2
#: Distinct inputs kept per divisor, and examples whose columns fit cross-entropy.
MAX_SUPPORT = 64


def _is_new(inputs: torch.Tensor, seen: list[torch.Tensor]) -> bool:
    """Whether ``inputs`` ``(n,)`` differs from every input in ``seen`` (:data:`SAME_INPUT`)."""
    size = float(inputs.norm())
    return all(
        float((other - inputs).norm()) > SAME_INPUT * max(size, float(other.norm()))
        for other in seen
    )


@dataclass
class Evidence:
    """What the search has learnt about the update while it runs (shared by its steps).

    Attributes
    ----------
    shown:
        For each divisor of the whole update that examples' columns have shown with a
        plain cross-entropy fit (:func:`spear.downstream.implied_whole`: 1 for a plain
        sum, the count ``D`` for a plain mean), the distinct inputs ``(n,)`` that showed
        it.
    fitted:
        The divisor and input ``(n,)`` of each distinct example whose column fitted
        cross-entropy, plain or not (class weights give divisors of no plain form).
    rank, dtype:
        The number of examples the update shows and the precision of the checks (set by
        :meth:`tally`).
    """

    shown: dict[float, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    fitted: list[tuple[float, torch.Tensor]] = dataclasses.field(default_factory=list)
    rank: int = 0
    dtype: torch.dtype = torch.float64

    def tally(
        self, fit: float, divisor: float, inputs: torch.Tensor, rank: int, dtype: torch.dtype
    ) -> float | None:
        """Record an example ``inputs`` ``(n,)`` whose column fits cross-entropy to ``fit``
        with ``divisor`` (:meth:`spear.downstream.Downstream.cross_entropy_fit`) in an
        update of ``rank`` examples; returns the divisor of the whole update it shows
        (:func:`spear.downstream.implied_whole`), or ``None``."""
        self.rank, self.dtype = rank, dtype
        if not fit <= label_fit_tol(dtype):
            return None
        if len(self.fitted) < MAX_SUPPORT and _is_new(inputs, [x for _, x in self.fitted]):
            self.fitted.append((divisor, inputs.detach().clone()))
        whole = implied_whole(fit, divisor, rank, dtype)
        if whole is not None:
            support = self.shown.setdefault(whole, [])
            if len(support) < MAX_SUPPORT and _is_new(inputs, support):
                support.append(inputs.detach().clone())
        return whole

    @property
    def whole(self) -> float | None:
        """The update's divisor, or ``None``: the one shown by the most distinct inputs,
        among those shown by enough of them (one for a sum or a mean over ``rank``
        examples, :data:`CORROBORATE_LARGER_COUNT` for a mean over more) and not
        contradicted by two examples that share a divisor of another form
        (:func:`spear.downstream.other_divisor`); on a tie, the sum's or the rank's,
        else none."""
        plain = (1.0, float(self.rank))
        divisors = [d for d, _ in self.fitted]
        counts: dict[float, int] = {}
        for whole, support in self.shown.items():
            needed = 1 if whole in plain else CORROBORATE_LARGER_COUNT
            if len(support) >= needed and not other_divisor(divisors, whole, self.rank, self.dtype):
                counts[whole] = len(support)
        if not counts:
            return None
        most = max(counts.values())
        best = [w for w, c in counts.items() if c == most]
        if len(best) == 1:
            return best[0]
        preferred = [w for w in best if w in plain]
        return preferred[0] if len(preferred) == 1 else None


@dataclass(frozen=True)
class Problem:
    """One layer inversion, fixed before the search starts.

    Attributes
    ----------
    request:
        The arguments it was made from.
    fac:
        Truncated SVD ``dW = left @ right``, ``left`` ``(m, b)``, ``right`` ``(b, n)``.
    rank:
        ``b``: the batch size sought.
    bias_grad:
        ``(m,)`` float64 bias gradient, or ``None``.
    layer:
        The layer's weights in row-space coordinates, or ``None`` when not given.
    tol:
        Zero, degeneracy and separation tolerances.
    eps:
        Relative precision of the update (machine epsilon, or the noise level).
    in_dtype:
        The dtype the update arrived in.
    update_kind:
        ``"gradient"`` or ``"delta"``.
    noisy:
        The update is noisy (a batch size was given and no rank gap shows).
    strict:
        Complete solves are peeled only when every example verifies.
    guided:
        The weights also guide the search (row peeling, subspace, focused sampling), not
        only the verification.
    start, deadline:
        ``time.perf_counter()`` values of the start and of the end of the time budget.
    budget:
        Samples left to the solvers (shared, counted down) and the deadline.
    generator:
        The one random source of the run, seeded once.
    notes:
        Findings made while building the problem (rank, noise).
    evidence:
        What the search learns about the update as it runs (mutable).
    """

    request: Request
    fac: Factorisation
    rank: int
    bias_grad: torch.Tensor | None
    layer: LayerView | None
    tol: Tolerances
    eps: float
    in_dtype: torch.dtype
    update_kind: UpdateKind
    noisy: bool
    strict: bool
    guided: bool
    start: float
    deadline: float
    budget: Budget
    generator: torch.Generator
    notes: tuple[str, ...]
    evidence: Evidence = dataclasses.field(default_factory=Evidence)

    @property
    def delta(self) -> bool:
        """A FedAvg delta (ReLU masks may move between local steps)."""
        return self.update_kind == "delta"

    @property
    def m(self) -> int:
        """Output units of the layer."""
        return int(self.fac.left.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the attack computes."""
        return self.fac.left.device

    @property
    def min_zero_fraction(self) -> float:
        """The search's sparsity threshold: the request's, or at most
        :data:`VERIFIED_MIN_ZERO_FRACTION` when the weights verify an exact update."""
        tau = self.request.min_zero_fraction
        return min(tau, VERIFIED_MIN_ZERO_FRACTION) if self.strict else tau

    @property
    def downstream(self) -> Downstream | None:
        """The model after the layer, where it may find and check examples: given, the
        update an exact one-step gradient, and the weights given (the Jacobian at an
        input is the one the client used only when the ReLU patterns did not move)."""
        found = self.request.downstream
        usable = self.layer is not None and not self.noisy and not self.delta
        return found if usable else None

    def time_left(self) -> bool:
        """Whether the deadline has not passed."""
        return time.perf_counter() < self.deadline

    @functools.cached_property
    def original(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, b)`` orthonormal basis of the original ``dW`` and its live rows ``(m,)``."""
        full = orthonormal_basis(self.fac.left, self.rank)
        return full, live_rows(full, self.tol.zero_tol)

    @classmethod
    def build(cls, request: Request, start: float) -> Problem:
        """Factorise the update and fix the tolerances and flags (errors: see
        :func:`spear.invert_layer`)."""
        given = request.device
        dev = torch.device(given) if given is not None else request.weight_grad.device
        in_dtype = request.weight_grad.dtype
        _refuse_half_precision(in_dtype)
        eps = float(torch.finfo(in_dtype).eps)
        dw = request.weight_grad.detach().to(dev, torch.float64)
        db = request.bias_grad
        db = db.detach().to(dev, torch.float64) if db is not None else None
        notes: list[str] = []
        fac = _factorisation(dw, eps, request.batch_size, notes)
        rank = fac.rank
        tol = Tolerances.derive(
            in_dtype, fac.condition, noise_floor=noise_floor(fac.singular_values, rank)
        )
        noisy = request.batch_size is not None and fac.gap < MIN_RANK_GAP
        if noisy:
            tol, eps = _noisy_tolerances(fac, tol, eps, notes)
        if request.zero_tol is not None:
            z = request.zero_tol
            tol = Tolerances(eps=tol.eps, zero_tol=z, degeneracy_tol=z, separation=tol.separation)
        layer = _layer_view(request, fac, dev, dw, db)
        delta = request.update_kind == "delta"
        strict = (
            request.strict_solves
            and layer is not None
            and not delta
            and not noisy
            and exact_precision(eps)
        )
        generator = torch.Generator(device=dev)
        generator.manual_seed(request.seed)
        deadline = start + request.time_budget
        samples = request.max_samples or UNLIMITED_SAMPLES
        return cls(
            request=request,
            fac=fac,
            rank=rank,
            bias_grad=db,
            layer=layer,
            tol=tol,
            eps=eps,
            in_dtype=in_dtype,
            update_kind=request.update_kind,
            noisy=noisy,
            strict=strict,
            guided=request.search_with_weights,
            start=start,
            deadline=deadline,
            budget=Budget(deadline=deadline, max_samples=samples),
            generator=generator,
            notes=tuple(notes),
        )

    def weight_free(self) -> Problem:
        """The same update searched by plain sampling, without the weights' guidance.

        Built afresh (its own generator, seeded alike, and sample budget) at batch size
        :attr:`rank`, for the time left; the weights still verify what it finds.
        """
        now = time.perf_counter()
        request = dataclasses.replace(
            self.request,
            batch_size=self.rank,
            solver="sampling" if self.request.solver == "auto" else self.request.solver,
            time_budget=self.deadline - now,
            progress=False,
            search_with_weights=False,
        )
        return Problem.build(request, now)


def _digits(dtype: torch.dtype) -> int:
    """Significant decimal digits of a floating dtype (3 for float16, 2 for bfloat16)."""
    return int(-math.log10(torch.finfo(dtype).eps))


def _refuse_half_precision(in_dtype: torch.dtype) -> None:
    """Raise :class:`InputError` for float16 and bfloat16 updates."""
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


def _ratio(gap: float) -> str:
    """A rank gap for a note (``inf``: nothing past it stands above the rounding)."""
    return "inf: nothing past it above rounding" if math.isinf(gap) else f"{gap:.3g}"


def _factorisation(
    dw: torch.Tensor, eps: float, batch_size: int | None, notes: list[str]
) -> Factorisation:
    """Truncated SVD of ``dw`` ``(m, n)`` at its rank, or at ``batch_size`` (notes why)."""
    m, n = dw.shape
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
                f"m={m} or b > n={n} examples, or the update is noisy (DP-SGD), or it is a "
                "FedAvg delta of an optimiser that scales each coordinate on its own (Adam), "
                "which leaves no low-rank part. Pass batch_size= if it is known and smaller, "
                "or attack a wider layer."
            )
        if fac.gap >= MIN_RANK_GAP:
            return fac
        clear = rounding_rank(fac.singular_values, min(m, n), eps)
        live = int(dw.any(dim=1).sum())
        if clear is None or clear >= min(live, n):
            raise BatchTooLargeError(
                f"no clear rank gap in the weight gradient (largest ratio of consecutive "
                f"singular values {fac.gap:.3g} < {MIN_RANK_GAP:g}): the update looks noisy "
                "(DP-SGD), the batch fills the layer, it is a FedAvg delta of an "
                "optimiser that scales each coordinate on its own (Adam), or the gradients "
                "of confidently classified examples (a trained model) sink toward the "
                "update's rounding. Pass batch_size= to truncate at a known size."
            )
        # the values fall smoothly, then cleanly into the rounding's band: every value
        # before the band is an example's direction (the layer's live rows bound the
        # batch, so a rank of every live unit is no reading)
        notes.append(
            f"no clear rank gap in the weight gradient (largest ratio of consecutive "
            f"singular values {fac.gap:.3g}), but the values after the first {clear} "
            f"lie in the update's rounding (under {RANK_FLOOR:g} units of it, and none "
            f"{ROUNDING_CLEARANCE:g} times the value after it): reading {clear} examples "
            "(the gradients of confidently classified examples sink toward the "
            "rounding, and those in it cannot be recovered; pass batch_size= if the "
            "client's batch size is known)."
        )
        return factorise(dw, eps, rank=clear)
    s = fac.singular_values
    weak = rank < batch_size and fac.gap < MIN_RANK_GAP and batch_size < min(m, n)
    clear = rounding_rank(s, batch_size, eps) if weak else None
    if weak and clear == batch_size:
        # no clear rank below the batch size, and every direction up to it stands above
        # the rounding: the weakest examples (tiny gradients of confidently classified
        # ones) come close to the noise floor, which is no sign of duplicates
        gap = float(s[batch_size - 1] / s[batch_size])
        notes.append(
            f"no clear rank gap below batch_size={batch_size} (largest ratio of consecutive "
            f"singular values {fac.gap:.3g}, {gap:.3g} at the batch size): the weakest "
            "examples' directions come close to the update's noise floor; truncating at "
            f"{batch_size}."
        )
        rank = batch_size
    elif weak and clear is not None:
        # the weakest directions sink into the rounding: the ones above it are exact
        notes.append(
            f"no clear rank gap below batch_size={batch_size} (largest ratio of consecutive "
            f"singular values {fac.gap:.3g}), and the directions of the weakest "
            f"{batch_size - clear} of {batch_size} examples lie in the update's rounding "
            f"(under {RANK_FLOOR:g} units of it, and less than {ROUNDING_CLEARANCE:g} "
            "times the value after them: tiny gradients of confidently classified "
            "examples, examples whose gradients the rounding cannot tell apart, or a batch "
            f"size larger than the batch): truncating at the {clear} above it; examples "
            "whose gradients lie in the rounding cannot be recovered."
        )
        rank = clear
    elif weak:
        # directions up to the batch size sink into the rounding without a clean drop
        # into it: no exact answer there
        notes.append(
            f"no clear rank gap below batch_size={batch_size} (largest ratio of consecutive "
            f"singular values {fac.gap:.3g}, at rank {rank}), and the weakest of the "
            f"{batch_size} directions sink into the update's rounding without a clear "
            "drop into it (tiny gradients of confidently classified examples, or a batch "
            f"size larger than the batch): searching at rank {rank}, read as a noisy update."
        )
    elif rank < batch_size:
        notes.append(
            f"the weight gradient has rank {rank} < batch_size={batch_size}: some "
            f"examples are duplicates (or linearly dependent); recovering the {rank} "
            "distinct ones."
        )
    elif batch_size < rank < min(m, n) and fac.gap >= MIN_RANK_GAP:
        notes.append(
            f"the weight gradient shows {rank} examples (a clear rank gap, ratio "
            f"{_ratio(fac.gap)}), more than batch_size={batch_size}: if the batch size is "
            f"wrong, pass batch_size=None to read it off; truncating at {batch_size}."
        )
        rank = batch_size
    elif rank > batch_size:
        notes.append(
            f"the weight gradient's numerical rank is {rank} > batch_size={batch_size}: "
            f"the update is noisy; truncating at {batch_size}."
        )
        rank = batch_size
    return factorise(dw, eps, rank=rank)


def _noisy_tolerances(
    fac: Factorisation, tol: Tolerances, eps: float, notes: list[str]
) -> tuple[Tolerances, float]:
    """Looser zero tolerances and precision for a noisy update (and a note saying so).

    Noise fills the singular values past ``b``: zeros are only approximately zero, at a
    level set by the noise relative to the signal; results are best estimates.
    """
    s = fac.singular_values
    rank = fac.rank
    noise = float(s[rank] / s[rank - 1]) if rank < s.numel() else 0.0
    loose = min(NOISY_MAX_ZERO_TOL, max(tol.zero_tol, NOISY_ZERO_FACTOR * noise))
    notes.append(
        f"noisy update (rank gap {fac.gap:.3g}): zeros tested to {loose:.2g} relative and "
        "ReLU patterns allowed 10% disagreement; anything returned is an estimate, not "
        "exact (compare PSNR). Noise destroys the exact zeros the attack relies on."
    )
    return Tolerances(eps=tol.eps, zero_tol=loose, degeneracy_tol=loose), max(eps, loose)


def _layer_view(
    request: Request,
    fac: Factorisation,
    dev: torch.device,
    dw: torch.Tensor,
    db: torch.Tensor | None,
) -> LayerView | None:
    """The layer's weights in row-space coordinates (``None`` when not given); for a
    FedAvg delta, also the delta ``dw`` ``(m, n)``, ``db`` ``(m,)`` itself, at the scale of
    the weights, which bounds how far local training moved the ReLU patterns."""
    if request.weight is None:
        return None
    w64 = request.weight.detach().to(dev, torch.float64)
    bias = request.bias
    delta = request.update_kind == "delta"
    return LayerView(
        weight_coords=w64 @ fac.right.T,
        weight_abs_coords=w64.abs(),
        bias=bias.detach().to(dev, torch.float64) if bias is not None else None,
        right=fac.right,
        moved_coords=(dw @ fac.right.T) * request.scale if delta else None,
        moved_bias=db * request.scale if delta and db is not None and bias is not None else None,
        dropout=request.dropout,
    )
