"""Where noise hides the batch: the gradient-matching estimate a noisy update gets.

When the approximate answer of a noisy update (:mod:`spear.noisy`) does not explain it,
:func:`best_noisy_estimate` runs gradient matching (:mod:`spear.baselines.gradient_matching`,
as the benchmark's baseline runs it) several times and returns the mean of the runs,
aligned example by example (:func:`aligned_mean`). Where the noise hides the examples,
each run lands in a different local optimum around the truth, and averaging them
cancels part of their independent errors: at b = 16 on Fashion-MNIST (float32 Opacus
clients, noise 3e-3, ten batches) the mean of four runs raised the median PSNR of a
single run by 0.1 to 1.6 dB (median 0.5) on every batch, and its SSIM on nine of ten.
Labels come from the classifier's gradient (the baseline's count) or from the
approximate estimate, whichever lets gradient matching fit the update better. The
approximate estimate itself is returned where it fits the update better still. Nothing
returned here is verified.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from spear.certificate import certify
from spear.model import parameter_dtype
from spear.results import Reconstruction
from spear.update import UpdateKind

__all__ = [
    "ENSEMBLE_RUNS",
    "FIT_MARGIN",
    "NOISY_ESTIMATE_ITERATIONS",
    "Estimate",
    "aligned_mean",
    "best_noisy_estimate",
    "label_assignment",
]

#: Iterations of each gradient-matching run (the benchmark's baseline runs as many).
NOISY_ESTIMATE_ITERATIONS = 200
#: A gradient-matching estimate (or labels) replaces another only when its certificate is
#: lower by more than this fraction; the approximate estimate needs no margin (see
#: :func:`best_noisy_estimate`). Measured: gradient matching's certificate varies by 1.0%
#: to 3.1% over six seeds on the same update (float32 Opacus clients, Fashion-MNIST,
#: b = 8 to 64, noise 1e-3 and 3e-3), so a smaller gain is the luck of a run, not a
#: better estimate.
FIT_MARGIN = 0.05
#: Gradient-matching runs from random inputs averaged into the estimate (fewer where the
#: time budget does not hold them all). Measured at b = 16 (see the module doc): the mean
#: of two runs gained 0.0 to 1.0 dB over one (three batches), of four 0.1 to 1.6 dB.
ENSEMBLE_RUNS = 4


@dataclasses.dataclass(frozen=True, eq=False)
class Estimate:
    """A candidate answer for a noisy update: ``inputs`` ``(k, *input_shape)``, ``labels``
    ``(k,)`` or ``None``, the ``certificate`` (relative error of the update recomputed
    from them, ``None`` when not computable), ``source``
    (:attr:`spear.results.Reconstruction.estimate`) and ``what`` (how a gradient-matching
    estimate was made, for the note; ``""`` otherwise)."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    certificate: float | None
    source: str
    what: str


