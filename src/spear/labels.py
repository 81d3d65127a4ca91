"""Labels from the recovered inputs (docs/algorithm.md, "Labels").

For softmax cross-entropy, example ``i``'s gradient column at the attacked layer's
pre-activations is ``g_i = J_i^T (p_i - y_i) / B`` with ``J_i`` the Jacobian of the logits
with respect to those pre-activations (through the ReLU) and ``B`` the reduction's divisor
(the batch size for mean, 1 for sum). Solving ``J_i^T r_i = g_i`` gives
``r_i = (p_i - y_i) / B``, whose only negative entry is the label, whatever ``B`` is.
Comparing ``r_i`` with the softmax ``p_i`` of a forward pass gives ``B`` and, with it, the
reduction and how many times each example occurred (duplicates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from spear.linalg import TINY_NORM, least_squares

__all__ = ["LabelResult", "missing_labels", "recover_labels"]

#: ``r_i`` must match ``(p_i - e_y) / B`` to this relative error for the label (and the
#: divisor) to count as exact.
LABEL_FIT_TOL = 1e-6
#: Divisors above this are no batch size (a scaled update): the reduction is not read.
MAX_DIVISOR = 1e9
#: A count read from a divisor of relative error ``tol`` is whole only where
#: ``count * tol`` stays below this: beyond it neighbouring whole numbers lie within the
#: tolerance of each other (an update scaled by ``1e18`` reads as counts of about
#: ``1e17``, none of them whole).
MAX_COUNT_ULPS = 0.1
#: Entries of ``r_i`` below this fraction of its largest magnitude carry no sign.
SIGN_ZERO = 1e-9
#: Models of a coarser dtype (float32) compute the Jacobian and softmax with its roundoff:
#: the tolerance is then this many of its machine epsilons when that is larger
#: (measured on float32 MLPs, b = 64: fit errors up to 3e-6, 25 ulps).
LABEL_FIT_ULPS = 1000.0


#: Outputs whose log-sum-exp is within this many machine epsilons (of the model's dtype)
#: of zero are log-probabilities (a ``LogSoftmax`` head, trained with ``nll_loss``).
LOG_PROBABILITY_ULPS = 1000.0


def output_coefficients(
    jacobian: torch.Tensor, column: torch.Tensor, outputs: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``r`` ``(C,)`` with ``J^T r = column`` (least squares), for the Jacobian ``(C, m)``
    of the model's outputs ``(C,)`` at one example and its gradient column ``(m, 1)``.

    Where the outputs are log-probabilities (:data:`LOG_PROBABILITY_ULPS`), ``J`` loses
    the direction of the softmax ``p`` (``J^T p = 0``) and the minimum-norm solution
    drops ``r``'s component along it; cross-entropy's ``(p - e_y) / B`` sums to zero,
    which puts it back. ``nll_loss`` on log-probabilities is cross-entropy on them.
    """
    r = least_squares(jacobian.T, column)[:, 0]
    out = outputs.detach().to(torch.float64)
    if abs(float(torch.logsumexp(out, dim=0))) <= LOG_PROBABILITY_ULPS * float(
        torch.finfo(dtype).eps
    ):
        r = r - float(r.sum()) * torch.softmax(out, dim=0).to(r.device, r.dtype)
    return r


def label_fit_tol(dtype: torch.dtype) -> float:
    """Relative fit tolerance of ``r_i`` for a model of ``dtype`` (1e-6 for float64)."""
    return max(LABEL_FIT_TOL, LABEL_FIT_ULPS * float(torch.finfo(dtype).eps))


