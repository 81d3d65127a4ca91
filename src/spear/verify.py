"""Verify a candidate example against the ReLU pattern its own pre-activation predicts.

The server knows the attacked layer's weight ``W`` and bias ``c``. For a candidate example
``x``, ``W x + c`` predicts which units are off; those must be exactly the zero entries of
the example's gradient column (docs/algorithm.md, fact 7). For FedAvg deltas the masks may move
between local steps (fact 11), which the tolerances below allow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spear.linalg import Tolerances, pure_kernel, smallest_singular_vector, zero_mask

__all__ = [
    "LayerView",
    "direction_for",
    "exact_precision",
    "movement",
    "pattern_check",
    "pre_activations",
    "pure_direction",
]

#: Verification tolerances: fraction of the clear (non-ambiguous) units whose state may
#: disagree with the gradient's zero pattern. Exact float64 gradients allow none: a
#: candidate that is off by a few percent flips only a handful of low-margin units, so
#: any disagreement rejects it. Lower precisions blur the zero test near the tolerance.
MISMATCH_EXACT = 0.0
MISMATCH_LOW_PRECISION = 0.005
#: Noisy updates (the effective precision is the noise level, at least this): a best
#: estimate is kept when at most this fraction of units disagree.
NOISY_MISMATCH_FROM = 1e-4
MISMATCH_NOISY = 0.1
#: FedAvg deltas: units off at the sent weights may turn on in later local steps (fact 11),
#: so this fraction of predicted-off units may carry a non-zero update; and units on at the
#: sent weights may be off at every step that used the example (its first use can already
#: see updated weights), so this fraction of predicted-on units may carry none.
MAX_OFF_BUT_NONZERO_DELTA = 0.25
MAX_ON_BUT_ZERO_DELTA = 0.1
#: FedAvg deltas: a unit whose pre-activation at the sent weights is within this multiple
#: of the change the delta itself makes to it (``|dW x + dc|``, the whole local training's
#: movement at that example) may have switched at the step that used the example, and is
#: left out of the comparison. Measured (Fashion-MNIST, ``784 -> 1000 -> 10``, b = 64,
#: eight local steps at learning rate 0.1): true examples disagree on up to 10.5% of all
#: predicted-on units, and on at most 3% of the units this leaves.
MOVED_MARGIN = 1.0
#: Units whose pre-activation is within this many roundoff units of zero are ambiguous and
#: left out of the comparison.
AMBIGUITY_ROUNDOFF = 100.0
#: :func:`direction_for` with ``settle``: the kernel is fitted to this fraction of a
#: solved example's clearly-off units, those where the last fit is smallest, until that
#: set stops changing (at most ``MAX_TRIM_ROUNDS`` fits). Measured on a float32 FedAvg
#: delta (``784 -> 1000 -> 128 -> 10``, b = 128, one epoch in mini-batches of 8): true
#: columns are non-zero on up to 3% of their example's clearly-off units; the settled fit
#: gave the exact column of 125 of the 128 examples, the two fixed fits 51.
TRIM_KEEP = 0.6
MAX_TRIM_ROUNDS = 20


def exact_precision(eps: float) -> bool:
    """Whether data of machine epsilon ``eps`` is float64 (or finer): exact zero patterns."""
    return eps <= float(torch.finfo(torch.float64).eps)


@dataclass
class LayerView:
    """The layer as the server knows it, projected on the row space of ``dW``."""

    weight_coords: torch.Tensor  # (m, b) = W @ R^T
    weight_abs_coords: torch.Tensor  # (m, n) = |W|, for roundoff bounds
    bias: torch.Tensor | None  # (m,)
    right: torch.Tensor  # (b, n)
    #: A FedAvg delta's own change of the layer, ``dW @ R^T`` ``(m, b)`` and ``dc`` ``(m,)``
    #: (``None`` for gradients): how far local training moved each pre-activation.
    moved_coords: torch.Tensor | None = None
    moved_bias: torch.Tensor | None = None
    #: A Dropout right after the layer's ReLU was active (:mod:`spear.dropout`): a unit an
    #: example turns on may carry no gradient (it was dropped), so only the units it turns
    #: off are checked.
    dropout: bool = False


def movement(layer: LayerView, coord: torch.Tensor) -> torch.Tensor | None:
    """``(m,)`` ``|dW x + dc|`` at one example ``coord`` ``(b,)``: how far a FedAvg
    delta moved its pre-activations (``None`` when the view holds no delta)."""
    if layer.moved_coords is None:
        return None
    moved = layer.moved_coords @ coord
    if layer.moved_bias is not None:
        moved = moved + layer.moved_bias
    return moved.abs()


def pre_activations(layer: LayerView, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations ``W x + c`` of examples and their roundoff bounds ``|W| |x| + |c|``.

    Parameters
    ----------
    coords:
        ``(b,)`` one example's row-space coordinates, or ``(r, b)`` several.

    Returns
    -------
    z, bound:
        ``(m,)`` each for one example, ``(m, r)`` for several.
    """
    x = coords @ layer.right
    z = layer.weight_coords @ coords.mT if coords.dim() == 2 else layer.weight_coords @ coords
    bound = layer.weight_abs_coords @ (x.abs().mT if x.dim() == 2 else x.abs())
    if layer.bias is not None:
        bias = layer.bias[:, None] if coords.dim() == 2 else layer.bias
        z = z + bias
        bound = bound + bias.abs()
    return z, bound


