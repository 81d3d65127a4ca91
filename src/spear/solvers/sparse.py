"""A polynomial solver for large batches: atom peeling and exact back-substitution.

The sought directions ``q_i`` are the columns of ``Q`` with ``basis @ Q = G`` (up to the
columns' scales). Write ``A = Q^{-1}`` and call its rows ``a_i`` the *atoms*: row ``j`` of the
basis is ``basis[j] = sum_i G[j, i] a_i``, a combination of the atoms of the examples that
turn unit ``j`` on. On real data many units are on for very few examples (docs/algorithm.md,
fact 10), and a unit that is on for exactly one example ``i`` gives a row parallel to
``a_i``. Two such rows are exactly parallel, which no other pair of rows is (generically):
that is an exact, sampling-free test (docs/algorithm.md, fact 8, without the bias).

1. **Peeling (the cascade).** Find groups of exactly parallel rows; each group gives an atom.
   When none is left, look for rank-2 triples of rows (two examples' atoms span them) and
   peel that plane as a group. Project all of this round's groups out of the rows
   (``basis @ K`` with ``K`` an orthonormal basis of their orthogonal complement). The
   projected rows are an instance of the same problem without those examples: a row that
   was on for one peeled and one remaining example is now parallel to the remaining
   example's atom, so new parallel pairs appear. Repeat until nothing is found.
2. **Residual.** When the cascade stalls with a small residual rank ``d``, its directions
   are found by sampling ``d - 1`` rows at a time (:class:`SamplingSolver`, with a capped
   sample budget) in the residual coordinates; they are true directions of the problem.
3. **Back-substitution** (last round first). An example peeled in round ``t`` has
   ``q = K_t u + sum_s gamma_s q_s`` with ``u`` the dual of its group within the round and
   ``q_s`` the directions of the examples peeled later. With ``v = basis @ K_t u`` and the
   known columns ``g_s = basis @ q_s``, ``v - sum_s gamma_s g_s`` must vanish on the
   example's zero set (about half of the rows). A row where only one ``g_s`` with unknown
   ``gamma_s`` is non-zero proposes a value for it; the true value is proposed by every
   such row in the zero set, a wrong one by one row only, so the value proposed by the most
   rows (at least two) is exact. Known coefficients make more rows usable; this propagates.
   When it stalls, rows with two unknowns (three concurrent lines) and, for at most
   ``MAX_RANSAC_DIM`` unknowns, a random search finish it. A two-example group, or later
   directions that were not found, are resolved first on the rows where every known later
   column is zero (a small instance solved by sampling).
4. **Polish.** Every candidate is checked exactly: its zero set must have a clean
   one-dimensional kernel equal to it (:func:`spear.linalg.pure_kernel`); otherwise it goes
   through :func:`spear.solvers.polish.purify`. No approximate vector is ever returned.

Cost: a cascade round is ``O(m r)`` plus a sort (``O(tries m r)`` when it searches for
pairs), the back-substitution ``O(m r)`` per direction; no ``m x m`` matrix is formed.
The method needs units that are on for very few examples, which real images provide
(docs/algorithm.md, fact 10). Measured on Fashion-MNIST (untrained and briefly trained
``784 -> m -> 10`` MLPs, float64): all columns at ``b = 32`` (``m = 1000, 2000``) and
``b = 64`` (``m = 2000``), 33-64 of 64 at ``m = 1000``, 113-122 of 128 at ``m = 2000``;
the cascade stalls at once (nothing found) at ``b = 128, m = 1000`` and ``b = 256``, where
too few units are on for one or two examples only. The examples peeled first need the
longest back-substitution and are the ones missed; the layer driver's own peeling
removes found examples and calls again on the smaller residual.
"""

from __future__ import annotations

import math

import torch

from spear.inversion.pool import same_direction
from spear.linalg import null_vectors, pure_kernel, zero_mask
from spear.solvers.base import Budget, Directions, SearchSpec
from spear.solvers.polish import live_rows, purify
from spear.solvers.sampling import SamplingSolver, expected_samples

__all__ = ["SparseSolver"]

