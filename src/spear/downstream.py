"""The model after the attacked layer: every example's gradient column lies in the range
of its own Jacobian.

For a loss computed from the logits of each example alone (softmax cross-entropy, with
any reduction, clipping or label smoothing), example ``i``'s gradient at the attacked
layer's pre-activations is ``g_i = J_i^T d_i``: ``J_i`` ``(C, m)`` is the Jacobian of
the logits with respect to those pre-activations at the example's own input, and ``d_i``
``(C,)`` the loss's gradient with respect to the logits. The server knows the model after
the layer, so a candidate input ``x`` gives ``J(x)``, and the example's column lies in
``range(J(x)^T)``, a subspace of at most ``C`` dimensions (docs/algorithm.md, fact 12).

This decides what the layer alone cannot. Where the bias dominates small inputs (conv
features entering ``fc1``), an example's zero set can leave a kernel of several
dimensions in the column space of ``dW``: its direction ``g_r`` is then one of a family
``g_r + t v`` (``v`` a combination of other examples' columns that vanishes on the same
units), and every member, with the examples of ``v`` shifted by ``t`` times ``x_r``,
passes every ReLU-pattern check for small ``t`` (measured on Flower's CNN, ``b = 8``:
``t`` up to ``1e-2``, features ``3e-3`` off, all 8 examples pass). The Jacobian pins the
member: ``g_r`` lies in ``range(J(x_r)^T)``, ``v`` does not.

* :meth:`Downstream.direction` intersects the column space of ``dW`` with
  ``range(J(x)^T)``: when the candidate ``x`` has a true example's ReLU patterns (at the
  attacked layer and after it), the intersection is that example's exact column,
  whatever the dimension of its zero set's kernel.
* :meth:`Downstream.off_range` is the check: a solved example's column must lie in the
  range of the Jacobian at its own input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "RANGE_RANK_ULPS",
    "Downstream",
    "divisor_tolerance",
    "fits_whole",
    "held_tolerances",
    "implied_whole",
    "label_columns",
    "nearest_directions",
    "other_divisor",
    "own_columns",
    "range_tolerance",
]

#: Singular values of ``J^T`` below this many machine epsilons (of the model's dtype) of
#: the largest do not count in its range (classes the network cannot tell apart there).
RANGE_RANK_ULPS = 1e3
#: A column lies in a Jacobian's range when its distance from it, relative to its norm, is
#: at most this many zero tolerances (:attr:`spear.linalg.Tolerances.zero_tol`, derived
#: from the update's dtype and noise floor). Measured on Flower's CNN and the VGG-style
#: CNN (``b = 8, 16``): true columns lie ``1e-15`` (float64) and ``2e-7`` to ``8e-7``
#: (float32) from their range, where the zero tolerance is ``1e-11`` and ``1e-5``; the
#: next principal vector of the column space lies ``0.07`` or more from it.
RANGE_HEADROOM = 1.0
#: An intersection direction is kept only when, with one of its signs, it fits softmax
#: cross-entropy's gradient at the candidate to this relative error (any positive
#: divisor). Where few units separate the examples, most of every column lies in the
#: same few-dimensional range (on units every example turns on, all Jacobians agree), and
#: combinations of several examples' columns meet the range by accident. Measured on the
#: two CNNs (b = 8 to 32, float64 and float32, untrained and trained): true directions
#: fit to at most 3e-4, accidental ones 0.32 and worse.
CANDIDATE_FIT = 0.05
#: Candidates are pushed through the model after the layer in chunks of this many.
JACOBIAN_CHUNK = 256


#: A cross-entropy divisor is the batch's (``b`` for a mean, 1 for a sum) when it is within
#: this many machine epsilons of the model's dtype of it, and never closer than
#: ``MIN_DIVISOR_TOL`` is asked for. Measured (Flower's CNN and the VGG-style CNN, b = 8
#: and 16): examples read off single rows give divisors within 7e-8 (float32) and 1e-13
#: (float64) of ``b``, examples solved again after 15 float32 peels within 1.6e-5; a
#: mixture is off by its weight on other examples, an example shifted along a direction
#: its zero set does not fix by the shift (0.4 and more measured).
DIVISOR_ULPS = 1000.0
MIN_DIVISOR_TOL = 1e-9


#: A mean's divisor is the number of examples it averages: at least the number the update
#: shows (its rank), more where some example is counted twice or where examples merge at
#: the update's precision (two whose gradient columns agree to it show as one, with
#: twice the column). A count is read off a divisor up to this multiple of the rank.
MAX_COUNT_PER_RANK = 2


def divisor_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a cross-entropy divisor for a model of ``dtype``."""
    return max(MIN_DIVISOR_TOL, DIVISOR_ULPS * float(torch.finfo(dtype).eps))


