"""Dropout right after the attacked layer's ReLU, active while the client trained.

In training mode ``Dropout(p)`` multiplies each unit by ``keep / (1 - p)`` with a random
``keep`` in {0, 1}, drawn anew for every example. Right after the attacked layer's ReLU,
``relu(z) * s = relu(z * s)`` for the scale ``s = keep / (1 - p) >= 0``, so example ``i``'s
gradient column at the layer's pre-activations is ``s_i * J(s_i * z_i)^T (p_i - y_i) / B``
with ``J`` the Jacobian of the model after the layer in eval mode. The column is zero where
the example turns a unit off (as without dropout) *and* where it was dropped; the layer's
update keeps its structure ``dW = G X^T``, one column per example.

The masks that matter are therefore in the update: a unit the example turns on whose
column entry is zero was dropped (its other units' masks do not change the update). With
them the model in eval mode reproduces the client's forward and backward pass exactly
(:func:`masks_applied`), so labels and the recomputed update can be checked as without
dropout (docs/algorithm.md, "Dropout").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from spear.model import AttackTarget, dropout_modules_after

__all__ = [
    "AMBIGUOUS_FLOOR_FACTOR",
    "CLEARLY_OFF_ULPS",
    "DROPPED_FLOOR_FACTOR",
    "MASK_FIX_GAIN",
    "MAX_MASK_TRIALS",
    "DirectDropout",
    "direct_dropout",
    "dropout_scales",
    "masks_applied",
    "refined_scales",
]

#: A unit an example turns on counts as dropped when its entry of the recovered gradient
#: column is at most this many times the column's noise floor: the largest entry on the
#: units the example clearly turns off, which are zero in the client's update and carry
#: only the solve's roundoff. Measured on recovered columns (``784 -> W -> 128 -> 10``,
#: Fashion-MNIST, ``Dropout(0.5)`` or ``Dropout(0.2)``): dropped units at most 5.4 times the
#: floor, units kept on at least 20 times it (float32, b = 128, W = 1000), and 2.3 against
#: 1.6e11 in float64 (b = 16, W = 256). A unit read wrong changes the recomputed update,
#: so the certificate, not this threshold, decides whether the answer is verified.
DROPPED_FLOOR_FACTOR = 10.0
#: Units whose pre-activation is within this many machine epsilons of the largest one's
#: size count as neither on nor off for the noise floor.
CLEARLY_OFF_ULPS = 1000.0
#: An example whose label does not fit its column (:func:`refined_scales`) has the units
#: it turns on whose entry lies between its column's noise floor and this many times it
#: read the other way, one at a time, nearest to :data:`DROPPED_FLOOR_FACTOR` first
#: (float64, b = 64: a dropped unit measured 10.04 times the floor).
AMBIGUOUS_FLOOR_FACTOR = 1e4
#: At most this many units are read the other way per example.
MAX_MASK_TRIALS = 32
#: A unit read the other way is kept only where it divides the example's misfit by at
#: least this much: a mask read wrong leaves a misfit many orders of magnitude above the
#: right one's, while a column that fits no label (a bottleneck after the layer, where the
#: Jacobian cannot determine it) changes little with any one unit.
MASK_FIX_GAIN = 10.0


@dataclass(frozen=True)
class DirectDropout:
    """A Dropout module that takes the attacked layer's ReLU output as it is.

    Attributes
    ----------
    name:
        Its name in the model, e.g. ``"3"`` or ``"dropout1"``.
    module:
        The module (in eval mode in the model spear runs: the identity).
    p:
        Its drop probability, ``0 < p < 1``.
    """

    name: str
    module: nn.Module
    p: float


def direct_dropout(model: nn.Module, target: AttackTarget) -> DirectDropout | None:
    """The Dropout module that the attacked layer's ReLU feeds directly, or ``None``.

    The model after the layer (:attr:`AttackTarget.after`) is run once on random
    pre-activations ``z`` ``(2, m)``; the ``nn.Dropout`` module with ``0 < p < 1`` whose
    input is exactly ``relu(z)`` is the one. Functional ``F.dropout`` calls are not found.
    """
    after = target.after
    if after is None:
        return None
    candidates = dropout_modules_after(model, target)
    if not candidates:
        return None
    m = int(target.weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, m, generator=generator, dtype=torch.float64).to(target.weight.dtype)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in candidates:

        def record(_mod: nn.Module, args: tuple[object, ...], key: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(key, args[0].detach().clone())

        handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            after(z.clone())
    except Exception:  # a model after the layer that cannot run alone: none found
        return None
    finally:
        for handle in handles:
            handle.remove()
    relu = torch.relu(z)
    for name, module in candidates:
        got = seen.get(name)
        p = float(getattr(module, "p", 0.0))
        if not 0 < p < 1:
            continue
        plain = isinstance(module, nn.Dropout)  # AlphaDropout and the like do not scale
        if plain and got is not None and got.shape == relu.shape and torch.equal(got, relu):
            return DirectDropout(name, module, p)
    return None


def dropout_scales(pre: torch.Tensor, columns: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """Each example's Dropout scales ``(k, m)``: ``0`` on the units it turns on whose
    gradient entry is at the column's noise floor (dropped, :data:`DROPPED_FLOOR_FACTOR`),
    ``1 / (1 - p)`` elsewhere.

    Parameters
    ----------
    pre:
        ``(k, m)`` the examples' pre-activations ``W x + c`` at the attacked layer.
    columns:
        ``(m, k)`` their gradient columns (:attr:`LayerReconstruction.output_grads`).
    p:
        The Dropout's drop probability.
    eps:
        Machine epsilon of the update: the floor of a column with no clearly-off unit.
    """
    z = pre.to(torch.float64)
    size, floor = _sizes_and_floors(z, columns, eps)
    dropped = (z > 0) & (size <= DROPPED_FLOOR_FACTOR * floor)
    return (~dropped).to(torch.float64) / (1.0 - p)


def _sizes_and_floors(
    z: torch.Tensor, columns: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns' entries relative to their largest ``(k, m)``, and each column's noise
    floor ``(k, 1)`` (its largest entry on the units its example clearly turns off)."""
    size = columns.T.to(torch.float64).abs()  # (k, m)
    size = size / size.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    clearly_off = z < -CLEARLY_OFF_ULPS * eps * z.abs().amax(dim=1, keepdim=True)
    floor = torch.where(clearly_off, size, torch.zeros_like(size)).amax(dim=1, keepdim=True)
    return size, floor.clamp_min(eps)