#: Vectors compared inside the cascade are approximate (back-substituted coefficients, not
#: yet polished to their exact zero sets): two of them count as the same direction when
#: ``|<u, v>| > 1 - CASCADE_SAME_DIRECTION``, a looser test than the pool's exact
#: :data:`spear.inversion.pool.SAME_DIRECTION`. (The pool's value passes this solver's
#: tests and gives the same result on Fashion-MNIST b = 64; it is kept until measured on
#: the larger batches where the cascade does most of its work.)
CASCADE_SAME_DIRECTION = 1e-6
#: A candidate is already exact (the fast path of polishing) when the pure kernel of its
#: zero set agrees with it to ``1 - EXACT_CANDIDATE``: tighter than the pool's rule, so
#: that a candidate merely close to an exact direction is split by the full polish.
EXACT_CANDIDATE = 1e-9
#: Residual ranks up to this are finished by sampling.
MAX_SAMPLING_RANK = 16
#: Samples granted to that sampling, in units of its coupon-collector estimate.
RESIDUAL_SAMPLING_FACTOR = 8.0
#: Two unit rows count as parallel when they differ (after fixing the sign) by at most
#: ``max(PARALLEL_FLOOR, PARALLEL_FACTOR * zero_tol)``.
PARALLEL_FLOOR = 1e-9
PARALLEL_FACTOR = 1.0
#: Relative agreement of two coefficient proposals in the back-substitution:
#: ``max(AGREE_TOL, AGREE_FACTOR * zero_tol)``.
AGREE_TOL = 1e-7
AGREE_FACTOR = 1.0
#: Rows tried per cascade round in the search for two-example groups.
PAIR_SEARCH_ROWS = 200
#: Largest dimension (group plus missing later directions) of a round's subproblem.
MAX_GROUP_DIM = 6
#: Samples per direction (times ``2^(dim-1)``) in a round's subproblem.
GROUP_SAMPLES = 64
#: Unknowns left to a random search when the coefficient propagation stalls.
MAX_RANSAC_DIM = 4
#: Samples (times ``2^u``) of that search.
RANSAC_SAMPLES = 64


class SparseSolver:
    """Atom peeling, residual sampling and exact back-substitution (module docstring).

    Parameters
    ----------
    max_sampling_rank:
        Largest residual rank handed to sampling when the cascade stalls.
    pair_search_rows:
        Rows tried as the first member of a rank-2 triple per cascade round (the search
        for two-example groups runs only when no parallel pair is left).
    """

    name = "sparse"

    def __init__(
        self, max_sampling_rank: int = MAX_SAMPLING_RANK, pair_search_rows: int = PAIR_SEARCH_ROWS
    ) -> None:
        self.max_sampling_rank = max_sampling_rank
        self.pair_search_rows = pair_search_rows

    def __call__(self, spec: SearchSpec, budget: Budget) -> Directions:
        """Search until ``spec.target`` directions are found or the budget ends.

        Parameters
        ----------
        spec:
            ``spec.basis`` is ``(m, r)`` float64 with orthonormal columns.
        budget:
            Deadline and sample cap (one sample per cascade round, per candidate direction
            polished and per row subset drawn by the residual sampling).

        Returns
        -------
        Directions
            ``(k, r)`` exact unit directions, distinct up to sign, none in ``spec.known``.
        """
        basis = spec.basis
        r = basis.shape[1]
        state = _State(spec, budget)
        if r == 0 or spec.target <= 0:
            return state.pack()
        rows = basis[state.live]
        stages, residual = _cascade(rows, spec, state, self.pair_search_rows)
        later = self._finish_residual(residual, state)
        k_next = residual
        for k_t, groups in reversed(stages):
            if state.done():
                break
            later = _back_substitute(k_t, groups, k_next, later, state)
            k_next = k_t
        return state.pack()

    def _finish_residual(self, residual: torch.Tensor, state: _State) -> list[torch.Tensor]:
        """Directions found in the residual coordinates ``(r, d)`` (by sampling, small d)."""
        spec = state.spec
        d = residual.shape[1]
        if d == 0:
            return []
        if d == 1:
            return state.add_candidate(residual[:, 0])
        if d > self.max_sampling_rank or state.done():
            return []
        sub_basis = spec.basis @ residual  # (m, d), orthonormal columns
        sub = SearchSpec(
            basis=sub_basis,
            target=d,
            zero_tol=spec.zero_tol,
            degeneracy_tol=spec.degeneracy_tol,
            min_zero_fraction=spec.min_zero_fraction,
            row_weights=spec.row_weights,
            known=torch.zeros(0, d, dtype=sub_basis.dtype, device=sub_basis.device),
            generator=spec.generator,
            separation=spec.separation,
        )
        left = max(0, state.budget.max_samples - state.samples)
        cap = math.ceil(RESIDUAL_SAMPLING_FACTOR * expected_samples(d))
        found = SamplingSolver()(sub, Budget(state.budget.deadline, min(left, cap)))
        state.samples += found.samples
        out: list[torch.Tensor] = []
        for v in found.vectors:
            out.extend(state.add_candidate(residual @ v))
        return out


