"""Is a zero set the ReLU off-set of some input? (exact witness or exact refutation).

A true gradient column is zero exactly where its own example turns the unit off
(docs/algorithm.md, fact 7), so its zero set ``Z`` is the off-set of a point ``x = p @ right``:
with the layer's rows ``a_j = [w_j . right^T, c_j] / |.|`` and the sign ``y_j = -1`` on
``Z``, ``+1`` elsewhere, the homogeneous system

    y_j a_j . v > 0   for every live unit j,      v = [p, tau],  tau > 0

is feasible. A sparse vector of the gradient's column space that is not a column is not
bound to that: with a softmax output over ``C`` classes, ``g_i = D_i (W_2^T delta_i)`` and
the ``delta_i`` (``C`` entries summing to zero) of any ``C`` examples are linearly
dependent, so one of their combinations vanishes on every unit that is off for all of them
*and* on every unit that is on for all of them. That is a large zero set with a
one-dimensional kernel (it passes :func:`spear.linalg.pure_kernel`), yet no input is off
on the second kind and on elsewhere.

:class:`RealizabilityTest` decides the system with the Ho-Kashyap procedure (Duda, Hart and
Stork, *Pattern Classification*, section 5.9): least squares ``v = A^+ beta`` against
margins ``beta > 0`` that grow where the fit overshoots. It ends with either

* a **witness**: ``A v > 0`` on every live unit (then the pattern is realizable; this is
  a check over all units, stronger than a subsample), or
* a **refutation**: the error ``e = A v - beta`` satisfies ``A^T e = 0`` (it is a least
  squares residual) and ``e <= 0, e != 0``; any feasible ``v*`` would give
  ``0 = e . A v* < 0``, so none exists (a Farkas certificate).

The pseudo-inverse of ``A`` does not depend on the signs (``A^T A`` does not), so it is
computed once per residual and every test costs two ``(m, b)`` matrix-vector products per
iteration. Measured on Fashion-MNIST, ``784 -> 2000``, b = 256: true columns get a witness
in 70-210 iterations (about 0.03 s), 10-class softmax mixtures are refuted in 1-3; the
linear programme it replaces took about 0.9 s either way. When neither comes within
:data:`MAX_ITERATIONS`, a linear programme on a subsample of the units decides
(:func:`margin_by_lp`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog

from spear.verify import LayerView

__all__ = ["RealizabilityTest", "margin_by_lp", "zero_set_realizable"]

#: Ho-Kashyap iterations before the linear programme decides.
MAX_ITERATIONS = 1000
#: Ho-Kashyap step (``0 < rho < 2`` converges; below 1 is the usual choice).
STEP = 0.9
#: A witness needs a geometric margin ``min_j (A v)_j / |v|`` above this (rows are unit
#: vectors; true columns measured 1e-7 to 1e-4 at the first witness, roundoff is ~1e-16).
WITNESS_MARGIN = 1e-12
#: A refutation needs ``e_j <= REFUTE_SLACK * max|e|`` for every unit (roundoff) and
#: ``max|e|`` above ``REFUTE_FLOOR`` times the margins (a feasible system drives ``e`` to 0).
REFUTE_SLACK = 1e-10
REFUTE_FLOOR = 1e-8
#: The linear programme keeps at most this many units of each kind (off / on), times the
#: number of coordinates: enough to rule out a wrong zero set, cheaper than all.
LP_ROWS_PER_COORD = 3
#: Geometric margin (relative to each unit's weight norm) above which the linear programme
#: counts a pattern as realizable; wrong zero sets come out clearly negative (about -0.1).
LP_MARGIN = 1e-7


class RealizabilityTest:
    """Decide for zero sets of one layer whether some input realizes them (module doc).

    Parameters
    ----------
    layer:
        The layer's weights in row-space coordinates (``weight_coords`` ``(m, b)``).
    live:
        ``(m,)`` bool, units not dead for the whole batch; only they are tested.
    generator:
        Random source of the linear programme's unit subsample (the fallback).
    """

    def __init__(self, layer: LayerView, live: torch.Tensor, generator: torch.Generator) -> None:
        self.layer = layer
        self.live = live
        self.generator = generator
        coords = layer.weight_coords[live]
        bias = layer.bias[live] if layer.bias is not None else torch.zeros_like(coords[:, 0])
        rows = torch.cat([coords, bias[:, None]], dim=1)  # (k, b + 1)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
        tau = torch.zeros(1, rows.shape[1], dtype=rows.dtype, device=rows.device)
        tau[0, -1] = 1.0  # the row that asks for tau > 0
        self.rows = torch.cat([rows, tau])  # (k + 1, b + 1)
        self.pinv = torch.linalg.pinv(self.rows)  # (b + 1, k + 1)
        #: How the last call was decided: "witness", "refuted", "lp" or "trivial" (no live
        #: unit of one kind).
        self.last = ""

    def __call__(self, zeros: torch.Tensor) -> bool:
        """Whether the units in ``zeros`` ``(m,)`` bool can be exactly the off-set.

        ``True`` also when there is too little to decide (no live unit of one kind).
        """
        sign = self._signs(zeros)
        if sign is None:
            self.last = "trivial"
            return True
        decided = self._ho_kashyap(sign)
        if decided is not None:
            self.last = "witness" if decided else "refuted"
            return decided
        self.last = "lp"
        return margin_by_lp(self.layer, zeros, self.live, self.generator) > LP_MARGIN

    def refutes(self, zeros: torch.Tensor) -> bool:
        """Whether the Ho-Kashyap procedure proves that no input is off exactly on ``zeros``.

        A cheap one-sided test: ``False`` also when it cannot decide (no linear programme
        is run). ``zeros`` is ``(m,)`` bool.
        """
        sign = self._signs(zeros)
        return sign is not None and self._ho_kashyap(sign) is False

    def _signs(self, zeros: torch.Tensor) -> torch.Tensor | None:
        """``(k + 1,)`` signs: -1 on the live units in ``zeros``, +1 elsewhere (and for tau);
        ``None`` when the live units are all of one kind (nothing to decide)."""
        off = zeros[self.live]
        if not bool(off.any()) or bool(off.all()):
            return None
        sign = torch.ones(self.rows.shape[0], dtype=self.rows.dtype, device=self.rows.device)
        sign[:-1][off] = -1.0
        return sign

    def _ho_kashyap(self, sign: torch.Tensor) -> bool | None:
        """Witness (True), refutation (False) or undecided (None) for signs ``(k + 1,)``."""
        beta = torch.ones_like(sign)
        for _ in range(MAX_ITERATIONS):
            v = self.pinv @ (sign * beta)
            fit = sign * (self.rows @ v)  # A v with A = diag(sign) rows
            if float(fit.min()) > WITNESS_MARGIN * float(v.norm()):
                return True
            err = fit - beta
            size = float(err.abs().max())
            if size > REFUTE_FLOOR * float(beta.max()) and float(err.max()) <= REFUTE_SLACK * size:
                return False
            beta = beta + STEP * (err + err.abs())
        return None


def margin_by_lp(
    layer: LayerView, zeros: torch.Tensor, live: torch.Tensor, generator: torch.Generator
) -> float:
    """Largest geometric margin of the pattern on a subsample of the units (SciPy HiGHS).

    The linear programme

        maximise t  subject to  (w_j . p + c_j) + t |w_j| <= 0   for units j in zeros,
                                -(w_j . p + c_j) + t |w_j| <= 0  for the other live units,
                                t <= 1

    on up to ``LP_ROWS_PER_COORD * b`` units of each kind (drawn with ``generator``).
    Returns ``t`` (``1.0`` when the solver cannot decide, so that nothing is rejected on
    that).
    """
    coords = layer.weight_coords  # (m, b)
    b = coords.shape[1]
    keep = LP_ROWS_PER_COORD * b
    off = torch.nonzero(zeros & live).flatten()
    on = torch.nonzero(~zeros & live).flatten()
    if off.numel() == 0 or on.numel() == 0:
        return 1.0

    def subsample(rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() <= keep:
            return rows
        perm = torch.randperm(rows.numel(), generator=generator, device=rows.device)
        return rows[perm[:keep]]

    off, on = subsample(off), subsample(on)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(coords[:, 0])
    norms = coords.norm(dim=1)
    a_ub = torch.cat(
        [
            torch.cat([coords[off], norms[off, None]], dim=1),
            torch.cat([-coords[on], norms[on, None]], dim=1),
        ]
    )
    b_ub = torch.cat([-bias[off], bias[on]])
    cost = np.zeros(b + 1)
    cost[-1] = -1.0
    res = linprog(
        cost,
        A_ub=a_ub.cpu().numpy(),
        b_ub=b_ub.cpu().numpy(),
        bounds=[(None, None)] * b + [(None, 1.0)],
        method="highs",
    )
    if res.status != 0:
        return 1.0
    return float(-res.fun)


def zero_set_realizable(
    layer: LayerView,
    zeros: torch.Tensor,
    live: torch.Tensor,
    generator: torch.Generator,
) -> bool:
    """Whether some input switches off exactly the live units in ``zeros`` ``(m,)`` bool.

    One-off form of :class:`RealizabilityTest` (which precomputes what every test of the
    same layer and live units shares: use it for many zero sets).
    """
    return RealizabilityTest(layer, live, generator)(zeros)