@dataclass
class LabelResult:
    """Labels and what the loss's scaling revealed.

    Attributes
    ----------
    labels:
        ``(k,)`` int64 class indices.
    divisor:
        ``(k,)`` the per-example divisor ``B_i = B / multiplicity_i`` (or ``B / clip
        factor`` under DP clipping).
    fit_error:
        ``(k,)`` relative error of ``r_i`` against ``(p_i - e_y) / B_i``.
    reduction:
        ``"mean"``, ``"sum"`` or ``"unknown"``.
    multiplicity:
        ``(k,)`` int64: how many times each example occurred in the batch (1 normally).
    sign:
        ``(k,)`` int64: ``+1`` where ``r_i`` has exactly one negative entry (the sign of a
        gradient), ``-1`` where it has exactly one positive entry (the sign of a FedAvg
        delta, minus the learning rate times gradients), ``0`` otherwise.
    fit_tol:
        The relative fit tolerance used (:func:`label_fit_tol` of the model's dtype).
    notes:
        Plain-language findings.
    unseen:
        Examples a plain mean counts in its divisor beyond those recovered and those
        known to be missing: their gradients are too small to show in the update
        (confidently classified, or zero), or combinations of the others' at the attacked
        layer (too few units separate the batch), so its rank leaves them out.
    """

    labels: torch.Tensor
    divisor: torch.Tensor
    fit_error: torch.Tensor
    reduction: str
    multiplicity: torch.Tensor
    sign: torch.Tensor
    fit_tol: float
    notes: list[str] = field(default_factory=list)
    unseen: int = 0

    @property
    def exact(self) -> bool:
        """Every label fits softmax cross-entropy to :attr:`fit_tol`."""
        return bool((self.fit_error <= self.fit_tol).all())


def recover_labels(
    after: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    output_grads: torch.Tensor,
    missing: int = 0,
    unit_scales: torch.Tensor | None = None,
) -> LabelResult:
    """Labels of the recovered examples from their gradient columns.

    Parameters
    ----------
    after:
        Maps the attacked layer's pre-activations ``(k, m)`` to logits ``(k, C)``.
    weight, bias:
        ``(m, n)`` and ``(m,)`` the attacked layer's parameters.
    features:
        ``(k, n)`` recovered inputs of the layer, in the model's dtype.
    output_grads:
        ``(m, k)`` float64 gradient columns of the recovered examples.
    missing:
        Distinct examples the update shows that were not recovered (a partial result):
        a mean's divisor then counts them too.
    unit_scales:
        ``(k, m)``: each example's pre-activations are multiplied by these before
        ``after`` (an active Dropout right after the layer's ReLU,
        :func:`spear.dropout.dropout_scales`); ``None``: none.

    Returns
    -------
    LabelResult
    """
    k = features.shape[0]
    dtype = weight.dtype

    def logits(z: torch.Tensor) -> torch.Tensor:
        out = after(z.clone())  # a copy: an in-place ReLU may not write into a leaf
        return out[0] if isinstance(out, (tuple, list)) else out

    feats = features.to(dtype).detach()
    with torch.no_grad():
        pre = torch.nn.functional.linear(feats, weight, bias)  # (k, m)
    labels = torch.zeros(k, dtype=torch.int64)
    divisor = torch.zeros(k, dtype=torch.float64)
    fit = torch.zeros(k, dtype=torch.float64)
    sign = torch.zeros(k, dtype=torch.int64)
    ranks = torch.zeros(k, dtype=torch.int64)
    classes = 0
    for i in range(k):
        z = pre[i : i + 1].detach()
        if unit_scales is not None:
            scales = unit_scales[i : i + 1].to(z.device, z.dtype)
            jac = torch.autograd.functional.jacobian(
                lambda t, s=scales: logits(t * s)[0], z
            )  # (C, 1, m)
            z = z * scales
        else:
            jac = torch.autograd.functional.jacobian(lambda t: logits(t)[0], z)  # (C, 1, m)
        j = jac[:, 0, :].to(torch.float64)  # (C, m)
        ranks[i], classes = _jacobian_rank(j, dtype), int(j.shape[0])
        # r at unit scale (an update of entries about 1e-300 would underflow r @ r); the
        # divisor is scaled back below
        column = output_grads[:, i : i + 1]
        size = float(column.abs().max()) or 1.0
        with torch.no_grad():
            outputs = logits(z)[0]
        r = output_coefficients(j, column / size, outputs, dtype)
        p = torch.softmax(outputs.detach().to(torch.float64), dim=0)
        sign[i] = _sign_vote(r)
        y = int(torch.argmin(r))
        target = p.clone()
        target[y] -= 1.0
        div = float(target @ r) / max(float(r @ r), TINY_NORM)
        labels[i] = y
        divisor[i] = div / size
        denom = float(target.norm()) or 1.0
        fit[i] = float((r * div - target).norm()) / denom
    result = _interpret(labels, divisor, fit, sign, label_fit_tol(dtype), missing, dtype)
    narrow = ranks < classes - 1
    if bool(narrow.any()):
        _undetermined(result, narrow, int(ranks.min()), classes)
    if classes == 2 and result.reduction == "unknown" and result.exact:
        _two_classes_unscaled(result)
    return result