class _State:
    """Found directions, sample count and stopping rules of one call."""

    def __init__(self, spec: SearchSpec, budget: Budget) -> None:
        self.spec = spec
        self.budget = budget
        self.samples = 0
        self.found: list[torch.Tensor] = []
        self.known = [k / k.norm() for k in spec.known]
        self.live = live_rows(spec.basis, spec.zero_tol)

    def done(self) -> bool:
        """Whether to stop: target reached, time up or samples spent."""
        return (
            len(self.found) >= self.spec.target
            or self.budget.expired()
            or self.samples >= self.budget.max_samples
        )

    def add_candidate(self, q: torch.Tensor) -> list[torch.Tensor]:
        """Polish ``q`` (r,) and record the new pure directions.

        Returns every pure direction obtained (also known or already found ones), so that
        the back-substitution can use them.
        """
        self.samples += 1
        if not bool(torch.isfinite(q).all()) or float(q.norm()) == 0.0:
            return []
        pure = self._polish(q / q.norm())
        for p in pure:
            if not _seen(p, self.found) and not _seen(p, self.known):
                self.found.append(p)
                if self.spec.on_progress is not None:
                    self.spec.on_progress(len(self.found))
        return pure

    def _polish(self, q: torch.Tensor) -> list[torch.Tensor]:
        """Exact pure directions from ``q`` (r,): a fast path for exact candidates.

        A candidate that is already exact has a zero set whose kernel is ``q`` itself: one
        economy SVD settles it. Anything else goes through the shared
        :func:`spear.solvers.polish.purify` (which also splits mixtures).
        """
        spec = self.spec
        basis = spec.basis
        r = basis.shape[1]
        v = basis @ q
        zeros = zero_mask(v[:, None], spec.zero_tol)[:, 0] & self.live
        k = int(zeros.sum())
        if k >= max(r - 1, 1) and k >= spec.min_zero_fraction * int(self.live.sum()):
            pure = pure_kernel(basis[zeros], spec.degeneracy_tol, spec.separation)
            if pure is not None and same_direction(pure, q, EXACT_CANDIDATE):
                return [pure]
        return purify(basis, q, spec)

    def pack(self) -> Directions:
        """The :class:`Directions` record of what was found."""
        basis = self.spec.basis
        r = basis.shape[1]
        if not self.found:
            empty = torch.zeros(0, r, dtype=basis.dtype, device=basis.device)
            return Directions(
                vectors=empty,
                zero_fraction=torch.zeros(0, dtype=basis.dtype, device=basis.device),
                samples=self.samples,
            )
        vec = torch.stack(self.found)
        vals = basis @ vec.T
        zeros = zero_mask(vals, self.spec.zero_tol) & self.live[:, None]
        frac = zeros.sum(dim=0).to(basis.dtype) / max(1, int(self.live.sum()))
        return Directions(vectors=vec, zero_fraction=frac, samples=self.samples)


def _seen(q: torch.Tensor, among: list[torch.Tensor]) -> bool:
    """Whether unit ``q`` equals one of ``among`` up to sign."""
    return any(same_direction(q, f, CASCADE_SAME_DIRECTION) for f in among)