def refined_scales(
    scales: torch.Tensor,
    pre: torch.Tensor,
    columns: torch.Tensor,
    eps: float,
    misfit: Callable[[int, torch.Tensor], float],
    tol: float,
) -> torch.Tensor:
    """:func:`dropout_scales` ``(k, m)`` with the masks of examples whose column does not
    fit their label mended where a unit's entry is ambiguous.

    ``misfit(i, scales_i)``: how far example ``i``'s column is from softmax cross-entropy
    with the scales ``scales_i`` ``(m,)`` (:attr:`spear.labels.LabelResult.fit_error`,
    infinite where a bottleneck after the layer leaves the label undetermined: such an
    example is left as it is); an example above ``tol`` gets its ambiguous units
    (:data:`AMBIGUOUS_FLOOR_FACTOR`) read the other way one at a time, each kept where it
    divides the misfit by :data:`MASK_FIX_GAIN`, until it fits or
    :data:`MAX_MASK_TRIALS` have been tried. A mask read wrong still shows in the
    certificate: this only finds the masks, it checks nothing.
    """
    z = pre.to(torch.float64)
    size, floor = _sizes_and_floors(z, columns, eps)
    out = scales.clone()
    kept = float(scales.max()) if scales.numel() else 1.0
    for i in range(out.shape[0]):
        error = misfit(i, out[i])
        if error <= tol or not math.isfinite(error):
            continue  # fits, or no label can fit (a bottleneck after the layer): no guide
        band = (z[i] > 0) & (size[i] > floor[i]) & (size[i] <= AMBIGUOUS_FLOOR_FACTOR * floor[i])
        units = torch.nonzero(band).flatten()
        distance = (size[i, units] / (DROPPED_FLOOR_FACTOR * floor[i])).log().abs()
        for unit in units[distance.argsort()][:MAX_MASK_TRIALS].tolist():
            trial = out[i].clone()
            trial[unit] = kept if float(trial[unit]) == 0.0 else 0.0
            trial_error = misfit(i, trial)
            if trial_error * MASK_FIX_GAIN < error:
                out[i], error = trial, trial_error
            if error <= tol:
                break
    return out


@contextlib.contextmanager
def masks_applied(
    model: nn.Module, dropout: DirectDropout, inputs: torch.Tensor, scales: torch.Tensor
) -> Iterator[None]:
    """Run ``model`` (in eval mode) as the client did: the Dropout's output multiplied by
    each example's scales.

    Each row of a batch passed to ``model`` is matched to the row of ``inputs`` ``(k, ...)``
    it equals, and takes that row's ``scales`` ``(k, m)``; a row that equals none runs
    without dropout. Hooks on ``model`` and the Dropout module, removed on exit.
    """
    flat = inputs.detach().reshape(inputs.shape[0], -1)
    rows: list[torch.Tensor] = []

    def match(_mod: nn.Module, args: tuple[object, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.shape[0] == 0:
            rows.append(torch.zeros(0, dtype=torch.int64))
            return
        batch = x.detach().reshape(x.shape[0], -1)
        if batch.shape[1] != flat.shape[1]:
            rows.append(torch.full((x.shape[0],), -1, dtype=torch.int64))
            return
        known = flat.to(batch.dtype)
        index = torch.full((batch.shape[0],), -1, dtype=torch.int64)
        for r in range(batch.shape[0]):  # one row at a time: (k, n) in memory, not (r, k, n)
            same = torch.nonzero((known == batch[r]).all(dim=1)).flatten()
            if same.numel():
                index[r] = int(same[0])
        rows.append(index)

    def scale(_mod: nn.Module, _args: tuple[object, ...], out: torch.Tensor) -> torch.Tensor:
        if not rows or rows[-1].shape[0] != out.shape[0] or out.shape[1:] != scales.shape[1:]:
            return out
        index = rows[-1]
        ones = torch.full((1, scales.shape[1]), 1.0, dtype=scales.dtype)
        table = torch.cat([scales, ones])  # row -1: no dropout
        factor = table[index].to(out.device, out.dtype)
        return out * factor

    handles = [
        model.register_forward_pre_hook(match),
        dropout.module.register_forward_hook(scale),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
