"""Runs the steps in rounds until every example is found, time is up, or the search stalls.

Two pipelines: the guided one (the weights find examples, not only verify them) and the
weight-free one (plain search; the weights, when given, still verify). When the guided
search stalls on a small batch, the weight-free pipeline runs in the time left and its
answer is kept when it finds more.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spear.downstream import fits_whole
from spear.errors import NoReluSparsityError
from spear.inversion.checks import exact_patterns, verified_indices, whole_batch_solve
from spear.inversion.demix import demix
from spear.inversion.problem import MIN_RANK_GAP, Evidence, Problem
from spear.inversion.result import finish
from spear.inversion.solve import joint_check, refine_columns
from spear.inversion.state import SearchState
from spear.inversion.steps import (
    CompleteSolve,
    DirectionSearch,
    ExhaustiveSolve,
    FocusedSampling,
    InputCone,
    LastDirection,
    LineScan,
    PrunePool,
    Rebase,
    RoundSetup,
    RowPeeling,
    Step,
    StepReport,
    SubspaceCompletion,
    TentativeCompletion,
)
from spear.inversion.steps.search import SAMPLING_AFFORDABLE_RANK
from spear.linalg import TINY_NORM, clean_rank, estimate_rank
from spear.results import LayerReconstruction
from spear.verify import exact_precision

__all__ = [
    "GUIDED",
    "WEIGHT_FREE",
    "Pipeline",
    "invert",
    "pipeline_for",
    "unverify_merged",
    "unverify_unexplained",
    "unverify_unshared_divisor",
]

#: Rounds in a row without progress after which the search stops.
MAX_STALLED_ROUNDS = 2


@dataclass(frozen=True)
class Pipeline:
    """Steps run once before the rounds (``opening``) and in every round (``rounds``)."""

    opening: Sequence[Step]
    rounds: Sequence[Step]


#: The weights find examples: row peeling, search, subspace and focused completion. The
#: last direction is tried before the search as well: with one direction missing it is
#: exact at once, and sparsity alone may never single it out.
GUIDED = Pipeline(
    opening=(ExhaustiveSolve(),),
    rounds=(
        RowPeeling(),
        Rebase(),
        RoundSetup(),
        LastDirection(),
        DirectionSearch(),
        TentativeCompletion(),
        SubspaceCompletion(),
        LineScan(),
        FocusedSampling(),
        PrunePool(),
        LastDirection(),
        CompleteSolve(),
        InputCone(),
    ),
)
#: Plain search; the weights (when given) only verify.
WEIGHT_FREE = Pipeline(
    opening=(ExhaustiveSolve(),),
    rounds=(RoundSetup(), DirectionSearch(), PrunePool(), CompleteSolve()),
)


def pipeline_for(problem: Problem) -> Pipeline:
    """The guided pipeline when the weights are given and may guide, else weight-free."""
    return GUIDED if problem.layer is not None and problem.guided else WEIGHT_FREE


def invert(problem: Problem, pipeline: Pipeline | None = None) -> LayerReconstruction:
    """Search with ``pipeline`` (default :func:`pipeline_for`), then, when a guided search
    stalled on a small batch, without guidance in the time left; the verified result."""
    state, interrupted = search(problem, pipeline or pipeline_for(problem))
    if not interrupted and _fallback_applies(problem, state):
        # the weight-guided search can stall where plain sampling does not (narrow
        # layers, ambiguous residuals): search again without them, verify with them
        plain = problem.weight_free()
        try:
            plain_state, interrupted = search(plain, WEIGHT_FREE)
        except NoReluSparsityError:
            searched = state.found or any(record.candidates for record in state.stats)
            if not searched and problem.downstream is None:
                raise
            # the guided search found sparse directions, or the model after the layer
            # shows a ReLU follows it: plain sampling finding none means the zero sets
            # are too small for it, not that there are none
            return conclude(problem, state, interrupted)
        alt = conclude(plain, plain_state, interrupted)
        if alt.found > state.found:
            alt.notes.insert(0, "found by sampling without the weights' guidance.")
            alt.solvers = state.stats + alt.solvers
            alt.seconds = time.perf_counter() - problem.start
            return alt
    return conclude(problem, state, interrupted)


def search(problem: Problem, pipeline: Pipeline) -> tuple[SearchState, bool]:
    """Run the opening steps, then rounds until done, out of time, or stalled.

    Returns the state and whether Ctrl-C stopped the search (the examples verified until
    then are kept).
    """
    state = SearchState.begin(problem)
    interrupted = False
    try:
        for step in pipeline.opening:
            _run_step(problem, state, step)
        stalled = 0
        while state.found < problem.rank and problem.time_left():
            report = run_round(problem, state, pipeline.rounds)
            if report.end_search:
                break
            stalled = 0 if report.progressed or report.searching else stalled + 1
            if stalled >= MAX_STALLED_ROUNDS:
                break
    except NoReluSparsityError:
        if problem.downstream is None:
            raise
        # the model after the layer is known, so a ReLU follows it: no sparse direction
        # means zero sets too small to single directions out, not a missing ReLU
        state.notes.append(
            "the direction search found no sparse direction within its samples although a "
            "ReLU follows the layer: the examples' zero sets are too small for it."
        )
    except KeyboardInterrupt:
        interrupted = True
        kept = state.keep_verified()
        state.credit(state.step)
        state.notes.append(
            f"interrupted (Ctrl-C): the {kept} examples verified until then are returned."
        )
    state.bar.close()
    return state, interrupted


def run_round(problem: Problem, state: SearchState, steps: Sequence[Step]) -> StepReport:
    """Run every step once, in order; whether any progressed (or is still searching), or
    one ended the search."""
    progressed = searching = False
    state.round_start = (state.found, len(state.pool))
    for step in steps:
        report = _run_step(problem, state, step)
        progressed = progressed or report.progressed
        searching = searching or report.searching
        if report.end_search:
            return StepReport(progressed=progressed, end_search=True)
    return StepReport(progressed=progressed, searching=searching)


def _run_step(problem: Problem, state: SearchState, step: Step) -> StepReport:
    """Run one step and record what it did (:func:`_record`)."""
    state.step = step.name
    report = step.run(problem, state)
    _record(state, report)
    return report


def _record(state: SearchState, report: StepReport) -> None:
    """Keep a step's record and credit it with the examples it peeled (every step that
    peels reports them in its own record)."""
    state.credit(state.step)
    if report.stats is not None:
        state.stats.append(report.stats)


def _fallback_applies(problem: Problem, state: SearchState) -> bool:
    """A guided search on an exact, small batch stopped short with time left."""
    return (
        state.found < problem.rank
        and problem.layer is not None
        and problem.guided
        and not problem.noisy
        and problem.rank <= SAMPLING_AFFORDABLE_RANK
        and problem.time_left()
    )


def _withhold_loose(problem: Problem, state: SearchState, start: int) -> int:
    """Drop the examples found from ``start`` on that the shift of a wrong direction may
    have moved; returns how many were dropped.

    Where the update has fitted a plain cross-entropy mean or sum (fact 12), a shifted
    example's divisor moves with the shift: those that still fit it with their own
    columns are kept. Otherwise all of them are dropped.
    """
    downstream, layer = problem.downstream, problem.layer
    res = state.residual
    whole = problem.evidence.whole
    if downstream is None or layer is None or whole is None:
        return state.withhold_from(start)
    tail = list(range(start, res.found))
    if not tail:
        return 0
    coords = torch.stack([res.coords[i] for i in tail])
    grads = torch.stack([res.grads[i] for i in tail], dim=1)
    fit, divisor = downstream.cross_entropy_fit(coords @ layer.right, grads)
    fits = fits_whole(fit, divisor, whole, problem.rank, downstream.dtype, copies=True)
    keep = list(range(start)) + [i for i, ok in zip(tail, fits.tolist(), strict=True) if ok]
    return state.keep(keep)


def _own_evidence(
    problem: Problem, result: LayerReconstruction, fits: tuple[torch.Tensor, torch.Tensor]
) -> Evidence:
    """The divisors the result's own examples show (:class:`Evidence`), from their
    ``(fit, divisor)`` (:meth:`spear.downstream.Downstream.cross_entropy_fit`)."""
    downstream = problem.downstream
    assert downstream is not None
    fit, divisor = fits
    own = Evidence()
    for i in range(result.inputs.shape[0]):
        own.tally(
            float(fit[i]), float(divisor[i]), result.inputs[i], problem.rank, downstream.dtype
        )
    return own


def unverify_unshared_divisor(
    problem: Problem,
    result: LayerReconstruction,
    fits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Withdraw verification where the result's own examples establish the divisor of a
    plain cross-entropy mean or sum (:class:`spear.inversion.problem.Evidence`) and some
    example does not fit it.

    Examples whose ReLU patterns agree at the layer are told apart only by the model after
    it: any mixture of two such examples passes every pattern check, and where they have
    the same activation patterns after the layer too, the Jacobian's range. Their columns
    fit cross-entropy only as themselves (fact 12). Where the update shows fewer examples
    than its mean counts (examples merged at its precision), a check made while the search
    ran may have been one that had not yet learnt the divisor; this one sees the whole
    batch at once. Losses that weigh examples (two examples sharing a divisor of another
    form) establish none, and nothing is withdrawn. ``fits``: the examples'
    :meth:`spear.downstream.Downstream.cross_entropy_fit` when already computed.
    """
    downstream = problem.downstream
    if not result.verified or downstream is None or result.inputs.shape[0] == 0:
        return
    rank, dtype = problem.rank, downstream.dtype
    if fits is None:
        fits = downstream.cross_entropy_fit(result.inputs, result.output_grads)
    fit, divisor = fits
    own = _own_evidence(problem, result, fits)
    whole = own.whole
    if whole is None:
        return  # no plain cross-entropy mean or sum to hold the examples to
    held = fits_whole(fit, divisor, whole, rank, dtype, copies=True)
    if bool(held.all()):
        return
    result.verified = False
    misfits = torch.nonzero(~held).flatten().tolist()
    result.notes.append(
        f"examples {misfits} do not fit softmax cross-entropy with the divisor the other "
        f"{int(held.sum())} share ({whole:g}, a plain mean or sum): mixtures of examples "
        "with the same ReLU patterns pass every pattern check, and only the model after "
        "the layer tells them apart: not verified."
    )