def _complement(cols: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``(d, d - p)`` of the orthogonal complement of ``cols`` (d, p)."""
    u, _, _ = torch.linalg.svd(cols, full_matrices=True)
    out: torch.Tensor = u[:, cols.shape[1] :]
    return out


def _cascade(
    rows: torch.Tensor, spec: SearchSpec, state: _State, pair_rows: int
) -> tuple[list[tuple[torch.Tensor, list[torch.Tensor]]], torch.Tensor]:
    """Peel groups of examples found from exactly dependent rows until none is left.

    Parameters
    ----------
    rows:
        ``(n, r)`` the live rows of the basis.
    spec:
        Tolerances and random generator.
    state:
        Sample count and deadline.
    pair_rows:
        Rows tried per round in the search for rank-2 triples.

    Returns
    -------
    stages:
        One ``(K_t, groups_t)`` per round: ``K_t`` ``(r, d_t)`` orthonormal coordinates of
        the round's residual; each group ``(d_t, p)`` spans the atoms of ``p`` (1 or 2)
        examples in those coordinates; the groups of a round are linearly independent.
    residual:
        ``(r, d)`` orthonormal coordinates of what the cascade could not peel.
    """
    r = rows.shape[1]
    k_cur = torch.eye(r, dtype=rows.dtype, device=rows.device)
    norms0 = rows.norm(dim=1)
    tol = max(PARALLEL_FLOOR, PARALLEL_FACTOR * spec.zero_tol)
    stages: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    while k_cur.shape[1] > 0 and not state.done():
        d = k_cur.shape[1]
        state.samples += 1
        if d == 1:
            stages.append((k_cur, [torch.ones(1, 1, dtype=rows.dtype, device=rows.device)]))
            k_cur = k_cur[:, :0]
            break
        proj = rows @ k_cur  # (n, d)
        norms = proj.norm(dim=1)
        keep = norms > max(spec.zero_tol, 1e-12) * 1e2 * norms0
        unit = proj[keep] / norms[keep, None]
        groups = [a[:, None] for a in _parallel_directions(unit, spec, tol)]
        if not groups and d > 2:
            groups = _pair_spans(unit, spec, tol, pair_rows)
        groups = _independent(groups)
        if not groups:
            break
        stages.append((k_cur, groups))
        k_cur = k_cur @ _complement(torch.cat(groups, dim=1))
    return stages, k_cur


def _independent(groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """Greedily keep groups whose columns add their full dimension to the span."""
    kept: list[torch.Tensor] = []
    dim = 0
    for g in groups:
        cand = torch.cat([*kept, g], dim=1)
        s = torch.linalg.svdvals(cand)
        rank = int((s > 1e-6 * s[0]).sum())
        if rank == dim + g.shape[1]:
            kept.append(g)
            dim = rank
    return kept


def _parallel_directions(unit: torch.Tensor, spec: SearchSpec, tol: float) -> list[torch.Tensor]:
    """Unit directions shared by at least two rows of ``unit`` (up to sign).

    Parameters
    ----------
    unit:
        ``(n, d)`` unit rows.
    spec:
        Random generator.
    tol:
        Largest distance of two unit rows (after fixing signs) that counts as parallel.

    Returns
    -------
    list[torch.Tensor]
        Distinct ``(d,)`` unit directions.
    """
    n, d = unit.shape
    if n < 2:
        return []
    probes = torch.randn(d, 2, generator=spec.generator, dtype=unit.dtype).to(unit.device)
    sign = torch.sign(unit @ probes[:, 0])
    sign[sign == 0] = 1.0
    su = unit * sign[:, None]
    su = su[torch.argsort(su @ probes[:, 1])]
    close = (su[1:] - su[:-1]).norm(dim=1) <= tol  # adjacent pairs
    if not bool(close.any()):
        return []
    begin = torch.nonzero(close & ~torch.cat([close.new_zeros(1), close[:-1]])).flatten()
    out: list[torch.Tensor] = []
    for s in begin.tolist():
        e = s
        while e < close.numel() and bool(close[e]):
            e += 1
        a = su[s : e + 1].mean(dim=0)
        a = a / a.norm()
        if not _seen(a, out):
            out.append(a)
    return out


def _pair_spans(unit: torch.Tensor, spec: SearchSpec, tol: float, tries: int) -> list[torch.Tensor]:
    """Two-dimensional spans holding at least three rows (rank-2 triples).

    Three rows are dependent (generically) only when they share a two-example support:
    the span is then ``span(a_k, a_l)`` for two examples. For each tried row ``u``, the
    other rows are projected on ``u``'s complement and searched for parallel pairs.

    Parameters
    ----------
    unit:
        ``(n, d)`` unit rows.
    spec:
        Random generator.
    tol:
        Parallelism tolerance.
    tries:
        How many rows to try as the first member.

    Returns
    -------
    list[torch.Tensor]
        ``(d, 2)`` orthonormal bases of the spans found.
    """
    n, _d = unit.shape
    order = torch.randperm(n, generator=spec.generator)[:tries].tolist()
    out: list[torch.Tensor] = []
    for i in order:
        u = unit[i]
        if any(float((g.T @ u).norm()) > 1 - tol for g in out):
            continue  # already inside a found span
        proj = unit - (unit @ u)[:, None] * u[None, :]
        norms = proj.norm(dim=1)
        keep = norms > 1e-6
        sub = proj[keep] / norms[keep, None]
        for w in _parallel_directions(sub, spec, tol):
            span = torch.stack([u, w - (w @ u) * u], dim=1)
            span = span / span.norm(dim=0, keepdim=True)
            if all(float(torch.linalg.svdvals(g.T @ span)[1]) < 1 - tol for g in out):
                out.append(span)
    return out


def _back_substitute(
    k_t: torch.Tensor,
    groups: list[torch.Tensor],
    k_next: torch.Tensor,
    later: list[torch.Tensor],
    state: _State,
) -> list[torch.Tensor]:
    """Directions of the examples peeled in one round, given the later ones.

    Parameters
    ----------
    k_t:
        ``(r, d)`` residual coordinates of the round.
    groups:
        The round's groups ``(d, p)``.
    k_next:
        ``(r, d')`` coordinates of what was left after the round: spanned by the
        directions of the examples peeled later (and those never peeled).
    later:
        Unit directions ``(r,)`` found for later examples (possibly not all of them).
    state:
        Where found directions go.

    Returns
    -------
    list[torch.Tensor]
        ``later`` extended by this round's directions.
    """
    basis = state.spec.basis
    cols = torch.cat(groups, dim=1)  # (d, P)
    dual = cols @ torch.linalg.inv(cols.T @ cols)  # dual basis of the groups in their span
    known = torch.stack(later, dim=1) if later else basis.new_zeros(basis.shape[1], 0)
    missing = _missing(k_next, known)  # (r, u) part of k_next no later direction explains
    g_known = basis @ known  # (m, n)
    support = ~zero_mask(g_known, state.spec.zero_tol) if later else None
    out = list(later)
    col = 0
    for g in groups:
        p = g.shape[1]
        sub = k_t @ dual[:, col : col + p]
        col += p
        if state.done():
            break
        for x in _group_candidates(sub, missing, support, state):
            if state.done():
                break
            v = basis @ x
            dense = basis @ missing
            gamma = _coefficients(v, g_known, support, dense, state)
            if gamma is None:
                continue
            q = x - torch.cat([known, missing], dim=1) @ gamma
            for p_dir in state.add_candidate(q):
                if not _seen(p_dir, out):
                    out.append(p_dir)
    return out


def _missing(k_next: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``(r, u)`` of the part of ``span(k_next)`` not spanned by ``known``."""
    d = k_next.shape[1]
    if known.shape[1] == 0:
        return k_next
    coords = k_next.T @ known  # (d, n)
    u, s, _ = torch.linalg.svd(coords, full_matrices=True)
    rank = int((s > 1e-8 * s[0]).sum()) if s.numel() else 0
    out: torch.Tensor = k_next @ u[:, rank:d]
    return out


def _group_candidates(
    sub: torch.Tensor, missing: torch.Tensor, support: torch.Tensor | None, state: _State
) -> list[torch.Tensor]:
    """Directions ``x`` (r,) of a group up to later directions.

    With ``p = 1`` and nothing missing the group's dual vector is the answer. Otherwise
    the rows where every known later column is zero see only the group and the missing
    directions: a ``(p + u)``-dimensional instance on those rows, solved by sampling.
    """
    p = sub.shape[1]
    u = missing.shape[1]
    if p == 1 and u == 0:
        return [sub[:, 0]]
    if p + u > MAX_GROUP_DIM:
        return []
    spec = state.spec
    basis = spec.basis
    y, _ = torch.linalg.qr(torch.cat([sub, missing], dim=1))  # (r, p+u)
    quiet = state.live.clone()
    if support is not None:
        quiet &= ~support.any(dim=1)
    vals = basis[quiet] @ y  # (k, p+u)
    dim = p + u
    k = vals.shape[0]
    if k < dim:
        return []
    n_draw = GROUP_SAMPLES * 2 ** (dim - 1)
    keys = torch.rand(n_draw, k, generator=spec.generator, dtype=vals.dtype).to(vals.device)
    pick = keys.topk(dim - 1, dim=1).indices if dim > 1 else keys[:, :0].long()
    state.samples += n_draw
    mats = vals[pick]  # (n_draw, dim-1, dim)
    cand = null_vectors(mats)  # (n_draw, dim)
    res = vals @ cand.T  # (k, n_draw)
    nz = zero_mask(res, spec.zero_tol).sum(dim=0)
    order = torch.argsort(nz, descending=True).tolist()
    chosen: list[torch.Tensor] = []
    for idx in order:
        if len(chosen) >= dim or int(nz[idx]) < dim:
            break
        c = cand[idx]
        if not _seen(c, chosen):
            chosen.append(c)
    return [y @ c for c in chosen]


def _coefficients(
    v: torch.Tensor,
    g: torch.Tensor,
    support: torch.Tensor | None,
    dense: torch.Tensor,
    state: _State,
) -> torch.Tensor | None:
    """Coefficients ``gamma`` with ``v - [g, dense] @ gamma`` zero on the target's zero set.

    Parameters
    ----------
    v:
        ``(m,)`` the combination to clean.
    g:
        ``(m, n)`` known sparse columns.
    support:
        ``(m, n)`` where ``g`` is non-zero (``None`` when ``n == 0``).
    dense:
        ``(m, u)`` columns without a known zero pattern (few).
    state:
        Tolerances, live rows and random generator.

    Returns
    -------
    torch.Tensor | None
        ``(n + u,)``, or ``None`` when some coefficient cannot be determined.
    """
    n, u = g.shape[1], dense.shape[1]
    live = state.live
    cols = torch.cat([g, dense], dim=1)
    sup = torch.ones(v.shape[0], n + u, dtype=torch.bool, device=v.device)
    if support is not None:
        sup[:, :n] = support
    sup &= live[:, None]
    gamma = torch.zeros(n + u, dtype=v.dtype, device=v.device)
    known = torch.zeros(n + u, dtype=torch.bool, device=v.device)
    vmax = float(v.abs().max())
    if vmax == 0.0:
        return None
    if u > 0:
        # rows with no known sparse column: only the dense ones remain there
        quiet = live & ~sup[:, :n].any(dim=1)
        sol = _ransac(v[quiet], dense[quiet], state)
        if sol is None:
            return None
        gamma[n:] = sol
        known[n:] = True
    while not bool(known.all()):
        unknown = sup & ~known[None, :]
        count = unknown.sum(dim=1)
        usable = torch.nonzero((count == 1) & live).flatten()
        progress = False
        if usable.numel() >= 2:
            which = unknown[usable].to(torch.int64).argmax(dim=1)
            rest = v[usable] - cols[usable] @ gamma
            coef = cols[usable, which]
            cand = rest / coef
            agree = max(AGREE_TOL, AGREE_FACTOR * state.spec.zero_tol)
            err = agree * (cand.abs() + vmax / coef.abs())
            order = torch.argsort(cand)
            which, cand, err = which[order], cand[order], err[order]
            for c in torch.unique(which).tolist():
                sel = which == c
                if int(sel.sum()) < 2:
                    continue
                best = _mode(cand[sel], err[sel])
                if best is not None:
                    gamma[c] = best
                    known[c] = True
                    progress = True
        if not progress:
            progress = _pairs(v, cols, gamma, known, unknown, count, _agree_of(state, vmax))
        if not progress:
            left = torch.nonzero(~known).flatten()
            rest = v - cols[:, known] @ gamma[known]
            rows = live & (sup[:, left].any(dim=1))
            if left.numel() > MAX_RANSAC_DIM:
                return None
            sol = _ransac(rest[rows], cols[rows][:, left], state)
            if sol is None:
                return None
            gamma[left] = sol
            known[left] = True
    return gamma


def _agree_of(state: _State, vmax: float) -> float:
    """Absolute agreement tolerance for residuals of size ``vmax``."""
    return max(AGREE_TOL, AGREE_FACTOR * state.spec.zero_tol) * vmax


def _pairs(
    v: torch.Tensor,
    cols: torch.Tensor,
    gamma: torch.Tensor,
    known: torch.Tensor,
    unknown: torch.Tensor,
    count: torch.Tensor,
    tol: float,
) -> bool:
    """Fix two coefficients from rows with exactly two unknowns (three rows concurring).

    Rows in the target's zero set give lines through the true pair of values; three
    concurrent lines from rows sharing the two unknowns fix them. Updates ``gamma`` and
    ``known`` in place; returns whether anything was fixed.
    """
    rows = torch.nonzero(count == 2).flatten()
    if rows.numel() < 3:
        return False
    n = cols.shape[1]
    idx = torch.nonzero(unknown[rows]).view(-1, 2)  # (k, 2): (row position, column) pairs
    pair = idx[:, 1].view(-1, 2)  # (k, 2) the two unknown columns of each row
    key = pair[:, 0] * n + pair[:, 1]
    rest = v[rows] - cols[rows] @ gamma
    coef = torch.stack([cols[rows, pair[:, 0]], cols[rows, pair[:, 1]]], dim=1)  # (k, 2)
    progress = False
    for kv in torch.unique(key).tolist():
        sel = torch.nonzero(key == kv).flatten()
        if sel.numel() < 3:
            continue
        s1, s2 = divmod(int(kv), n)
        if bool(known[s1]) or bool(known[s2]):
            continue
        a, r = coef[sel], rest[sel]
        i, j = torch.triu_indices(sel.numel(), sel.numel(), 1)
        mats = torch.stack([a[i], a[j]], dim=1)  # (p, 2, 2)
        rhs = torch.stack([r[i], r[j]], dim=1)
        sol, info = torch.linalg.solve_ex(mats, rhs[:, :, None])
        sol = sol[:, :, 0]
        ok = (info == 0) & torch.isfinite(sol).all(dim=1)
        res = (r[:, None] - a @ sol.T).abs()  # (rows, p)
        hits = (res <= tol).sum(dim=0)
        hits[~ok] = 0
        best = int(torch.argmax(hits))
        if int(hits[best]) >= 3:
            gamma[s1], gamma[s2] = sol[best, 0], sol[best, 1]
            known[s1] = known[s2] = True
            progress = True
    return progress


def _ransac(v: torch.Tensor, a: torch.Tensor, state: _State) -> torch.Tensor | None:
    """``x`` (u,) with ``v - a @ x`` exactly zero on as many rows as possible (u small).

    Parameters
    ----------
    v:
        ``(k,)`` values.
    a:
        ``(k, u)`` columns.
    state:
        Tolerances and random generator.

    Returns
    -------
    torch.Tensor | None
        The solution of ``u`` sampled rows that zeroes the most rows (at least ``u + 1``).
    """
    k, u = a.shape
    if u == 0:
        return a.new_zeros(0)
    if k <= u:
        return None
    n_draw = RANSAC_SAMPLES * 2**u
    keys = torch.rand(n_draw, k, generator=state.spec.generator, dtype=v.dtype).to(v.device)
    pick = keys.topk(u, dim=1).indices  # (n_draw, u)
    sol, info = torch.linalg.solve_ex(a[pick], v[pick][:, :, None])
    sol = sol[:, :, 0]
    ok = (info == 0) & torch.isfinite(sol).all(dim=1)
    state.samples += n_draw
    res = v[:, None] - a @ sol.T  # (k, n_draw)
    scale = v.abs().max().clamp_min(torch.finfo(v.dtype).tiny)
    agree = max(AGREE_TOL, AGREE_FACTOR * state.spec.zero_tol)
    hits = (res.abs() <= agree * scale).sum(dim=0)
    hits[~ok] = 0
    best = int(torch.argmax(hits))
    if int(hits[best]) < u + 1:
        return None
    out: torch.Tensor = sol[best]
    return out


def _mode(vals: torch.Tensor, errs: torch.Tensor) -> float | None:
    """The value shared (within the errors) by the most entries of sorted ``vals``.

    Parameters
    ----------
    vals:
        ``(k,)`` ascending proposals.
    errs:
        ``(k,)`` their error bounds.

    Returns
    -------
    float | None
        The median of the largest run of agreeing proposals (at least two), else ``None``.
    """
    agree = (vals[1:] - vals[:-1]).abs() <= torch.maximum(errs[1:], errs[:-1])
    if not bool(agree.any()):
        return None
    best_len, best_start, run, start = 0, 0, 0, 0
    for i, a in enumerate(agree.tolist()):
        if a:
            if run == 0:
                start = i
            run += 1
            if run > best_len:
                best_len, best_start = run, start
        else:
            run = 0
    value = float(vals[best_start : best_start + best_len + 1].median())
    return value if math.isfinite(value) else None
