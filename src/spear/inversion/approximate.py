"""Approximate inversion of a noisy update with the layer's weights (DP-SGD noise).

Noise removes the exact zeros the exact pipeline tests for, but not the structure:
``A = [dW | db] = G [X^T | 1] + N`` with ``G`` zero wherever the unit is off. With the
layer's weight ``W`` and bias ``c`` the server predicts those zeros from any estimate of
the examples, ``P = 1[W X + c > 0]``. The path:

1. **Denoise.** Truncate ``A`` at rank ``b`` (``A_b = U_b S_b V_b^T``).
2. **Candidates.** Every row ``j`` whose bias entry stands above the noise gives
   ``x_j = A_b[j, :n] / A_b[j, n]``, exactly an example when the unit is on for that
   example alone.
3. **Directions, by peeling.** A candidate's predicted off-units are the zero rows of its
   column of ``G``: the least-squares kernel ``q`` of ``U_b`` on those rows is its
   direction, and the smallest eigenvalue of ``U_b[off]^T U_b[off]``, relative to the
   ``|off| / m`` a random row subset gives, scores it (near 0 for a true example, 0.03
   and up for a mixture). Directions scoring within the noise are accepted, their
   contributions ``g_i [x_i | 1]^T`` removed (docs/algorithm.md, fact 8), and candidates
   read again from the rows left. Rounds of peeling alternate with refinements of all
   ``b`` examples; examples the refinement leaves scoring within the noise are settled
   and peeled with their refined, all-row contributions.
4. **Refine.** Alternating least squares under the predicted patterns: each row of ``A_b``
   is fitted by the examples on at its unit (G-step; the bias column fixes the scale),
   then the examples from all rows at once (X-step), then the patterns again, until they
   stop changing. Every row that carries an example contributes, so noise averages out.
5. **Complete.** Where examples are still mixed (their zero rows do not score within
   the noise), their directions are polished by IRLS and the missing ones found one by
   one in the span the missing examples lie in (:mod:`spear.inversion.sparse_directions`);
   with all ``b``, the examples are solved at once and kept when they fit the denoised
   update better.
6. **Error bars.** The X-step is a least-squares fit: example ``i``'s noise has variance
   ``sigma^2 [(G^T G)^-1]_ii`` per input coordinate (:func:`error_rms`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from spear.inversion.sparse_directions import (
    missing_span,
    polish_direction,
    span_distance,
    zero_count,
)
from spear.linalg import TINY_NORM, least_squares
from spear.noise import NoiseEstimate, augmented, estimate_noise, zero_row_sigma

__all__ = [
    "CANDIDATE_ROWS",
    "ApproximateInversion",
    "approximate_inversion",
    "error_rms",
    "refine",
]

#: Rows whose denoised bias entry is largest give the candidates (at most this many),
#: among those whose bias entry exceeds ``CANDIDATE_NOISE_Z`` noise standard deviations.
CANDIDATE_ROWS = 1000
CANDIDATE_NOISE_Z = 3.0
#: Candidates scored per batch (bounds the memory of the batched Gram matrices).
SCORE_CHUNK = 128
#: Two directions (unit vectors in ``U_b`` coordinates) are the same example above this
#: absolute cosine.
SAME_DIRECTION_COSINE = 0.95
#: Candidates whose directions agree above this absolute cosine are averaged into one
#: example (stricter than :data:`SAME_DIRECTION_COSINE`: a mixture dominated by one
#: example has a nearby direction but a different example).
AVERAGED_COSINE = 0.999
#: A candidate needs at least this many predicted-off units times ``b`` (its kernel is
#: otherwise not determined by the zero rows).
MIN_OFF_ROWS_PER_RANK = 2
#: A candidate direction is accepted outright when its score is below this factor times
#: ``m (sigma / s_b)^2``, the score noise alone gives a true example's zero rows (the
#: basis rows move by about ``sigma / s_b``); never below :data:`ACCEPT_FLOOR` (roundoff).
#: Measured (float32, Fashion-MNIST, 784 -> 1000, b = 16): true examples score at most
#: 0.1 times that bound; mixtures of examples 0.03 and up (noise-free).
ACCEPT_FACTOR = 1.0
ACCEPT_FLOOR = 1e-10
#: When no candidate passes, the best one is still taken if it scores below this, the
#: lowest score a mixture of examples reached noise-free (same measurement): peeling
#: errors raise the scores of true examples found late. Measured (seed 0, b = 16, noise
#: 1e-4): 0.01 instead gives 46.6 dB on Fashion-MNIST and 35.7 dB on RGB patches (fit
#: not consistent), 0.03 gives 48.7 and 40.4 dB (no limit: 40.4 dB on the RGB batch too).
MIXTURE_SCORE = 0.03
#: Rounds of peeling and refinement (:func:`_search`); each settles more examples.
MAX_SEARCH_ROUNDS = 8
#: Peeling rounds of the direction search (each accepts at least one direction).
MAX_PEEL_ROUNDS = 200
#: Alternating least squares stops after this many rounds, or earlier when fewer than
#: :data:`PATTERN_SETTLED` of the ``m b`` pattern entries changed in a round.
MAX_REFINE_ROUNDS = 30
PATTERN_SETTLED = 0
#: Units whose pre-activation lies within this many predicted errors below zero stay
#: free (allowed on) in the refinement.
AMBIGUITY_Z = 3.0
#: Ridge added to each row's Gram matrix, relative to its largest diagonal entry, so rows
#: with one or no active example stay solvable.
ROW_RIDGE = 1e-12
#: A polished direction (:func:`spear.inversion.sparse_directions.polish_direction`) is an
#: example's when its zero count is at least this fraction of the median count of the
#: directions polished from the current estimates (most of which reach an example).
#: Measured (float32, Fashion-MNIST, ``784 -> 1000``, b = 64, noise 1e-5, two batches):
#: examples 475 to 532 zeros, the median 500 to 515; polished mixtures up to 461 (cosine
#: 0.9989 to an example), most below 450.
EXAMPLE_ZERO_FRACTION = 0.9
#: ... and when it lies at least this far (a unit vector's distance) from the span of the
#: directions already taken; the examples' directions lay 0.39 to 0.56 from the span of
#: those taken before them in the same measurement.
NEW_DIRECTION_DISTANCE = 0.2
#: Random points of the missing examples' span drawn in a row without a new direction
#: before the completion gives up (in the measurement above the 64 estimates' polished
#: directions gave 53 examples, and 23 draws the other 11).
MAX_FAILED_DRAWS = 20
#: Rounds of re-reading the solved examples' directions (predicted zero set, then
#: :func:`~spear.inversion.sparse_directions.polish_direction`) and solving again: the
#: directions found from mixtures are a little off, the solved examples' are not.
REPOLISH_ROUNDS = 2
#: Units predicted off by a margin of more than this fraction of the typical
#: pre-activation for every example count as dead rows (pure noise) for
#: :func:`spear.noise.zero_row_sigma`.
DEAD_ROW_MARGIN = 0.1


@dataclass
class ApproximateInversion:
    """Examples estimated from a noisy update, with their error bars.

    Attributes
    ----------
    inputs:
        ``(k, n)`` float64 estimated examples.
    output_grads:
        ``(m, k)`` float64 their gradient columns (zero where the unit is predicted off).
    error_rms:
        ``(k,)`` predicted root-mean-square error per input coordinate of each example,
        in the inputs' units, from the noise floor and the least-squares fit; NaN when
        the fit is not :attr:`consistent` or the batch size not clear
        (``noise.confident``): the noise model then does not bound the error.
    noise:
        The noise estimate (sigma, batch size, margins).
    zero_row_sigma:
        Noise std from the rows every estimated example leaves off (``None`` when none).
    residual_ratio:
        ``||A - G [X^T | 1]||_F`` over what noise of the estimated sigma alone leaves
        after the fit: about 1 when the estimates explain everything but the noise.
    consistent:
        ``residual_ratio`` within :data:`CONSISTENT_RESIDUAL` of 1.
    rounds:
        Refinement rounds run.
    directions:
        Distinct directions the candidates gave (before refinement), at most ``b``.
    out_of_time:
        The time budget ran out during the search: the steps after it were skipped, so the
        estimates are the best fit found by then.
    """

    inputs: torch.Tensor
    output_grads: torch.Tensor
    error_rms: torch.Tensor
    noise: NoiseEstimate
    zero_row_sigma: float | None
    residual_ratio: float
    consistent: bool
    rounds: int
    directions: int
    out_of_time: bool = False


#: The fit is consistent with the noise when its residual exceeds the noise's by at most
#: this fraction (a chi-square over ``m (n + 1)`` entries fluctuates by well under 1%;
#: the rest is room for a few mispredicted units).
CONSISTENT_RESIDUAL = 0.05


@dataclass(frozen=True)
class _Denoised:
    """A noisy update truncated at rank ``b``, with the layer and the noise level.

    Attributes
    ----------
    update:
        ``(m, n + 1)`` ``A_b = U_b S_b V_b^T`` of ``[dW | db]``.
    basis, singular, right:
        ``U_b`` ``(m, b)``, ``S_b`` ``(b,)``, ``V_b^T`` ``(b, n + 1)``.
    w, c:
        ``(m, n)`` and ``(m,)`` the layer's weight and bias (float64).
    accept:
        Score below which a candidate's direction is accepted (:func:`_scores`).
    sigma:
        The noise standard deviation of the update's entries.
    products:
        ``(m, b (b + 1) / 2)`` :func:`_row_products` of ``basis``.
    """

    update: torch.Tensor
    basis: torch.Tensor
    singular: torch.Tensor
    right: torch.Tensor
    w: torch.Tensor
    c: torch.Tensor
    accept: float
    sigma: float
    products: torch.Tensor


def approximate_inversion(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    batch_size: int | None = None,
    initial: torch.Tensor | None = None,
    time_budget: float | None = None,
) -> ApproximateInversion | None:
    """Estimate the batch of a noisy linear+ReLU update with the layer's weights.

    Parameters
    ----------
    weight_grad, bias_grad:
        ``(m, n)`` and ``(m,)`` the noisy update of the layer.
    weight, bias:
        ``(m, n)`` and ``(m,)`` the layer's parameters as the server sent them.
    batch_size:
        ``b`` when known; otherwise read off the spectrum (:func:`spear.noise.estimate_noise`).
    initial:
        ``(k, n)`` example estimates from elsewhere (the exact pipeline, another attack),
        used as extra candidates.
    time_budget:
        Seconds for the search, or ``None`` for no limit. When they run out, the best fit
        found so far is concluded (``.out_of_time``); the first round of peeling and
        refinement always runs, since nothing can be returned before it.

    Returns
    -------
    ApproximateInversion or None
        ``None`` when no direction could be found (nothing stands above the noise).
    """
    deadline = math.inf if time_budget is None else time.perf_counter() + time_budget
    a = augmented(weight_grad, bias_grad)
    m, cols = a.shape
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    noise = estimate_noise(s, m, cols, batch_size)
    b = noise.batch_size
    if b < 1:
        return None
    basis = u[:, :b]
    denoised = basis @ (s[:b, None] * vh[:b])  # (m, n + 1)
    w = weight.detach().to(torch.float64)
    c = bias.detach().to(torch.float64)
    accept = max(ACCEPT_FLOOR, ACCEPT_FACTOR * m * (noise.sigma / float(s[b - 1])) ** 2)
    extra = initial.to(torch.float64) if initial is not None and initial.numel() else None
    d = _Denoised(denoised, basis, s[:b], vh[:b], w, c, accept, noise.sigma, _row_products(basis))
    found = _search(d, extra, deadline)
    if found is None:
        return None
    x, g, rounds, directions = found
    out_of_time = time.perf_counter() >= deadline
    return _conclude(a, x, g, w, c, noise, rounds, directions, out_of_time)


def _search(
    d: _Denoised, extra: torch.Tensor | None, deadline: float = math.inf
) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """Rounds of peeling and refinement until every example is settled.

    A round peels new directions from the update left by the settled examples
    (:func:`_peel_directions`), starts the missing ones from the residual
    (:func:`_missing_examples`) and refines all ``b`` together (:func:`refine`); it also
    refines the missing ones alone against the residual the found ones leave, holding
    those fixed (at b = 64 the joint refinement drags found examples toward the
    mixtures the missing ones start from). The refined examples whose own zero rows score
    below ``accept`` are settled: their contributions, now fitted from every row, are far
    more accurate than the single-row estimates peeling removed, so the next round's
    candidates are cleaner. The estimate
    that fits the denoised update best (:func:`_better`) is returned. ``extra`` ``(k, n)``:
    example estimates from elsewhere, taken as candidates in the first round. At
    ``deadline`` (``time.perf_counter()``) the rounds stop, the refinement returns what it
    has, and the completion is cut short; the first round always runs.

    Returns
    -------
    tuple or None
        ``(inputs (b, n), output_grads (m, b), refinement rounds, directions peeled)``;
        ``None`` when no direction was found.
    """
    denoised, basis, w, c, sigma = d.update, d.basis, d.w, d.c, d.sigma
    b = basis.shape[1]
    settled = torch.zeros(b, dtype=torch.bool)
    x: torch.Tensor | None = None
    g: torch.Tensor | None = None
    rounds = peeled = 0
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(MAX_SEARCH_ROUNDS):
        if best is not None and time.perf_counter() >= deadline:
            break
        if x is None or g is None:
            known_x = denoised.new_zeros(0, denoised.shape[1] - 1)
            known_dirs = basis.new_zeros(b, 0)
            residual = denoised
        else:
            known_x = x[settled]
            known_dirs = _scores(known_x, d)[0].T
            xa = torch.cat([known_x, known_x.new_ones(known_x.shape[0], 1)], dim=1)
            residual = denoised - g[:, settled] @ xa
        directions, examples, left = _peel_directions(d, residual, extra, known_dirs)
        extra = None
        peeled += directions.shape[1]
        k = known_x.shape[0] + examples.shape[0]
        if k == 0:
            return None
        x0 = None
        if known_x.shape[0] == 0 and examples.shape[0] == b:
            x0 = _solve(basis, directions, denoised)
        if x0 is None:
            x0 = torch.cat([known_x, examples, _missing_examples(left, b - k)])
        if 0 < k < b:
            # the found examples held, the missing ones fitted to the residual they leave
            held = torch.cat([known_x, examples])
            rest, _, used = refine(
                left, _missing_examples(left, b - k), w, c, sigma, deadline=deadline
            )
            rounds += used
            best = _better(best, denoised, torch.cat([held, rest]), None, w, c)
        x, g, used = refine(denoised, x0, w, c, sigma, deadline=deadline)
        rounds += used
        best = _better(best, denoised, x, g, w, c)
        now = _scores(x, d)[1] <= d.accept
        if bool(now.all()) or int(now.sum()) <= int(settled.sum()):
            break
        settled = now
    assert best is not None
    completed = _complete_in_missing_span(d, best[1], deadline)
    if completed is not None:
        best = _better(best, denoised, completed, _columns(denoised, completed, w, c, sigma), w, c)
    return best[1], best[2], rounds, peeled


def _complete_in_missing_span(
    d: _Denoised, x: torch.Tensor, deadline: float = math.inf
) -> torch.Tensor | None:
    """``(b, n)`` examples from ``b`` sparse directions, or ``None``.

    Every example of ``x`` ``(b, n)`` gives a direction, its least-squares kernel polished
    by IRLS; those whose zero count is at least :data:`EXAMPLE_ZERO_FRACTION` of the
    median count are taken, largest count first, when they lie
    :data:`NEW_DIRECTION_DISTANCE` from the ones taken before. Each further direction is
    found in the span the missing examples lie in (:mod:`spear.inversion.sparse_directions`):
    a random point of it, its predicted zero set, least-squares kernel and IRLS, taken
    under the same two rules. With all ``b``, the examples are solved from them
    (:func:`_solve_repolished`). ``None`` when all ``b`` directions were already settled,
    :data:`MAX_FAILED_DRAWS` draws in a row found no new direction, or ``deadline``
    passed first.
    """
    basis, w, c = d.basis, d.w, d.c
    b = basis.shape[1]
    unit = d.sigma / max(float(d.singular[-1]), TINY_NORM)
    starts, scores = _scores(x, d)
    if bool((scores <= d.accept).all()) or time.perf_counter() >= deadline:
        return None
    polished = list(_polished(d, x, starts, unit).T)
    counts = torch.tensor([zero_count(basis, q, unit) for q in polished], dtype=torch.float64)
    floor = EXAMPLE_ZERO_FRACTION * float(counts.median())
    known: list[torch.Tensor] = []
    for i in torch.argsort(counts, descending=True).tolist():
        if float(counts[i]) < floor:
            break
        if not known or span_distance(torch.stack(known, 1), polished[i]) > NEW_DIRECTION_DISTANCE:
            known.append(polished[i])
    generator = torch.Generator().manual_seed(0)
    failed = 0
    while len(known) < b and failed < MAX_FAILED_DRAWS:
        if time.perf_counter() >= deadline:
            return None
        failed += 1
        taken = torch.stack(known, 1)  # (b, k)
        span = missing_span(taken, d.singular, d.right)  # (b - k, n + 1)
        mix = torch.randn(span.shape[0], generator=generator, dtype=torch.float64)
        point = mix.to(span) @ span
        if abs(float(point[-1])) <= TINY_NORM * float(point.norm()):
            continue
        candidate = point[:-1] / point[-1]
        start, score = _scores(candidate[None], d)
        if not math.isfinite(float(score[0])):
            continue
        q = polish_direction(basis, start[0], (candidate @ w.T + c) <= 0, unit)
        if zero_count(basis, q, unit) >= floor and span_distance(taken, q) > NEW_DIRECTION_DISTANCE:
            known.append(q)
            failed = 0
    if len(known) < b:
        return None
    return _solve_repolished(d, torch.stack(known, 1), unit)


def _polished(d: _Denoised, x: torch.Tensor, starts: torch.Tensor, unit: float) -> torch.Tensor:
    """``(b, k)`` the directions of examples ``x`` ``(k, n)``: each one's least-squares
    kernel of its predicted zero set (``starts`` ``(k, b)``, :func:`_scores`), polished by
    IRLS on that set."""
    off = (x @ d.w.T + d.c) <= 0  # (k, m)
    return torch.stack(
        [polish_direction(d.basis, starts[i], off[i], unit) for i in range(x.shape[0])], dim=1
    )


def _solve_repolished(d: _Denoised, directions: torch.Tensor, unit: float) -> torch.Tensor | None:
    """``(b, n)`` examples solved from ``b`` directions ``(b, b)``, re-read and solved again.

    Each of :data:`REPOLISH_ROUNDS` rounds takes every solved example's predicted zero
    set, its least-squares kernel and IRLS polish, and solves again while those directions
    stay distinct. ``None`` when the first solve loses an example (a zero scale).
    """
    basis = d.basis
    b = basis.shape[1]
    x = _solve(basis, directions, d.update)
    if x is None or x.shape[0] < b:
        return None
    for _ in range(REPOLISH_ROUNDS):
        again = _polished(d, x, _scores(x, d)[0], unit)
        if any(
            span_distance(torch.cat([again[:, :i], again[:, i + 1 :]], 1), again[:, i])
            <= NEW_DIRECTION_DISTANCE
            for i in range(b)
        ):
            break
        solved = _solve(basis, again, d.update)
        if solved is None or solved.shape[0] < b:
            break
        x = solved
    return x


def _better(
    best: tuple[float, torch.Tensor, torch.Tensor] | None,
    denoised: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor | None,
    w: torch.Tensor,
    c: torch.Tensor,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The better of ``best`` and examples ``x`` ``(b, n)`` by misfit to ``denoised``.

    The misfit is ``||denoised - g [X^T | 1]||_F`` with the gradient columns ``g``
    ``(m, b)`` of a refinement, or, when ``g`` is ``None``, those of the per-row least
    squares under the patterns ``x`` predicts (:func:`_g_step`, units on where the
    pre-activation is positive: no unit left free, so such an estimate wins only by a
    genuinely closer fit). Returns ``(misfit, inputs, output_grads)``.
    """
    if g is None:
        g = _g_step(denoised, x, _pattern(x, w, c, w.norm(dim=1), x.new_zeros(x.shape[0])))
    xa = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    misfit = float((denoised - g @ xa).norm())
    if best is not None and best[0] <= misfit:
        return best
    return misfit, x, g