def _two_classes_unscaled(result: LabelResult) -> None:
    """Mark every label of a two-class head undetermined where the examples' scales fit
    no plain mean or sum: there ``p - e_0 = -(p_1 / p_0) (p - e_1)``, so a column fits
    either label, at scales of opposite signs, and only a plain divisor tells which
    (label smoothing on a confidently classified example flips the column's sign)."""
    result.fit_error = torch.full_like(result.fit_error, math.inf)
    result.notes = [n for n in result.notes if "labels come from the sign pattern" not in n]
    result.notes.append(
        "with two classes a gradient column fits either label (at scales of opposite "
        "signs), and the examples' scales fit no plain mean or sum (label smoothing, "
        "clipping, weights): the labels are guesses from the columns' signs, not certified."
    )


def _jacobian_rank(jac: torch.Tensor, dtype: torch.dtype) -> int:
    """Rank of a ``(C, m)`` Jacobian of the logits, to the model dtype's rounding."""
    from spear.downstream import RANGE_RANK_ULPS

    s = torch.linalg.svdvals(jac)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > RANGE_RANK_ULPS * float(torch.finfo(dtype).eps) * float(s[0])).sum())


def _undetermined(result: LabelResult, narrow: torch.Tensor, rank: int, classes: int) -> None:
    """Mark the labels ``narrow`` ``(k,)`` bool that a bottleneck after the layer leaves
    undetermined: there the logits move in fewer than ``classes - 1`` dimensions (at
    least ``rank``), so ``(p - e_y) / B``, whose entries sum to zero, cannot be solved for
    from the column."""
    result.fit_error = torch.where(narrow, math.inf, result.fit_error)
    result.notes = [n for n in result.notes if "is the loss cross-entropy?" not in n]
    result.notes.append(
        f"at some examples the logits depend on the attacked layer through only {rank} of "
        f"the {classes - 1} dimensions {classes} classes need (a bottleneck after it): a "
        "gradient column does not determine its example's label there, so the labels are "
        "guesses and not certified."
    )


def _sign_vote(r: torch.Tensor) -> int:
    """``+1``: one clearly negative entry (a gradient); ``-1``: one positive (a delta).

    ``r`` ``(C,)`` is ``(p - e_y) / B`` up to the update's sign: ``C - 1`` entries of one
    sign and the label's of the other (with two classes the signs cannot tell). Entries
    within :data:`SIGN_ZERO` of the largest magnitude are not counted (a softmax can put
    almost no mass on a class).
    """
    big = r.abs() > SIGN_ZERO * float(r.abs().max())
    negative = int((big & (r < 0)).sum())
    positive = int((big & (r > 0)).sum())
    if negative == 1 and positive > 1:
        return 1
    if positive == 1 and negative > 1:
        return -1
    return 0  # two classes (one of each) or no clear pattern: undecided


def _counts_unseen(total: int, shown: int) -> bool:
    """Whether a mean's divisor ``total`` counts examples beyond the ``shown`` ones.

    Fewer than ``shown`` more: a divisor that counts twice the examples shown or more
    reads as an update scaled by a server weight (a mean of two clients' updates, say),
    not as a batch whose larger part left no trace.
    """
    return shown < total < 2 * shown


def _unseen_by_majority(divisor: torch.Tensor, ok: torch.Tensor, tol: float, shown: int) -> int:
    """Examples a mean counts beyond the ``shown`` ones, read off most divisors ``(k,)``
    (of the examples whose labels fit cross-entropy, ``ok`` ``(k,)`` bool).

    Where an example's gradient is small its divisor carries more rounding (measured in
    float32: one of 14 at ``2.5e-4`` from the others' 16, the fit tolerance ``1.2e-4``),
    so no plain mean is read; when more than half the divisors agree on a whole ``B``
    above ``shown``, the batch still has ``B`` examples and the rest are missing.
    """
    typical = float(divisor.median())
    if not (math.isfinite(typical) and typical <= MAX_DIVISOR):
        return 0
    whole = round(typical)
    if not _counts_unseen(whole, shown):
        return 0
    agree = int((ok & ((divisor - whole).abs() <= tol * whole)).sum())
    return whole - shown if 2 * agree > divisor.numel() else 0