#: Against a divisor examples have established (:func:`fits_whole`), an example is held to
#: this many machine epsilons of the model's dtype in its fit and in its divisor (never
#: tighter than the tolerances that establish one), and its divisor to a quarter of the
#: gap to a mean over one example more or fewer. Examples solved after many float32
#: peels carry the peels' roundoff: measured on the trained VGG-style CNN (b = 32,
#: float32, 31 examples shown) fits to 5e-4 and divisors within 5e-4 of 32, where the
#: establishing tolerances are 1.2e-4. A mixture with weight ``w`` on one of two examples
#: with the same zero sets has the divisor ``w D`` and misses the fit by about ``80 (1 -
#: w)`` (0.08 at ``w = 0.999`` on that network's seed-1 batch): this tolerance (1.2e-3
#: in float32) passes only mixtures within ``1e-3`` of the example's own weight, whose
#: inputs lie as close to it as the peels' roundoff does.
HELD_ULPS = 1e4


def held_tolerances(dtype: torch.dtype, whole: float) -> tuple[float, float]:
    """Relative tolerances ``(fit, divisor)`` of an example held to the established divisor
    ``whole`` of an update, for a model of ``dtype`` (:data:`HELD_ULPS`)."""
    from spear.labels import label_fit_tol

    loose = HELD_ULPS * float(torch.finfo(dtype).eps)
    fit_tol = max(label_fit_tol(dtype), loose)
    divisor_tol = max(divisor_tolerance(dtype), min(loose, 1.0 / (4.0 * max(whole, 1.0))))
    return fit_tol, divisor_tol


def implied_whole(fit: float, divisor: float, rank: int, dtype: torch.dtype) -> float | None:
    """The divisor of the whole update that one example's column shows, or ``None``.

    ``fit`` and ``divisor`` are the example's (:meth:`Downstream.cross_entropy_fit`). An
    example counted once in a plain sum of per-example losses has the divisor 1; in a
    plain mean over ``D`` examples, ``D``: an integer from ``rank`` (the examples the
    update shows) to :data:`MAX_COUNT_PER_RANK` times it. ``None`` when the column does
    not fit cross-entropy (:func:`spear.labels.label_fit_tol`) or its divisor is neither
    (:func:`divisor_tolerance`).
    """
    from spear.labels import label_fit_tol

    if not fit <= label_fit_tol(dtype) or not math.isfinite(divisor):
        return None
    tol = divisor_tolerance(dtype)
    if abs(divisor - 1.0) <= tol:
        return 1.0
    count = round(divisor)
    if rank <= count <= MAX_COUNT_PER_RANK * rank and abs(divisor - count) <= tol * count:
        return float(count)
    return None


def other_divisor(divisors: list[float], whole: float, rank: int, dtype: torch.dtype) -> bool:
    """Whether two of ``divisors`` (of distinct examples whose columns fit cross-entropy)
    agree with each other to :func:`divisor_tolerance` and are not ``whole`` over a count
    of copies (:func:`fits_whole`): a loss that weighs examples (class weights), not a
    plain mean or sum over ``whole``. One such divisor alone is no evidence: a mixture
    can fit cross-entropy on a flat softmax with a divisor of its own (measured on the
    untrained VGG-style CNN of seed 1, float32, b = 16: mixtures fitted it with divisors
    from 0.49 to 16.09, the closest two of them 2.7e-4 apart, where examples read off
    the update agree to 1e-5)."""
    if len(divisors) < 2:
        return False
    values = torch.tensor(divisors, dtype=torch.float64)
    plain = fits_whole(torch.zeros_like(values), values, whole, rank, dtype, copies=True)
    others = values[~plain]
    tol = divisor_tolerance(dtype)  # examples read exactly agree this well; mixtures do not
    for i in range(others.numel()):
        near = (others[i + 1 :] - others[i]).abs() <= tol * float(others[i].abs())
        if bool(near.any()):
            return True
    return False