def unverify_merged(
    problem: Problem,
    result: LayerReconstruction,
    fits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Withdraw verification where a low-precision update shows an example counted more
    than once: the update cannot tell ``c`` copies of one input from ``c`` inputs whose
    gradient columns agree to its precision (the same label and the same activation
    patterns after the layer, in a network whose logits barely depend on the input, such
    as an untrained one), whose mean it then returns as one example. Such an example is
    flagged where it fits the others' divisor over ``c >= 2`` (:meth:`Downstream.repeated`)
    or, where its own fit is too rough for that, where the other examples show a mean
    over more examples than the update shows. ``fits`` as for
    :func:`unverify_unshared_divisor`."""
    downstream = problem.downstream
    if not result.verified or downstream is None:
        return
    if exact_precision(problem.eps) and exact_precision(float(torch.finfo(downstream.dtype).eps)):
        return
    if fits is None:
        fits = downstream.cross_entropy_fit(result.inputs, result.output_grads)
    repeated = downstream.repeated(
        result.inputs, result.output_grads, problem.request.batch_size, fits
    )
    own = _own_evidence(problem, result, fits)
    counted_more = own.whole is not None and own.whole > max(problem.rank, 1)
    if not (bool(repeated.any()) or counted_more):
        return
    which = (
        f"examples {torch.nonzero(repeated).flatten().tolist()} fit"
        if bool(repeated.any())
        else f"the examples fit a mean over {own.whole:g} while the update shows "
        f"{problem.rank}: some example fits"
    )
    result.verified = False
    result.notes.append(
        f"{which} the update as if counted "
        f"more than once; at {problem.in_dtype}'s precision the update cannot tell a repeated "
        "example from several examples whose gradients agree to that precision (the same "
        "label and activation patterns after the layer), whose mean it would show as one: "
        "not verified."
    )


def unverify_unexplained(problem: Problem, result: LayerReconstruction) -> None:
    """Withdraw verification where the update shows more examples than the search ran at:
    a clear rank above it (a ``batch_size`` smaller than the batch), or values above the
    update's rounding that end in a clean drop (:func:`spear.linalg.clean_rank`) past the
    largest gap. The examples returned then leave part of the update unexplained, however
    well each passes its own checks: two examples a hair apart come back as their mean
    counted twice, which reproduces the update to about the square of their distance, far
    below the certificate's threshold."""
    if not result.verified or problem.noisy:
        return
    eps = float(torch.finfo(problem.in_dtype).eps)
    singular_values = problem.fac.singular_values
    shown, gap = estimate_rank(singular_values, eps)
    clear = shown if gap >= MIN_RANK_GAP else 0
    shows = max(clear, clean_rank(singular_values, eps) or 0)
    if shows <= problem.rank:
        return
    result.verified = False
    given = problem.request.batch_size
    why = (
        f"batch_size={given}"
        if given is not None and given < shows
        else "the largest gap in its spectrum comes earlier: the smallest may be examples "
        "a hair apart, or a confidently classified one"
    )
    result.notes.append(
        f"the update shows {shows} examples above its rounding and the search ran at "
        f"{problem.rank} ({why}): the examples returned leave part of the update "
        "unexplained, so they are not verified."
    )


def _factor_misfit(problem: Problem, coords: torch.Tensor, grads: torch.Tensor) -> float:
    """``||left - grads @ coords|| / ||left||`` of a whole batch: how far the examples
    ``coords`` ``(b, b)`` and their columns ``grads`` ``(m, b)`` miss the factorisation."""
    left = problem.fac.left
    return float((left - grads @ coords).norm() / left.norm().clamp_min(TINY_NORM))


def _polish(problem: Problem, state: SearchState) -> None:
    """Solve a complete low-precision batch once more, at once, from the original
    factorisation with every direction refined on its exact zero set; keep that solve
    when every example verifies and it fits the factorisation better.

    Examples peeled one by one inherit the roundoff each peel leaves in the residual: on
    float32 updates they come back up to ``1e-4`` off on the pixel scale (still exact at
    ``1e-3``), and the certificate of the whole batch grows with them toward its
    threshold (:data:`spear.certificate.VERIFIED_BELOW`). float64 answers are left as
    they are.
    """
    res, layer, db = state.residual, problem.layer, problem.bias_grad
    if (
        layer is None
        or db is None
        or problem.noisy
        or exact_precision(problem.eps)
        or res.found != problem.rank
    ):
        return
    coords = torch.stack(res.coords)  # (b, b)
    grads = torch.stack(res.grads, dim=1)  # (m, b)
    full, _ = problem.original
    refined = refine_columns(layer, full, coords, grads / grads.norm(dim=0), problem.tol)
    solved = whole_batch_solve(problem, refined)
    if solved is None or _factor_misfit(problem, *solved) >= _factor_misfit(problem, coords, grads):
        return
    res.coords = list(solved[0])
    res.grads = list(solved[1].T)


def _demix(problem: Problem, state: SearchState) -> None:
    """Replace the mixed columns of a complete batch whose pattern checks are loose
    (FedAvg deltas, low precision; :mod:`spear.inversion.demix`)."""
    res = state.residual
    if problem.noisy or exact_patterns(problem) or res.found != problem.rank:
        return
    out = demix(problem, torch.stack(res.coords), torch.stack(res.grads, dim=1))
    if out is None:
        return
    coords, grads, replaced = out
    res.coords = list(coords)
    res.grads = list(grads.T)
    state.notes.append(
        f"{replaced} gradient direction{'s' if replaced > 1 else ''} that mixed two examples "
        "(each pattern check passed, within the tolerance of this update) "
        f"{'were' if replaced > 1 else 'was'} replaced by the direction the example's own "
        "ReLU pattern gives, and the batch solved again."
    )


def conclude(problem: Problem, state: SearchState, interrupted: bool) -> LayerReconstruction:
    """Check loosely peeled examples as a whole (or withhold them) and build the result."""
    start_loose = state.loose_from
    if start_loose is not None and not (
        not interrupted
        and joint_check(
            state.residual,
            problem.fac.left,
            problem.bias_grad,
            problem.original[1],
            problem.rank,
            lambda c, g, live: verified_indices(problem, c, g, live),
        )
    ):
        withheld = _withhold_loose(problem, state, start_loose)
        if withheld:
            state.notes.append(
                f"{withheld} examples found after a complete solve in which some example "
                "failed its check are withheld: a wrong direction in such a solve shifts "
                "the examples mixed into it without flipping their ReLU patterns, and "
                "they could not be solved again as a whole."
            )
    if not interrupted:
        _polish(problem, state)
        _demix(problem, state)
    result = finish(problem, state)
    unverify_unexplained(problem, result)
    downstream = problem.downstream
    if result.verified and downstream is not None and result.found:
        # one Jacobian per example for both checks
        fits = downstream.cross_entropy_fit(result.inputs, result.output_grads)
        unverify_unshared_divisor(problem, result, fits)
        unverify_merged(problem, result, fits)
    if problem.noisy:
        result.verified = False  # patterns were allowed to disagree: estimates, not checks
    result.interrupted = interrupted
    return result