def _weights_note(multiplicity: torch.Tensor, reduction: str) -> str:
    """What whole-number multiplicities ``(k,)`` say about the batch.

    An example counted ``c`` times and an example whose loss is weighted ``c`` times (class
    weights; clients of different batch sizes summed) give the same update, so the note
    names both. Multiplicities that no plain mean or sum adds up to (``reduction``
    ``"unknown"``) are weights, not copies.
    """
    k = multiplicity.numel()
    heavy = [(i, c) for i, c in enumerate(multiplicity.tolist()) if c > 1]
    if reduction == "unknown":
        weights = ", ".join(f"example {i} weighs {c}" for i, c in heavy)
        return (
            f"per-example loss weights differ by whole factors ({weights}): not a plain "
            "mean or sum, e.g. clients of different batch sizes summed or class weights; "
            "the multiplicities are relative weights, not copies."
        )
    counts = ", ".join(f"example {i} appears {c} times" for i, c in heavy)
    return (
        f"duplicates in the batch: {counts} ({int(multiplicity.sum())} examples in all, "
        f"{k} distinct), or per-example loss weights (class weights) of those sizes: the "
        "update is the same either way."
    )


def _count_tolerances(
    fit: torch.Tensor, ok: torch.Tensor, tol: float, total: int, dtype: torch.dtype | None
) -> float | None:
    """The relative tolerance of the examples' counts, or ``None`` where they cannot be
    read: without ``dtype``, ``tol`` where every fit is within it; with the model's
    ``dtype``, the tolerances of an example held to the established divisor ``total``
    (:func:`spear.downstream.held_tolerances`, never tighter than ``tol``) where some
    fits are within ``tol`` and the rest within the held fit tolerance. Below float64
    those are the inversion's own: examples solved after many peels carry the peels'
    roundoff in their divisors, and two examples whose columns agree to the update's
    rounding come back as their mean, which fits cross-entropy only as well as the two
    columns agree (measured on Flower's CNN, float32, b = 16: a solved example's
    divisor 6.4e-4 off, a merged pair's mean fitting to 1.4e-4 against ``tol``
    1.2e-4)."""
    if dtype is None:
        return tol if bool(ok.all()) else None
    from spear.downstream import held_tolerances  # spear.downstream imports this module

    held_fit, held_divisor = held_tolerances(dtype, float(max(total, 1)))
    if not bool(ok.any()) or not bool((fit <= max(tol, held_fit)).all()):
        return None
    return max(tol, held_divisor)


def _whole_counts(ratio: torch.Tensor, mult: torch.Tensor, tol: float, *, summed: bool) -> bool:
    """Whether ``ratio`` ``(k,)`` (each example's count under a plain mean or sum) is the
    whole counts ``mult`` ``(k,)``: each at least 1, within ``tol`` of a whole number, and
    small enough for that tolerance to tell neighbouring whole numbers apart (at most
    :data:`MAX_COUNT_ULPS` of ``tol``'s resolution), and, under a sum, not every count a
    multiple of one factor above 1: that is the sum scaled (by a learning rate or a server
    weight) as much as every example repeated, and the update cannot tell the two apart.
    """
    if not bool((mult >= 1).all()) or float(ratio.max()) * tol > MAX_COUNT_ULPS:
        return False
    if not bool(((ratio - mult).abs() <= tol * ratio).all()):
        return False
    return not summed or math.gcd(*(int(c) for c in mult.tolist())) == 1