def fits_whole(
    fit: torch.Tensor,
    divisor: torch.Tensor,
    whole: float,
    rank: int,
    dtype: torch.dtype,
    *,
    copies: bool = False,
) -> torch.Tensor:
    """``(k,)`` bool: each example's column fits cross-entropy with the divisor ``whole /
    c`` of an example counted ``c`` times in an update whose divisor is ``whole``.

    ``fit``, ``divisor``: ``(k,)`` (:meth:`Downstream.cross_entropy_fit`), within
    :func:`held_tolerances`. ``c`` is 1, or
    with ``copies`` any integer the update leaves room for: up to ``rank`` in a sum
    (``whole`` 1), up to ``whole - rank + 1`` in a mean over ``whole`` examples (a mean
    over as many examples as the update shows holds none twice: a copy would add to the
    count).
    """
    fit_tol, tol = held_tolerances(dtype, whole)
    ok = fit <= fit_tol
    most = 1
    if copies:
        most = rank if whole == 1.0 else max(1, round(whole) - rank + 1)
    plain = torch.zeros_like(ok)
    for c in range(1, most + 1):
        target = whole / c
        plain |= (divisor - target).abs() <= tol * target
    return ok & plain


def range_tolerance(zero_tol: float) -> float:
    """Largest relative distance of a column from a Jacobian's range that counts as zero."""
    return RANGE_HEADROOM * zero_tol