def pattern_check(
    layer: LayerView,
    coord: torch.Tensor,
    grad_zero: torch.Tensor,
    live: torch.Tensor,
    eps: float,
    delta: bool,
) -> tuple[bool, float]:
    """Compare the ReLU pattern ``W x + c`` predicts with the gradient's zero pattern.

    Parameters
    ----------
    layer:
        The layer's weights in row-space coordinates.
    coord:
        ``(b,)`` the example's coordinates (``x = coord @ right``).
    grad_zero:
        ``(m,)`` bool, where the example's gradient column is zero.
    live:
        ``(m,)`` bool, units that are not dead for the whole batch.
    eps:
        Machine epsilon of the data.
    delta:
        FedAvg deltas allow predicted-off units to carry updates (fact 11); units the
        delta itself moves by more than their margin (:data:`MOVED_MARGIN`) are left out.
        With :attr:`LayerView.dropout` predicted-on units may carry none (dropped units).

    Returns
    -------
    ok:
        Whether the example passes.
    agreement:
        Fraction of the clear (non-ambiguous) units whose state agrees.
    """
    z, bound = pre_activations(layer, coord)
    clear = z.abs() > AMBIGUITY_ROUNDOFF * eps * bound
    moved = movement(layer, coord) if delta else None
    if moved is not None:
        clear &= z.abs() > MOVED_MARGIN * moved
    off = (z <= 0) & clear
    on = (z > 0) & clear
    n_clear = max(1, int(clear.sum()))
    off_but_nonzero = int((off & ~grad_zero).sum())
    # a unit dropped by an active Dropout carries no gradient although its example turns it on
    on_but_zero = 0 if layer.dropout else int((on & grad_zero & live).sum())
    mismatch = MISMATCH_EXACT if exact_precision(eps) else MISMATCH_LOW_PRECISION
    off_limit = MAX_OFF_BUT_NONZERO_DELTA if delta else mismatch
    on_limit = MAX_ON_BUT_ZERO_DELTA if delta else mismatch
    ok = off_but_nonzero <= off_limit * n_clear and on_but_zero <= on_limit * n_clear
    agreement = 1.0 - (off_but_nonzero + on_but_zero) / n_clear
    return ok, agreement