def _interpret(
    labels: torch.Tensor,
    divisor: torch.Tensor,
    fit: torch.Tensor,
    sign: torch.Tensor,
    tol: float = LABEL_FIT_TOL,
    missing: int = 0,
    dtype: torch.dtype | None = None,
) -> LabelResult:
    """Reduction and multiplicities from the per-example divisors (fit tolerance ``tol``);
    ``missing`` distinct examples were not recovered, each counted at least once in a
    mean's divisor. With the model's ``dtype`` the counts are read to the tolerances of
    an example held to an established divisor (:func:`_count_tolerances`)."""
    notes: list[str] = []
    k = labels.numel()
    ok = fit <= tol
    top = float(divisor.max()) if k else 1.0
    multiplicity = torch.ones(k, dtype=torch.int64)
    reduction = "unknown"
    unseen = 0
    count_tol = (
        _count_tolerances(fit, ok, tol, round(top) if top >= 1.0 - tol else 1, dtype)
        if k and top <= MAX_DIVISOR
        else None
    )
    if count_tol is not None:
        # mean: B_i = total / multiplicity_i; sum: B_i = 1 / multiplicity_i
        total = round(top) if top >= 1.0 - tol else 1
        ratio = total / divisor
        mult = torch.round(ratio)
        if _whole_counts(ratio, mult, count_tol, summed=total == 1):
            multiplicity = mult.to(torch.int64)
            if total == 1:
                reduction = "sum" if k > 1 or int(multiplicity.sum()) > 1 else "mean or sum"
            elif total == int(multiplicity.sum()) or (
                missing and total >= int(multiplicity.sum()) + missing
            ):
                reduction = "mean"
            elif _counts_unseen(total, int(multiplicity.sum())) and not bool(
                (multiplicity > 1).any()
            ):
                # a mean over more examples than the update shows: the others' gradients
                # are below its precision (a plain mean over copies would show them too)
                reduction = "mean"
            if reduction == "mean":
                unseen = max(0, total - int(multiplicity.sum()) - missing)
    if reduction == "unknown" and k:
        unseen = _unseen_by_majority(divisor, ok, tol, k + missing)
    # where a label does not fit cross-entropy its scale says nothing: that note follows
    if reduction == "unknown" and k and bool(ok.all()):
        notes.append(
            "the per-example loss scales do not fit a plain mean or sum (per-example "
            "clipping, DP noise, FedAvg, clients summed, or the update scaled by a learning "
            "rate or server weight): labels come from the sign pattern only."
        )
    if bool((multiplicity > 1).any()):
        notes.append(_weights_note(multiplicity, reduction))
    bad = int((~ok).sum())
    if bad:
        notes.append(
            f"{bad} of {k} labels did not fit softmax cross-entropy exactly (fit error up to "
            f"{float(fit.max()):.1e}); is the loss cross-entropy?"
        )
    if unseen:
        shown = int(multiplicity.sum()) + missing
        notes.append(
            f"the loss is a mean over {shown + unseen} examples and the update shows "
            f"{shown}: {unseen} more examples do not show as examples of their own (their "
            "gradients are too small to show, from confidently classified examples, or "
            "they are combinations of the others' at the attacked layer, where too few "
            "units separate the batch), so they are not recovered and the batch is "
            f"incomplete (or the update was scaled by {shown}/{shown + unseen})."
        )
    return LabelResult(labels, divisor, fit, reduction, multiplicity, sign, tol, notes, unseen)


def missing_labels(
    model: torch.nn.Module,
    update: Mapping[str, torch.Tensor],
    after: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    found: LabelResult,
    count: int,
) -> torch.Tensor | None:
    """``(count,)`` labels of the examples whose inputs were not recovered.

    The classifier head's bias gradient is ``sum_i (p_i - e_{y_i}) / B_i`` over the batch.
    The recovered examples' terms are known exactly (their features ``(k, n)`` give
    ``p_i``; ``found`` their labels and divisors ``B_i``); what is left is the missing
    examples' sum, whose labels the LLG-style greedy count reads
    (:func:`spear.baselines.labels.greedy_count`). ``None`` when the head has no bias
    gradient in the update or ``found``'s labels are not exact (then their terms are not
    known).
    """
    from spear.baselines.labels import find_linear, greedy_count, parameter_name

    head = find_linear(model, last=True)
    if head is None or head[1].bias is None or not found.exact or count < 1:
        return None
    key = parameter_name(head[0], "bias")
    if key not in update:
        return None
    scores = update[key].detach().to(torch.float64).cpu()
    if features.shape[0]:
        with torch.no_grad():
            pre = torch.nn.functional.linear(features.to(weight.dtype), weight, bias)
            out = after(pre)
            logits = out[0] if isinstance(out, (tuple, list)) else out
        p = torch.softmax(logits.detach().to(torch.float64).cpu(), dim=1)  # (k, C)
        if p.shape[1] != scores.numel():
            return None
        p[torch.arange(p.shape[0]), found.labels] -= 1.0
        scores = scores - (p / found.divisor[:, None]).sum(dim=0)
    return greedy_count(scores, count)