def _columns(
    denoised: torch.Tensor, x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``(m, k)`` gradient columns of examples ``x`` ``(k, n)``, ambiguous units left free.

    A G-step under the patterns ``x`` predicts, then another with the units within
    :data:`AMBIGUITY_Z` predicted errors below zero allowed on (as :func:`refine` does):
    a unit ``x``'s error puts on the wrong side would otherwise force a true non-zero to
    zero. Measured (b = 64, noise 1e-5, examples at 66 dB): the misfit falls from 5.7
    times the noise's to 1.002, 98% of it having sat in 10 of 1000 rows.
    """
    wnorm = w.norm(dim=1)
    g = _g_step(denoised, x, _pattern(x, w, c, wnorm, x.new_zeros(x.shape[0])))
    return _g_step(denoised, x, _pattern(x, w, c, wnorm, error_rms(g, sigma)))


def _row_candidates(residual: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ``(k, n)`` read off the rows whose bias entry stands above the noise.

    Row ``j`` gives ``residual[j, :n] / residual[j, n]``; only rows with ``|residual[j, n]|
    > CANDIDATE_NOISE_Z * sigma`` count (at most :data:`CANDIDATE_ROWS`, largest first).
    Also returns each candidate's weight ``(k,)``, its squared bias entry (the inverse of
    its noise variance, up to a common factor).
    """
    bias_col = residual[:, -1]
    clear = int((bias_col.abs() > CANDIDATE_NOISE_Z * sigma).sum())
    k = min(CANDIDATE_ROWS, clear)
    rows = torch.topk(bias_col.abs(), k).indices
    return residual[rows, :-1] / bias_col[rows, None], bias_col[rows] ** 2


def _scores(
    candidates: torch.Tensor, d: _Denoised, directions_below: float = math.inf
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel directions ``(K, b)`` and scores ``(K,)`` of candidate examples ``(K, n)``.

    Each candidate's predicted-off units (under ``d.w``, ``d.c``) select rows of
    ``d.basis`` (``(m, b)``, orthonormal); the eigenvector of the smallest eigenvalue of
    their Gram matrix is the direction, that eigenvalue over ``|off| / m`` its score
    (``inf`` with fewer than ``MIN_OFF_ROWS_PER_RANK * b`` off-units). Directions are
    computed only for candidates scoring at most ``directions_below`` (the others' rows
    are zero): the eigenvalues alone cost half as much.
    """
    m, b = d.basis.shape
    lower = torch.tril_indices(b, b)
    directions, scores = [], []
    for chunk in candidates.split(SCORE_CHUNK):
        off = ((chunk @ d.w.T + d.c) <= 0).to(d.basis.dtype)  # (K, m)
        counts = off.sum(dim=1)
        # the Gram matrices' lower triangles, all the eigensolvers read (UPLO="L")
        grams = d.basis.new_zeros(chunk.shape[0], b, b)
        grams[:, lower[0], lower[1]] = off @ d.products
        score = torch.linalg.eigvalsh(grams)[:, 0] * m / counts.clamp_min(1.0)
        score[counts < MIN_OFF_ROWS_PER_RANK * b] = math.inf
        vectors = d.basis.new_zeros(chunk.shape[0], b)
        wanted = score <= directions_below
        if bool(wanted.any()):
            vectors[wanted] = torch.linalg.eigh(grams[wanted])[1][:, :, 0]
        directions.append(vectors)
        scores.append(score)
    if not directions:
        return d.basis.new_zeros(0, b), d.basis.new_zeros(0)
    return torch.cat(directions), torch.cat(scores)


def _row_products(basis: torch.Tensor) -> torch.Tensor:
    """``(m, b (b + 1) / 2)`` the lower triangle (:func:`torch.tril_indices` order) of
    each row's outer product ``basis[r] basis[r]^T`` (``basis`` ``(m, b)``), so that a
    set of rows' Gram matrix is one matrix product with its indicator."""
    b = basis.shape[1]
    lower = torch.tril_indices(b, b)
    return basis[:, lower[0]] * basis[:, lower[1]]


def _peel_directions(
    d: _Denoised, start: torch.Tensor, extra: torch.Tensor | None, known: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct directions found by peeling, their examples, and the residual left.

    Each round reads candidates off the rows of the update left after removing the
    examples accepted so far (``g_i x_i^T``, docs/algorithm.md fact 8), scores them
    (:func:`_scores`) and accepts every distinct direction scoring below ``accept`` (when
    none does, the single best one scoring below :data:`MIXTURE_SCORE`: the peeled
    examples' errors raise the scores of later ones); its example is the weighted mean of
    the candidates sharing the direction. Rounds stop at ``b`` directions or when no
    candidate is left. ``start`` ``(m, n + 1)`` is the update left by the settled
    examples, whose directions ``known`` ``(b, k0)`` are not taken again; ``extra``
    ``(k, n)`` are more candidates for the first round.

    Returns
    -------
    directions:
        ``(b, k)`` unit directions in ``basis`` coordinates.
    examples:
        ``(k, n)`` their examples.
    residual:
        ``(m, n + 1)`` the update left (rank ``b - k`` up to noise).
    """
    basis, singular, right = d.basis, d.singular, d.right
    accept, sigma = d.accept, d.sigma
    b = basis.shape[1]
    chosen: list[torch.Tensor] = list(known.T)
    examples: list[torch.Tensor] = []
    new: list[torch.Tensor] = []
    residual = start
    for _ in range(MAX_PEEL_ROUNDS):
        candidates, weights = _row_candidates(residual, sigma)
        if extra is not None:
            top = weights.max() if weights.numel() else candidates.new_ones(())
            candidates = torch.cat([extra, candidates])
            weights = torch.cat([top.expand(extra.shape[0]), weights])
            extra = None
        vectors, scores = _scores(candidates, d, max(accept, MIXTURE_SCORE))
        passed = scores <= accept
        added: list[tuple[torch.Tensor, torch.Tensor]] = []
        for idx in torch.argsort(scores).tolist():
            single = not added and float(scores[idx]) <= MIXTURE_SCORE
            if not (bool(passed[idx]) or single) or len(chosen) == b:
                break
            q = vectors[idx]
            if any(abs(float(q @ other)) > SAME_DIRECTION_COSINE for other in chosen):
                continue
            same = (scores <= scores[idx].clamp_min(accept)) & (
                (vectors @ q).abs() > AVERAGED_COSINE
            )
            wts = weights[same]
            x = (candidates[same] * wts[:, None]).sum(0) / wts.sum().clamp_min(TINY_NORM)
            chosen.append(q)
            new.append(q)
            examples.append(x)
            added.append((q, x))
            if not bool(passed[idx]):
                break
        if not added or len(chosen) == b:
            if added:
                residual = residual - _contributions(added, basis, singular, right)
            break
        residual = residual - _contributions(added, basis, singular, right)
    n = start.shape[1] - 1
    if not new:
        return basis.new_zeros(b, 0), basis.new_zeros(0, n), residual
    return torch.stack(new, dim=1), torch.stack(examples), residual


def _missing_examples(residual: torch.Tensor, count: int) -> torch.Tensor:
    """``(count, n)`` starting points for examples no candidate gave.

    The residual left by peeling has rank ``count`` (up to noise and the peeled examples'
    errors); its leading right singular vectors, scaled so their bias coordinate is 1,
    span the missing examples (each exactly one when ``count == 1``).
    """
    _, _, vh = torch.linalg.svd(residual, full_matrices=False)
    top = vh[:count]
    scale = top[:, -1:]
    scale = torch.where(scale.abs() > TINY_NORM, scale, torch.ones_like(scale))
    return top[:, :-1] / scale


def _contributions(
    found: list[tuple[torch.Tensor, torch.Tensor]],
    basis: torch.Tensor,
    singular: torch.Tensor,
    right: torch.Tensor,
) -> torch.Tensor:
    """``(m, n + 1)`` sum of ``g_i [x_i^T | 1]`` of examples given by direction and estimate.

    With ``G = U Q`` and ``[X^T | 1] = Q^-1 S V^T``, example ``i``'s coordinates
    ``xi_i = V [x_i | 1]`` satisfy ``xi_i^T S^-1 q_i = 1``, which fixes the scale of its
    column ``g_i = U q_i / (xi_i^T S^-1 q_i)``.
    """
    total = basis.new_zeros(basis.shape[0], right.shape[1])
    for q, x in found:
        xa = torch.cat([x, x.new_ones(1)])
        xi = right @ xa
        denom = float(xi @ (q / singular))
        if abs(denom) <= TINY_NORM:
            continue
        total = total + torch.outer(basis @ q / denom, xa)
    return total


def _solve(
    basis: torch.Tensor, directions: torch.Tensor, denoised: torch.Tensor
) -> torch.Tensor | None:
    """``(k, n)`` examples from ``k`` directions: ``G = basis Q diag(s)``, scale from the bias.

    The examples are the least-squares fit of ``denoised`` by the columns ``basis Q``; the
    bias column of that fit is each example's scale (it must come out 1).
    """
    g = basis @ directions  # (m, k)
    coef = least_squares(g, denoised)  # (k, n + 1)
    scale = coef[:, -1:]
    good = scale.abs().squeeze(1) > TINY_NORM
    if not bool(good.any()):
        return None
    return coef[good, :-1] / scale[good]


def refine(
    denoised: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    sigma: float,
    *,
    deadline: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Alternating least squares under the ReLU patterns the weights predict.

    A unit counts as on for an example unless its pre-activation is below minus
    :data:`AMBIGUITY_Z` times the error the estimate leaves in it (:func:`error_rms` times
    the unit's weight norm): a unit flipped off by an estimation error would force a true
    non-zero to zero and drag the fit, while one left free costs a degree of freedom.

    Parameters
    ----------
    denoised:
        ``(m, n + 1)`` the rank-``b`` update ``[dW | db]``.
    x:
        ``(k, n)`` starting examples.
    w, c:
        ``(m, n)``, ``(m,)`` float64 layer parameters.
    sigma:
        Noise std per entry of the update.
    deadline:
        ``time.perf_counter()`` after which no further round starts (one always runs).

    Returns
    -------
    inputs:
        ``(k, n)`` refined examples.
    output_grads:
        ``(m, k)`` their gradient columns.
    rounds:
        Rounds run.
    """
    wnorm = w.norm(dim=1)  # (m,)
    pattern = _pattern(x, w, c, wnorm, x.new_zeros(x.shape[0]))
    g = _g_step(denoised, x, pattern)
    rounds = 0
    while rounds < MAX_REFINE_ROUNDS:
        rounds += 1
        x = _x_step(denoised, g)
        new = _pattern(x, w, c, wnorm, error_rms(g, sigma))
        changed = int((new != pattern).sum())
        pattern = new
        g = _g_step(denoised, x, pattern)
        if changed <= PATTERN_SETTLED or time.perf_counter() >= deadline:
            break
    return x, g, rounds


def _pattern(
    x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, wnorm: torch.Tensor, err: torch.Tensor
) -> torch.Tensor:
    """``(m, k)`` units allowed on: pre-activation above ``-AMBIGUITY_Z * |w_j| * err_i``."""
    pre = (x @ w.T + c).T  # (m, k)
    return pre > -AMBIGUITY_Z * wnorm[:, None] * err[None, :]


def error_rms(g: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(k,)`` predicted RMS error per input coordinate of examples fitted by ``g`` ``(m, k)``.

    The X-step is ``X^T = (G^T G)^-1 G^T A_b``: noise of std ``sigma`` per entry leaves
    ``sigma^2 [(G^T G)^-1]_ii`` per coordinate. The rank-``b`` truncation does not lower
    it: ``A_b`` keeps the noise's projection on the column space of ``G`` in full
    (``U_b U_b^T N``), and that is all ``G^T`` sees. Measured (float32, Fashion-MNIST,
    784 -> 1000, b = 16, Opacus noise multiplier 1e-4): predicted over measured 0.98.
    """
    inverse = torch.linalg.pinv(g.T @ g)
    return (sigma * sigma * inverse.diagonal().clamp_min(0.0)).sqrt()


def _g_step(denoised: torch.Tensor, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(m, k)`` per-row least squares of ``denoised[j]`` by the examples on at unit ``j``."""
    k = x.shape[0]
    xa = torch.cat([x, x.new_ones(k, 1)], dim=1)  # (k, n + 1)
    gram = xa @ xa.T  # (k, k)
    rhs = denoised @ xa.T  # (m, k)
    p = pattern.to(x.dtype)
    grams = gram[None] * p[:, :, None] * p[:, None, :]
    ridge = ROW_RIDGE * float(gram.diagonal().max())
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    grams = grams + eye * (1.0 - p)[:, :, None] + ridge * eye
    return torch.linalg.solve(grams, (rhs * p)[:, :, None])[:, :, 0] * p


def _x_step(denoised: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(k, n)`` examples fitted to every row at once: ``X^T = lstsq(G, dW)``."""
    return least_squares(g, denoised[:, :-1])


def _conclude(
    a: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    noise: NoiseEstimate,
    rounds: int,
    directions: int,
    out_of_time: bool = False,
) -> ApproximateInversion:
    """Error bars, the zero-row noise estimate and the residual check of a refined fit."""
    m, cols = a.shape
    k = x.shape[0]
    sigma = noise.sigma
    errors = error_rms(g, sigma)
    pre = x @ w.T + c  # (k, m)
    typical = float(pre.abs().median()) or 1.0
    dead = (pre < -DEAD_ROW_MARGIN * typical).all(dim=0)
    xa = torch.cat([x, x.new_ones(k, 1)], dim=1)
    residual = float((a - g @ xa).norm())
    fitted = int((g != 0).sum()) + k * (cols - 1)
    expected = sigma * math.sqrt(max(1, m * cols - fitted))
    ratio = residual / expected if expected > 0 else math.inf
    consistent = ratio <= 1.0 + CONSISTENT_RESIDUAL
    if not (consistent and noise.confident):
        # the noise model behind the error bars does not describe this fit (the examples
        # are not clearly above the noise, or the fit leaves more than noise): measured
        # at b = 16, noise multiplier 1e-3, they promised 38 dB where 13 dB came out
        errors = torch.full_like(errors, math.nan)
    return ApproximateInversion(
        inputs=x,
        output_grads=g,
        error_rms=errors,
        noise=noise,
        zero_row_sigma=zero_row_sigma(a, dead),
        residual_ratio=ratio,
        consistent=consistent,
        rounds=rounds,
        directions=directions,
        out_of_time=out_of_time,
    )
