"""Exhaustive search for small layers: every row subset, then verified combinations.

On a small layer (few live units, small batch) every ``(r-1)``-row subset of the basis
can be enumerated. Each subset whose kernel is one-dimensional gives a candidate
direction; a true gradient column is among them whenever its zero set determines it
(docs/algorithm.md, fact 4), whatever the BLAS rounds. Sparsity alone cannot tell a true
column whose zero set has exactly ``r - 1`` live rows from a direction fitted to any
``r - 1`` rows, so with the layer's weights the candidates are combined, sparsest
first, and a combination is accepted only when every example of its complete solve
passes its own ReLU-pattern check (fact 7).

This is the deterministic answer for small problems: whether it succeeds does not depend
on random draws or on the order in which a CPU's BLAS sums, only on margins of many
orders of magnitude (float64 zeros against non-zeros).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator

import torch

from spear.linalg import least_squares
from spear.verify import LayerView

__all__ = [
    "EXHAUSTIVE_MAX_COMBINATIONS",
    "EXHAUSTIVE_MAX_SUBSETS",
    "candidate_directions",
    "combinations_by_last",
    "exhaustive_subsets",
    "verified_combination",
]

#: Problems with at most this many ``(r-1)``-subsets of live rows are enumerated.
EXHAUSTIVE_MAX_SUBSETS = 20_000
#: At most this many combinations of candidates are screened (about 10 us each, batched;
#: the few survivors are solved and verified exactly).
EXHAUSTIVE_MAX_COMBINATIONS = 400_000
#: Candidates whose smallest singular value is below this fraction of the largest are
#: linearly dependent and are not combined.
RANK_TOL = 1e-8
#: Combinations screened per batch (:func:`_screen`).
COMBINATION_CHUNK = 512
#: Screening thresholds, deliberately loose (the survivors are verified exactly): a
#: predicted zero set determines a direction when its Gram matrix's second eigenvalue
#: has a root above ``SCREEN_KERNEL_GAP``; units within ``SCREEN_CLEAR`` of an example's
#: largest pre-activation are not compared; gradient entries below ``SCREEN_ZERO`` times
#: the zero tolerance of their column's largest count as zero; at most
#: ``SCREEN_MISMATCH`` of the compared units may disagree.
SCREEN_KERNEL_GAP = 1e-6
SCREEN_CLEAR = 1e-6
SCREEN_ZERO = 100.0
SCREEN_MISMATCH = 0.05
#: Subsets solved per batched SVD.
SUBSET_CHUNK = 4096


def exhaustive_subsets(live_count: int, rank: int) -> int:
    """Number of ``(rank-1)``-row subsets of ``live_count`` rows.

    Examples
    --------
    >>> exhaustive_subsets(12, 4)
    220
    """
    return math.comb(live_count, max(rank - 1, 0))


def candidate_directions(
    basis: torch.Tensor,
    live: torch.Tensor,
    zero_tol: float,
    degeneracy_tol: float,
    realizable: Callable[[torch.Tensor], bool] | None = None,
    deadline: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every direction some ``(r-1)``-subset of live rows determines, sparsest first.

    Parameters
    ----------
    basis:
        ``(m, r)`` float64 with orthonormal columns.
    live:
        ``(m,)`` bool, rows that are not zero for every example.
    zero_tol:
        Relative zero tolerance of an entry of ``basis @ q``.
    degeneracy_tol:
        Singular values at or below ``degeneracy_tol * sqrt(k)`` of a ``k``-row subset
        count as zero.
    realizable:
        When given, a zero set ``(m,)`` bool is kept only when it returns ``True`` (for
        example: it is not proven that no input of the layer is off exactly there,
        :meth:`spear.realizable.RealizabilityTest.refutes`).
    deadline:
        ``time.perf_counter()`` value after which no more candidates are made (those
        made so far are returned).

    Returns
    -------
    directions:
        ``(c, r)`` unit kernel vectors, one per distinct zero set, the exact kernel of
        that whole zero set.
    zero_counts:
        ``(c,)`` live rows on which each direction is zero, descending.
    """
    r = basis.shape[1]
    dev = basis.device
    if r == 1:
        one = torch.ones(1, 1, dtype=basis.dtype, device=dev)
        return one, torch.tensor([int(live.sum())], device=dev)
    rows = torch.nonzero(live).flatten()
    zero_sets: dict[bytes, torch.Tensor] = {}
    subsets = itertools.combinations(rows.tolist(), r - 1)
    while time.perf_counter() < deadline:
        chunk = list(itertools.islice(subsets, SUBSET_CHUNK))
        if not chunk:
            break
        pick = torch.tensor(chunk, device=dev)  # (k, r-1)
        _, s, vh = torch.linalg.svd(basis[pick], full_matrices=True)
        one_dim = s[:, -1] > degeneracy_tol * math.sqrt(r - 1)
        q = vh[one_dim, -1, :]  # (k', r)
        values = basis @ q.T  # (m, k')
        zeros = (values.abs() <= zero_tol * values.abs().amax(dim=0, keepdim=True)) & live[:, None]
        for column in zeros.T:
            key = column.cpu().numpy().tobytes()
            if key not in zero_sets:
                zero_sets[key] = column
    directions: list[torch.Tensor] = []
    counts: list[int] = []
    for zero_set in zero_sets.values():
        if time.perf_counter() >= deadline:
            break
        if realizable is not None and not realizable(zero_set):
            continue
        sub = basis[zero_set]
        _, s, vh = torch.linalg.svd(sub, full_matrices=True)
        full = torch.zeros(r, dtype=basis.dtype, device=dev)
        full[: s.numel()] = s
        if float(full[-2]) <= degeneracy_tol * math.sqrt(sub.shape[0]):
            continue  # the whole zero set leaves more than one direction: not determined
        directions.append(vh[-1])
        counts.append(int(zero_set.sum()))
    if not directions:
        return torch.zeros(0, r, dtype=basis.dtype, device=dev), torch.zeros(0, device=dev)
    count_tensor = torch.tensor(counts, device=dev)
    order = torch.argsort(count_tensor, descending=True, stable=True)
    return torch.stack(directions)[order], count_tensor[order]