@dataclass(frozen=True)
class Downstream:
    """The attacked layer and the model after it, as the server knows them.

    Attributes
    ----------
    after:
        Maps the layer's pre-activations ``(k, m)`` to logits ``(k, C)`` (or a tuple whose
        first entry they are), example by example.
    weight, bias:
        ``(m, n)`` and ``(m,)`` the layer's parameters, in the model's dtype.
    update_dtype:
        The dtype the update arrived in, when known.
    """

    after: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor | None
    update_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The precision the checks allow for: the model's dtype (its Jacobians carry that
        dtype's roundoff), or the update's where that is coarser (a float64 model whose
        client sent float32)."""
        own = self.weight.dtype
        sent = self.update_dtype
        if sent is None or not sent.is_floating_point:
            return own
        return sent if torch.finfo(sent).eps > torch.finfo(own).eps else own

    def jacobians(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(k, C, m)`` float64 Jacobians of the logits at ``inputs`` ``(k, n)``.

        The layer's pre-activations are computed in the model's dtype; one backward pass
        per class gives every example's row of that class at once (examples do not
        interact after the layer).
        """
        return self.logits_and_jacobians(inputs)[1]

    def logits_and_jacobians(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, C)`` logits and ``(k, C, m)`` Jacobians at ``inputs`` ``(k, n)``, float64."""
        parts = [
            self._jacobians(inputs[start : start + JACOBIAN_CHUNK])
            for start in range(0, inputs.shape[0], JACOBIAN_CHUNK)
        ]
        if not parts:
            m = self.weight.shape[0]
            return inputs.new_zeros(0, 0), inputs.new_zeros(0, 0, m)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _jacobians(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight.detach()
        x = inputs.detach().to(weight.device, weight.dtype)
        bias = self.bias.detach() if self.bias is not None else None
        with torch.enable_grad():
            z = torch.nn.functional.linear(x, weight, bias).requires_grad_(True)
            out = self.after(z.clone())  # a copy: an in-place ReLU may not write into a leaf
            logits = out[0] if isinstance(out, (tuple, list)) else out
            classes = int(logits.shape[1])
            rows = [
                torch.autograd.grad(
                    logits[:, c].sum(), z, retain_graph=c < classes - 1, allow_unused=True
                )[0]
                for c in range(classes)
            ]
        filled = [r if r is not None else torch.zeros_like(z) for r in rows]
        jac = torch.stack(filled, dim=1).detach().to(inputs.device, torch.float64)
        return logits.detach().to(inputs.device, torch.float64), jac

    def ranges(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Orthonormal bases ``(m, c_i)`` of ``range(J(x_i)^T)`` for ``inputs`` ``(k, n)``."""
        return self.ranges_at(self.jacobians(inputs))

    def off_range(
        self,
        inputs: torch.Tensor,
        grads: torch.Tensor,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(k,)`` relative distance of each column ``grads[:, i]`` ``(m, k)`` from the
        range of the Jacobian at its own input ``inputs[i]`` ``(k, n)`` (``at``: the
        logits and Jacobians there, when already computed)."""
        out = torch.full((inputs.shape[0],), math.inf, dtype=torch.float64, device=grads.device)
        finite = torch.isfinite(inputs).all(dim=1) & torch.isfinite(grads).all(dim=0)
        if not bool(finite.all()):
            kept = torch.nonzero(finite).flatten()
            if kept.numel():
                out[kept] = self.off_range(inputs[kept], grads[:, kept])
            return out
        jac = at[1] if at is not None else self.jacobians(inputs)
        for i, span in enumerate(self.ranges_at(jac)):
            g = grads[:, i]
            norm = float(g.norm())
            if norm == 0.0:
                out[i] = math.inf
                continue
            out[i] = float((g - span @ (span.T @ g)).norm()) / norm
        return out

    def plain_fit(
        self,
        inputs: torch.Tensor,
        grads: torch.Tensor,
        batch_size: int,
        *,
        duplicates: bool = False,
    ) -> torch.Tensor:
        """``(k,)`` bool: column ``grads[:, i]`` ``(m, k)`` fits softmax cross-entropy at
        ``inputs[i]`` ``(k, n)`` with the divisor of a plain mean over ``batch_size``
        examples or a plain sum (:func:`fits_whole`, :func:`held_tolerances`).

        ``batch_size`` is the number of distinct examples the update shows (its rank).
        ``duplicates``: an example that occurs ``c`` times in the batch has ``c`` times
        its column, so its divisor is the plain one over ``c`` (``c`` up to
        ``batch_size``); allowed when the update is known to be such a mean or sum, for
        the sum only: a mean over as many examples as the update shows distinct ones holds
        none twice (a copy would add to the count), so a column that fits it with the
        divisor over ``c >= 2`` is another example's mixture, not a copy.
        """
        fit, divisor = self.cross_entropy_fit(inputs, grads)
        return self._plain(fit, divisor, batch_size, duplicates)

    def repeated(
        self,
        inputs: torch.Tensor,
        grads: torch.Tensor,
        batch_size: int | None = None,
        fits: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(k,)`` bool: examples counted more than once in a plain mean or sum.

        Every column ``grads[:, i]`` ``(m, k)`` must fit softmax cross-entropy at
        ``inputs[i]`` ``(k, n)`` with a divisor ``B / c_i`` for an integer ``c_i >= 1``
        (:func:`held_tolerances`), where ``B`` is the largest divisor, that of a plain sum
        (1) or a mean over ``batch_size`` when given; those with ``c_i >= 2`` are returned:
        an example counted ``c_i`` times, or ``c_i`` examples whose columns agree to the
        update's precision. Divisors of no such form (per-example clipping) flag none.
        ``fits``: the examples' :meth:`cross_entropy_fit` when already computed.
        """
        fit, divisor = fits if fits is not None else self.cross_entropy_fit(inputs, grads)
        if divisor.numel() == 0:
            return torch.zeros(0, dtype=torch.bool)
        wholes = [float(divisor.max()), 1.0] + ([float(batch_size)] if batch_size else [])
        found = torch.zeros_like(fit, dtype=torch.bool)
        for whole in wholes:
            fit_tol, tol = held_tolerances(self.dtype, whole)
            if not bool((fit <= fit_tol).all()):
                continue
            ratio = whole / divisor.clamp_min(torch.finfo(divisor.dtype).tiny)
            count = torch.round(ratio)
            if bool((((ratio - count).abs() <= tol * ratio) & (count >= 1)).all()):
                found |= count >= 2
        return found

    def checks(
        self, inputs: torch.Tensor, grads: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`off_range` and :meth:`cross_entropy_fit` (``far``, ``fit``, ``divisor``,
        each ``(k,)``) from one evaluation of the Jacobians at ``inputs`` ``(k, n)``."""
        at = self.logits_and_jacobians(inputs)
        far = self.off_range(inputs, grads, at)
        fit, divisor = self.cross_entropy_fit(inputs, grads, at)
        return far, fit, divisor

    def _plain(
        self, fit: torch.Tensor, divisor: torch.Tensor, batch_size: int, duplicates: bool
    ) -> torch.Tensor:
        """Which fits are within tolerance with the divisor of a plain mean over
        ``batch_size`` examples or of a plain sum (:func:`fits_whole`)."""
        return fits_whole(
            fit, divisor, float(batch_size), batch_size, self.dtype, copies=duplicates
        ) | fits_whole(fit, divisor, 1.0, batch_size, self.dtype, copies=duplicates)

    def cross_entropy_fit(
        self,
        inputs: torch.Tensor,
        grads: torch.Tensor,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """How well each column ``grads[:, i]`` ``(m, k)`` is softmax cross-entropy's
        gradient at ``inputs[i]`` ``(k, n)``, with its own positive divisor.

        Solves ``J_i^T r_i = g_i`` (:func:`spear.labels.output_coefficients`) and
        compares ``r_i`` with ``(p_i - e_y) / B_i`` (``p_i`` the softmax at the input,
        ``y`` the most negative entry of ``r_i``), as :func:`spear.labels.recover_labels`
        does. Unlike the range test, this depends on
        the input itself and not only on its ReLU patterns: a mixture of two examples
        with the same patterns as one of them fails it.

        Returns
        -------
        fit:
            ``(k,)`` relative error of ``r_i`` against ``(p_i - e_y) / B_i``.
        divisor:
            ``(k,)`` ``B_i`` (positive for a gradient: ``b`` under mean reduction).

        ``at``: the logits and Jacobians at ``inputs`` when already computed.
        """
        from spear.labels import output_coefficients

        logits, jac = at if at is not None else self.logits_and_jacobians(inputs)
        k = inputs.shape[0]
        fit = torch.full((k,), math.inf, dtype=torch.float64, device=grads.device)
        divisor = torch.zeros(k, dtype=torch.float64, device=grads.device)
        for i in range(k):
            column = grads[:, i : i + 1]
            size = float(column.abs().max())
            if not (math.isfinite(size) and size > 0.0 and bool(torch.isfinite(jac[i]).all())):
                continue
            r = output_coefficients(jac[i], column / size, logits[i], self.dtype)
            p = torch.softmax(logits[i], dim=0)
            target = p.clone()
            target[int(torch.argmin(r))] -= 1.0
            rr = float(r @ r)
            if rr == 0.0:
                continue
            div = float(target @ r) / rr
            fit[i] = float((r * div - target).norm()) / (float(target.norm()) or 1.0)
            divisor[i] = div / size
        return fit, divisor

    def directions(
        self, basis: torch.Tensor, inputs: torch.Tensor, tol: float
    ) -> list[torch.Tensor | None]:
        """The one unit direction ``(m,)`` of ``span(basis)`` in ``range(J(x_i)^T)`` for
        each candidate ``inputs[i]`` ``(k, n)``, or ``None``.

        ``basis`` ``(m, r)`` has orthonormal columns. A candidate gets a direction when
        exactly one principal vector of the two subspaces lies within ``tol`` of both
        (its distance from the range, relative), the next is clearly farther
        (:data:`spear.linalg.KERNEL_GAP` times), and it fits cross-entropy's gradient at
        the candidate to :data:`CANDIDATE_FIT` (with either sign).
        """
        found = self.intersections(basis, inputs, tol)
        keep = [i for i, unit in enumerate(found) if unit is not None]
        if not keep:
            return found
        units = torch.stack([found[i] for i in keep], dim=1)  # type: ignore[misc]
        x = inputs[keep]
        plus, _ = self.cross_entropy_fit(x, units)
        minus, _ = self.cross_entropy_fit(x, -units)
        for j, i in enumerate(keep):
            if min(float(plus[j]), float(minus[j])) > CANDIDATE_FIT:
                found[i] = None
        return found

    def intersections(
        self, basis: torch.Tensor, inputs: torch.Tensor, tol: float
    ) -> list[torch.Tensor | None]:
        """:meth:`directions` without the cross-entropy fit: for candidates that are not
        near an example (the fit needs that), whose directions the caller verifies.

        Where the intersection has several dimensions (two examples with the same ReLU
        patterns have the same Jacobian), the candidate's own cross-entropy column
        ``J^T (p - e_y)`` is taken when it lies in ``span(basis)`` for one label ``y``:
        exact for an exact example.
        """
        from spear.linalg import KERNEL_GAP

        finite = torch.isfinite(inputs).all(dim=1)
        if not bool(finite.all()):
            # an ill-conditioned solve's examples: no direction for those
            kept = torch.nonzero(finite).flatten().tolist()
            some = self.intersections(basis, inputs[kept], tol) if kept else []
            out_all: list[torch.Tensor | None] = [None] * inputs.shape[0]
            for i, unit in zip(kept, some, strict=True):
                out_all[i] = unit
            return out_all
        logits, jac = self.logits_and_jacobians(inputs)
        spans = self.ranges_at(jac)
        out: list[torch.Tensor | None] = []
        for i, span in enumerate(spans):
            if span.shape[1] == 0:
                out.append(None)
                continue
            vecs, dist = nearest_directions(basis, span)
            inside = int((dist <= tol).sum())
            clear = dist.numel() < 2 or float(dist[1]) > KERNEL_GAP * tol
            if inside == 1 and clear:
                out.append(vecs[:, 0])
            elif inside >= 2:
                out.append(_own_column(basis, jac[i], logits[i], tol))
            else:
                out.append(None)
        return out

    def ranges_at(self, jac: torch.Tensor) -> list[torch.Tensor]:
        """Orthonormal bases ``(m, c_i)`` of ``range(J_i^T)`` for ``jac`` ``(k, C, m)``."""
        u, s, _ = torch.linalg.svd(jac.mT, full_matrices=False)  # (k, m, C), (k, C)
        cut = RANGE_RANK_ULPS * float(torch.finfo(self.dtype).eps)
        keep = s > cut * s[:, :1].clamp_min(torch.finfo(torch.float64).tiny)
        return [u[i][:, keep[i]] for i in range(jac.shape[0])]


def nearest_directions(
    basis: torch.Tensor, span: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The principal vectors of ``span(basis)`` ``(m, r)`` towards ``span(span)``
    ``(m, c)`` (both orthonormal columns), nearest first, and their distances from it.

    Returns
    -------
    vectors:
        ``(m, min(r, c))`` unit vectors of ``span(basis)``.
    distances:
        ``(min(r, c),)`` each vector's distance from ``span(span)``, ascending.
    """
    u, _, _ = torch.linalg.svd(basis.T @ span, full_matrices=False)  # (r, min(r, c))
    vectors = basis @ u
    return vectors, (vectors - span @ (span.T @ vectors)).norm(dim=0)


def _own_column(
    basis: torch.Tensor, jac: torch.Tensor, logits: torch.Tensor, tol: float
) -> torch.Tensor | None:
    """The unit column ``J^T (p - e_y)`` ``(m,)`` of the one label ``y`` for which it lies
    within ``tol`` of ``span(basis)`` ``(m, r)``, the next label clearly farther; else
    ``None``. ``jac`` ``(C, m)`` and ``logits`` ``(C,)`` are at the candidate."""
    from spear.linalg import KERNEL_GAP

    cols, _, far = label_columns(basis, logits[None], jac[None])
    dist = far[0]
    order = torch.argsort(dist)
    best = int(order[0])
    if float(dist[best]) > tol:
        return None
    if order.numel() > 1 and float(dist[int(order[1])]) <= KERNEL_GAP * tol:
        return None
    return cols[0, :, best]


def label_columns(
    basis: torch.Tensor, logits: torch.Tensor, jac: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every label's cross-entropy column at each candidate, and where it lies against
    ``span(basis)`` ``(m, r)`` (orthonormal columns).

    Parameters
    ----------
    logits, jac:
        ``(k, C)`` logits and ``(k, C, m)`` Jacobians at the candidates.

    Returns
    -------
    columns:
        ``(k, m, C)`` unit columns ``J_i^T (p_i - e_y)``, one per label ``y``.
    inside:
        ``(k, m, C)`` their projections on ``span(basis)``.
    distance:
        ``(k, C)`` their relative distances from ``span(basis)``; 1, the farthest a unit
        column can be, for a column that is exactly zero (the softmax saturated on the
        label, or every unit off): it fits nothing.
    """
    p = torch.softmax(logits, dim=1)  # (k, C)
    classes = p.shape[1]
    # p_y - 1 as minus the other classes' mass, summed: exact where the softmax nearly
    # saturates on y (there 1 - p_y rounds to zero while the other p_c, which set the
    # column's direction, do not)
    apart = 1.0 - torch.eye(classes, dtype=p.dtype, device=p.device)
    targets = p[:, :, None].repeat(1, 1, classes)  # (k, C classes, C labels)
    targets.diagonal(dim1=1, dim2=2).copy_(-(p @ apart))
    cols = jac.mT @ targets  # (k, m, C labels)
    size = cols.norm(dim=1, keepdim=True)  # (k, 1, C)
    cols = cols / size.clamp_min(torch.finfo(cols.dtype).tiny)
    inside = basis @ (basis.T @ cols)
    distance = torch.where(size[:, 0] > 0, (cols - inside).norm(dim=1), 1.0)
    return cols, inside, distance


def own_columns(
    downstream: Downstream,
    basis: torch.Tensor,
    inputs: torch.Tensor,
    at: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's own cross-entropy column, of the label that fits ``span(basis)``
    best, projected on ``span(basis)`` ``(m, r)``.

    ``at``: the logits ``(k, C)`` and Jacobians ``(k, C, m)`` at ``inputs`` when already
    computed.

    Returns
    -------
    columns:
        ``(m, k)`` unit columns in ``span(basis)`` for ``inputs`` ``(k, n)``, exactly zero
        on the units each candidate turns off.
    distance:
        ``(k,)`` relative distance of each unprojected column from ``span(basis)`` (zero,
        to roundoff, at an exact example).
    """
    k = inputs.shape[0]
    if at is None and k > JACOBIAN_CHUNK:
        parts = [
            own_columns(downstream, basis, inputs[start : start + JACOBIAN_CHUNK])
            for start in range(0, k, JACOBIAN_CHUNK)
        ]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])
    logits, jac = at if at is not None else downstream.logits_and_jacobians(inputs)
    _, inside, far = label_columns(basis, logits, jac)
    best = torch.argmin(far, dim=1)  # (k,)
    index = torch.arange(k, device=far.device)
    # units the candidate turns off have zero Jacobian rows: its column is exactly zero
    # there, and the projection's roundoff is not kept (in float32 it would stay in the
    # residual of every peel)
    chosen = torch.where(jac.abs().sum(dim=1) > 0, inside[index, :, best], 0.0)  # (k, m)
    tiny = torch.finfo(chosen.dtype).tiny
    columns = chosen / chosen.norm(dim=1, keepdim=True).clamp_min(tiny)
    return columns.T.contiguous(), far[index, best]