def aligned_mean(
    runs: list[torch.Tensor], labels: list[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """The mean of several reconstructions of one batch, example by example.

    Each run ``(k, *shape)`` is put in the order of the first by an optimal assignment
    (:func:`scipy.optimize.linear_sum_assignment`) on squared distances; where ``labels``
    ``(k,)`` are given for both runs, examples are paired with examples of the same label
    wherever the label counts allow.

    Examples
    --------
    >>> a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> aligned_mean([a, a.flip(0) + 0.5]).tolist()
    [[0.25, 0.25], [1.25, 1.25]]
    """
    first = runs[0].detach().to(torch.float64).reshape(runs[0].shape[0], -1)
    first_labels = labels[0] if labels else None
    total = first.clone()
    for i, run in enumerate(runs[1:], start=1):
        other = run.detach().to(torch.float64).reshape(run.shape[0], -1)
        other_labels = labels[i] if labels else None
        total += other[label_assignment(torch.cdist(first, other) ** 2, first_labels, other_labels)]
    return (total / len(runs)).reshape(runs[0].shape).to(runs[0].dtype)


def label_assignment(
    cost: torch.Tensor,
    row_labels: torch.Tensor | None = None,
    column_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(k,)`` the column an optimal assignment
    (:func:`scipy.optimize.linear_sum_assignment`) on ``cost`` ``(k, j)``, ``k <= j``,
    gives each row; where both label tensors (``(k,)``, ``(j,)``) are given, rows are
    paired with columns of the same label wherever the label counts allow.

    Examples
    --------
    >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> label_assignment(cost).tolist(), label_assignment(cost, torch.tensor([1, 0]),
    ...                                                   torch.tensor([0, 1])).tolist()
    ([0, 1], [1, 0])
    """
    cost = cost.detach().to(torch.float64).cpu()
    if row_labels is not None and column_labels is not None:
        # a mismatch costs more than every distance together: pairs keep their labels
        penalty = float(cost.max()) * cost.shape[0] + 1.0
        mismatch = row_labels.cpu()[:, None] != column_labels.cpu()[None, :]
        cost = cost + penalty * mismatch.to(cost.dtype)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols)[torch.argsort(torch.as_tensor(rows))]


def best_noisy_estimate(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    current: Estimate,
    batch_size: int,
    kind: UpdateKind,
    seed: int,
    input_range: tuple[float, float] | None,
    seconds_left: Callable[[], float],
    notes: list[str],
) -> Estimate:
    """The estimate to return for a noisy update whose approximate answer is not reliable.

    1. Gradient matching runs from random inputs with the labels the classifier's gradient
       counts (the baseline's own run) and, where ``current`` (the approximate estimate)
       holds the whole batch with labels, from random inputs with its labels and from
       ``current`` itself. Its labels are kept when they fit the update better by more
       than :data:`FIT_MARGIN`.
    2. More runs from random inputs with the kept labels, up to :data:`ENSEMBLE_RUNS`
       (while the time left holds another run as long as the first; the first runs
       share what is left of the budget; none where ``current`` fits more than
       :data:`FIT_MARGIN` better than each run so far), and their
       :func:`aligned_mean` (with the run from ``current`` where its labels are kept).
    3. The run started from ``current``, where its labels were not kept, replaces the
       mean where it fits the update better by more than :data:`FIT_MARGIN`; and
       ``current`` itself is returned where it fits better than that estimate, by any
       margin. Gradient matching minimises the misfit, noise and all, so its fit
       flatters it; the approximate estimate's does not. Measured at b = 16
       (Fashion-MNIST, noise 1e-3, seeds 3 and 8): the approximate estimate 21.9 and
       20.9 dB with fits 0.341 and 0.453, the mean of matching runs 16.9 and 15.3 dB with
       fits 0.347 and 0.491. Where it fits worse, even by less than the margin, it is
       the worse answer (b = 8, noise 3e-3, seed 0: 13.1 dB at 0.828 against 17.0 dB for
       matching at 0.793).

    Where the noise hides the batch the approximate estimate still carries its labels
    and its examples' coarse shapes. Measured (float32 Opacus clients,
    ``784 -> 1000 -> 128 -> 10``, Fashion-MNIST, seed 0): b = 64 at noise 3e-4, labels
    matched to the truth 47 of 64 from the approximate estimate against 30 from random
    inputs; b = 16 at 1e-3, 14 of 16 against 10. Each run gets at least a second. A note
    gives every fit and says which estimate is returned.
    """
    shape = current.inputs.shape[1:]
    startable = (
        current.source == "approximate"
        and current.labels is not None
        and current.inputs.shape[0] == batch_size == current.labels.shape[0]
    )
    first_runs = 3 if startable else 1
    done = 0

    def run(
        run_seed: int, labels: torch.Tensor | None, initial: torch.Tensor | None, what: str
    ) -> Estimate:
        """One run: the first runs share what is left of the budget, later ones get it all
        (they end at their iterations, as the first did)."""
        nonlocal done
        budget = max(1.0, seconds_left() / max(1, first_runs - done))
        done += 1
        found = _gradient_matching(
            model, update, batch_size, shape, kind, run_seed, input_range, budget,
            initial=initial, labels=labels,
        )  # fmt: skip
        fit = found.certificate if found.certificate is not None else math.inf
        return Estimate(found.inputs, found.labels, fit, "gradient-matching", what)

    began = time.perf_counter()
    baseline = run(seed, None, None, "random inputs")
    one_run = time.perf_counter() - began
    members, labels, whose = [baseline], baseline.labels, "counted from the classifier's gradient"
    from_estimate: Estimate | None = None
    tried = [baseline]
    if startable:
        relabelled = run(seed, current.labels, None, "random inputs with the estimate's labels")
        from_estimate = run(seed, current.labels, current.inputs, "the approximate estimate")
        tried += [relabelled, from_estimate]
        if _fits_better(relabelled, baseline):
            members, labels, whose = (
                [relabelled, from_estimate],
                current.labels,
                "from the approximate estimate",
            )
    # where the approximate estimate fits clearly better than every run, so would it
    # than their mean (whose fit is theirs, measured): no more runs
    settled = startable and all(_fits_better(current, e) for e in tried)
    while (
        not settled
        and sum(m is not from_estimate for m in members) < ENSEMBLE_RUNS
        and seconds_left() >= one_run
    ):
        members.append(run(seed + len(members), labels, None, "random inputs"))
    mean = aligned_mean([m.inputs for m in members], [m.labels for m in members])
    boxed = ", boxed" if input_range is not None else ""
    ensemble = Estimate(
        mean,
        labels,
        _certificate(model, update, mean, labels, kind),
        "gradient-matching",
        (
            f"the mean of {len(members)} gradient-matching runs"
            if len(members) > 1
            else f"gradient matching from {members[0].what}"
        )
        + f" ({NOISY_ESTIMATE_ITERATIONS} iterations{boxed}; labels {whose})",
    )
    best = ensemble
    if from_estimate is not None and not any(from_estimate is m for m in members):
        best = from_estimate if _fits_better(from_estimate, ensemble) else ensemble
    if startable and _fit_value(current) < _fit_value(best):
        # gradient matching minimises its misfit, noise included, and the approximate
        # estimate does not: a lower fit of the latter needs no margin
        best = current
    fits = "; ".join(
        [f"{current.source} estimate {_fit(current.certificate)}"]
        + [f"gradient matching from {e.what} {_fit(e.certificate)}" for e in tried]
        + [f"their mean {_fit(ensemble.certificate)}"]
    )
    what = (
        best.what
        if best is ensemble
        else f"gradient matching started from {best.what}"
        if best.source == "gradient-matching"
        else f"the {best.source} reconstruction"
    )
    notes.append(
        f"noisy update: {what} is returned (not verified). Certificates: {fits}; gradient "
        f"matching replaces an estimate only when it fits more than {FIT_MARGIN:.0%} "
        "better, and the approximate estimate is kept wherever it fits better."
    )
    return best


def _fits_better(candidate: Estimate, reference: Estimate) -> bool:
    """Whether ``candidate``'s certificate is lower than ``reference``'s by more than
    :data:`FIT_MARGIN`."""
    if candidate.certificate is None or reference.certificate is None:
        return False
    return candidate.certificate < (1.0 - FIT_MARGIN) * reference.certificate


def _fit_value(estimate: Estimate) -> float:
    """``estimate``'s certificate, ``inf`` when it has none."""
    return math.inf if estimate.certificate is None else estimate.certificate


def _fit(certificate: float | None) -> str:
    """A certificate for a note (``"none"`` when not computed)."""
    return "none" if certificate is None else f"{certificate:.3g}"


def _certificate(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor | None,
    kind: UpdateKind,
) -> float:
    """The certificate of ``inputs`` with ``labels`` (``inf`` without labels)."""
    if labels is None:
        return math.inf
    return certify(model, update, inputs.to(parameter_dtype(model)), labels, update_kind=kind)


def _gradient_matching(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    batch_size: int,
    input_shape: torch.Size,
    kind: UpdateKind,
    seed: int,
    input_range: tuple[float, float] | None,
    time_budget: float,
    *,
    initial: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Reconstruction:
    """One gradient-matching estimate of a noisy update, with its certificate.

    Run as the benchmark's baseline is (:data:`NOISY_ESTIMATE_ITERATIONS` Adam steps, boxed
    by ``input_range`` when given), from random inputs drawn with ``seed`` or from
    ``initial`` ``(batch_size, *input_shape)``, with ``labels`` ``(batch_size,)`` held
    when given; ``.certificate`` is the relative error of the update recomputed from it,
    the fit by which estimates are compared.
    """
    from spear.baselines.gradient_matching import gradient_matching_attack

    estimate = gradient_matching_attack(
        model,
        update,
        batch_size=batch_size,
        input_shape=tuple(input_shape),
        update_kind=kind,
        seed=seed,
        time_budget=time_budget,
        iterations=NOISY_ESTIMATE_ITERATIONS,
        box=input_range,
        initial=initial,
        labels=labels,
    )
    if estimate.labels is not None:
        estimate.certificate = _certificate(model, update, estimate.inputs, estimate.labels, kind)
    return estimate