def verified_combination(
    basis: torch.Tensor,
    left: torch.Tensor,
    bias_grad: torch.Tensor,
    layer: LayerView,
    live: torch.Tensor,
    directions: torch.Tensor,
    zero_tol: float,
    complete: Callable[[torch.Tensor], torch.Tensor | None],
    solve_and_verify: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None],
    deadline: float,
    max_combinations: int = EXHAUSTIVE_MAX_COMBINATIONS,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``r - 1`` candidates that, completed by one more, verify as a whole.

    With ``r - 1`` true directions known, the last example is exact in a complete solve
    with *any* further column outside their span (the damage of a wrong column falls on
    the examples mixed into it, fact 5, and the filler mixes none of the known ones
    into the last); its own ReLU pattern then gives the last direction, even when its
    zero set has exactly ``r - 1`` live rows and sparsity alone cannot single it out.
    Combinations are screened in batches (:func:`_screen`); the few that pass are
    completed and verified exactly by the callables.

    Parameters
    ----------
    basis:
        ``(m, r)`` orthonormal basis of the weight gradient's column space.
    left, bias_grad:
        ``(m, b)`` left factor of the weight gradient and ``(m,)`` its bias gradient.
    layer:
        The layer's weights in row-space coordinates.
    live:
        ``(m,)`` bool, units not dead for the whole batch.
    directions:
        ``(c, r)`` candidate kernel vectors, sparsest first.
    zero_tol:
        Relative zero tolerance of the gradient's entries.
    complete:
        Given ``(m, r-1)`` unit directions, the direction ``(m,)`` of the example they
        leave out, from its own ReLU pattern
        (:func:`spear.inversion.solve.complete_last`), or ``None``.
    solve_and_verify:
        Given ``(m, r)`` unit gradient directions, the complete solve ``(coords (r, b),
        grads (m, r))`` when every example passes verification, else ``None``.
    deadline:
        ``time.perf_counter()`` value at which the search gives up.
    max_combinations:
        Upper bound on the combinations tried.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor] | None
        The verified solve, or ``None``.
    """
    r = basis.shape[1]
    if r == 1:
        return solve_and_verify(basis)
    if directions.shape[0] < r - 1:
        return None
    columns = basis @ directions.T  # (m, c)
    combos = combinations_by_last(directions.shape[0], r - 1)
    tried = 0
    while tried < max_combinations and time.perf_counter() < deadline:
        chunk = list(itertools.islice(combos, min(COMBINATION_CHUNK, max_combinations - tried)))
        if not chunk:
            break
        tried += len(chunk)
        index = torch.tensor(chunk, device=basis.device)  # (k, r-1)
        screened = _screen(basis, left, bias_grad, layer, live, directions[index], zero_tol)
        for i in screened.tolist():
            if time.perf_counter() > deadline:
                return None
            known = columns[:, chunk[i]]
            last = complete(known)
            if last is None:
                continue
            solved = solve_and_verify(torch.cat([known, last[:, None]], dim=1))
            if solved is not None:
                return solved
    return None


def _screen(
    basis: torch.Tensor,
    left: torch.Tensor,
    bias_grad: torch.Tensor,
    layer: LayerView,
    live: torch.Tensor,
    known: torch.Tensor,
    zero_tol: float,
) -> torch.Tensor:
    """Which of ``k`` combinations ``known`` ``(k, r-1, r)`` may complete to a solution.

    For all at once: a filler orthogonal to the known directions, the complete solve,
    the last example's predicted off-set, its kernel (by the Gram matrix: accurate enough
    to choose, the exact kernel is recomputed for the survivors), the complete solve with
    it and the share of clear units whose predicted state disagrees with the gradient's
    zero pattern. A combination survives when that share is at most ``SCREEN_MISMATCH``
    for every example. Returns the indices of the survivors, ``(s,)``.
    """
    _, s, vh = torch.linalg.svd(known, full_matrices=True)
    independent = s[:, -1] > RANK_TOL * s[:, 0]
    known_cols = torch.einsum("mr,kjr->kmj", basis, known)  # (k, m, r-1)
    filler = basis @ vh[:, -1, :].T  # (m, k)
    cols = torch.cat([known_cols, filler.T[:, :, None]], dim=2)  # (k, m, r)
    coords, _ = _batched_solve(cols, left, bias_grad)
    z = coords[:, -1, :] @ layer.weight_coords.T  # (k, m)
    if layer.bias is not None:
        z = z + layer.bias
    off = ((z <= 0) & live).to(basis.dtype)
    gram = torch.einsum("mi,km,mj->kij", basis, off, basis)  # (k, r, r)
    evals, evecs = torch.linalg.eigh(gram)
    determined = evals[:, 1].clamp_min(0).sqrt() > SCREEN_KERNEL_GAP
    last_cols = basis @ evecs[:, :, 0].T  # (m, k)
    cols = torch.cat([known_cols, last_cols.T[:, :, None]], dim=2)
    coords, grads = _batched_solve(cols, left, bias_grad)
    z = coords @ layer.weight_coords.T  # (k, r, m)
    if layer.bias is not None:
        z = z + layer.bias
    clear = z.abs() > SCREEN_CLEAR * z.abs().amax(dim=2, keepdim=True)
    grad_zero = grads.abs() <= SCREEN_ZERO * zero_tol * grads.abs().amax(dim=1, keepdim=True)
    disagree = ((z <= 0) != grad_zero.transpose(1, 2)) & clear & live
    share = disagree.sum(dim=2) / clear.sum(dim=2).clamp_min(1)  # (k, r)
    ok = independent & determined & (share <= SCREEN_MISMATCH).all(dim=1)
    return torch.nonzero(ok).flatten()


def _batched_solve(
    cols: torch.Tensor, left: torch.Tensor, bias_grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales from the bias gradient, then coordinates, for ``k`` column sets at once.

    ``cols`` ``(k, m, r)`` unit directions; returns ``coords`` ``(k, r, b)`` and
    ``grads`` ``(k, m, r)``.
    """
    rhs = bias_grad[None, :, None].expand(cols.shape[0], -1, 1)
    scales = least_squares(cols, rhs)  # (k, r, 1)
    grads = cols * scales.transpose(1, 2)
    coords = least_squares(grads, left.expand(cols.shape[0], -1, -1))
    return coords, grads


def combinations_by_last(count: int, size: int) -> Iterator[list[int]]:
    """``size``-combinations of ``range(count)`` in order of their largest element.

    Every combination of the first ``k`` items comes before any that uses item ``k``, so
    a search over candidates sorted sparsest first stays among the sparsest.

    Examples
    --------
    >>> list(combinations_by_last(4, 2))
    [[0, 1], [0, 2], [1, 2], [0, 3], [1, 3], [2, 3]]
    """
    for last in range(size - 1, count):
        for head in itertools.combinations(range(last), size - 1):
            yield [*head, last]