def direction_for(
    layer: LayerView,
    basis: torch.Tensor,
    coord: torch.Tensor,
    tol: Tolerances,
    eps: float,
    *,
    settle: bool = False,
) -> torch.Tensor | None:
    """The exact gradient direction ``(m,)`` of a candidate example, or ``None``.

    The units the candidate's own ReLU pattern switches off must share a kernel vector
    of the residual basis (fact 7). Only live units count: a unit off for every example
    of the residual (a zero row of ``basis`` ``(m, r)``) is in every kernel and says
    nothing about this one; where the bias dominates small inputs, such units are most
    of the predicted-off ones and would crowd out the rows that fix the direction.
    Predicted-off units that carry an update anyway (FedAvg) are trimmed by refitting on
    the rows closest to zero.

    ``settle``: for a solved example (:mod:`spear.inversion.demix`), only the units it
    clearly switches off count (beyond roundoff and, for a FedAvg delta, beyond the
    delta's own movement of them), and the fit is trimmed to the :data:`TRIM_KEEP` of
    them where it is smallest until that set settles (at most :data:`MAX_TRIM_ROUNDS`
    fits) rather than twice. The direction may be another example's, whose zero set
    holds the same rows.
    """
    norms = basis.norm(dim=1)
    live = norms > tol.zero_tol * norms.max()
    if settle:
        z, bound = pre_activations(layer, coord)
        off = (z <= 0) & live & (z.abs() > AMBIGUITY_ROUNDOFF * eps * bound)
        moved = movement(layer, coord)
        if moved is not None:
            off &= z.abs() > MOVED_MARGIN * moved
    else:
        z = layer.weight_coords @ coord
        if layer.bias is not None:
            z = z + layer.bias
        off = (z <= 0) & live
    r = basis.shape[1]
    if int(off.sum()) < r:
        return None
    rows = basis[off]
    # the first fits only choose rows (the Gram matrix's eigenvector is cheap and accurate
    # enough for that); the last one, which the zero test reads, is an SVD where the
    # update's precision is float64 (spear.linalg.GRAM_THRESHOLD)
    u = torch.linalg.eigh(rows.T @ rows).eigenvectors[:, 0]
    if settle:
        return pure_direction(basis, basis @ _settled_fit(rows, u, tol.degeneracy_tol), live, tol)
    for keep in (0.8, 0.6):
        v = rows @ u
        k = max(r, int(keep * rows.shape[0]))
        idx = v.abs().topk(k, largest=False).indices
        if keep > 0.6:
            sub = rows[idx]
            u = torch.linalg.eigh(sub.T @ sub).eigenvectors[:, 0]
        else:
            u = smallest_singular_vector(rows[idx], tol.degeneracy_tol)
    return pure_direction(basis, basis @ u, live, tol)


def _settled_fit(rows: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """The kernel vector ``(r,)`` of ``rows`` ``(k, r)`` fitted to the :data:`TRIM_KEEP`
    of them where the fit, starting from ``u`` ``(r,)``, is smallest, until they settle
    (``limit``: the degeneracy tolerance, see :func:`spear.linalg.smallest_singular_vector`)."""
    keep = max(rows.shape[1], int(TRIM_KEEP * rows.shape[0]))
    chosen: torch.Tensor | None = None
    for _ in range(MAX_TRIM_ROUNDS):
        idx = (rows @ u).abs().topk(keep, largest=False).indices.sort().values
        if chosen is not None and torch.equal(idx, chosen):
            break
        chosen = idx
        u = smallest_singular_vector(rows[idx], limit)
    return u


def pure_direction(
    basis: torch.Tensor, vector: torch.Tensor, live: torch.Tensor, tol: Tolerances
) -> torch.Tensor | None:
    """The exact direction ``(m,)`` on the zero set of an approximate one, or ``None``.

    ``vector`` ``(m,)`` lies (about) in the column space of ``basis`` ``(m, r)``; its zeros
    among the ``live`` ``(m,)`` units must hold ``r - 1`` rows whose kernel is pure and
    one-dimensional (:func:`spear.linalg.pure_kernel`), and that kernel is the direction.
    """
    zeros = zero_mask(vector[:, None], tol.zero_tol)[:, 0] & live
    if int(zeros.sum()) < basis.shape[1] - 1:
        return None
    pure = pure_kernel(basis[zeros], tol.degeneracy_tol, tol.separation)
    return None if pure is None else basis @ pure
