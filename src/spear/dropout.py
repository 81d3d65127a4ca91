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

The Dropout is an ``nn.Dropout`` module, or a functional call in ``forward``
(``F.dropout(h, p, training=self.training)`` or ``torch.dropout(h, p, self.training)``,
``p`` a number or a one-element tensor; ``aten.dropout`` or ``aten.native_dropout`` in a
``torch.export`` program), found and masked through a ``TorchFunctionMode``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from spear.model import DROPOUT_CALLS, AttackTarget, dropout_modules_after

__all__ = [
    "ACTIVATION_MATCH_RTOL",
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
#: A row of the Dropout's input is an example's when it lies within this fraction of its
#: largest entry of that example's ReLU output at the attacked layer (the examples' own
#: pass, computed again): an identification, not a check (a row taken wrongly, or
#: missed, leaves the recomputed update wrong, and the certificate shows it).
ACTIVATION_MATCH_RTOL = 1e-3


@dataclass(frozen=True)
class DirectDropout:
    """A Dropout that takes the attacked layer's ReLU output as it is.

    Attributes
    ----------
    name:
        The module's name in the model, e.g. ``"3"`` or ``"dropout1"``; for a functional
        call, the function's name (``"dropout"``).
    module:
        The module (in eval mode in the model spear runs: the identity), or ``None`` for a
        functional call (``F.dropout(..., training=self.training)`` in ``forward``).
    p:
        Its drop probability, ``0 < p < 1``.
    """

    name: str
    module: nn.Module | None
    p: float

    def describe(self) -> str:
        """E.g. ``"Dropout 'drop'"`` or ``"the dropout call 'dropout'"``."""
        if self.module is None:
            return f"the dropout call {self.name!r}"
        return f"{type(self.module).__name__} {self.name!r}"


def direct_dropout(model: nn.Module, target: AttackTarget) -> DirectDropout | None:
    """The Dropout that the attacked layer's ReLU feeds directly, or ``None``.

    The model after the layer (:attr:`AttackTarget.after`) is run once on random
    pre-activations ``z`` ``(2, m)``; the ``nn.Dropout`` module with ``0 < p < 1`` whose
    input is exactly ``relu(z)`` is the one, or, where no module is, such a functional
    dropout call.
    """
    after = target.after
    if after is None:
        return None
    m = int(target.weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, m, generator=generator, dtype=torch.float64).to(target.weight.dtype)
    relu = torch.relu(z)
    candidates = dropout_modules_after(model, target)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in candidates:

        def record(_mod: nn.Module, args: tuple[object, ...], key: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(key, args[0].detach().clone())

        handles.append(module.register_forward_pre_hook(record))
    calls = _DropoutCalls()
    try:
        with torch.no_grad(), calls:
            after(z.clone())
    except Exception:  # a model after the layer that cannot run alone: none found
        return None
    finally:
        for handle in handles:
            handle.remove()
    for name, module in candidates:
        got = seen.get(name)
        p = float(getattr(module, "p", 0.0))
        if not 0 < p < 1:
            continue
        plain = isinstance(module, nn.Dropout)  # AlphaDropout and the like do not scale
        if plain and got is not None and got.shape == relu.shape and torch.equal(got, relu):
            return DirectDropout(name, module, p)
    # an nn.Dropout's own call was seen too, but its input is no relu(z) (or it was taken)
    for name, got, p in calls.seen:
        if 0 < p < 1 and got.shape == relu.shape and torch.equal(got, relu):
            return DirectDropout(name, None, p)
    return None


def _call_name(func: object) -> str:
    """``F.dropout`` -> ``"dropout"``; ``aten.dropout.default`` -> ``"dropout"``."""
    name = str(getattr(func, "__name__", func))
    return name.split(".")[0]


def _call_input_and_p(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[torch.Tensor | None, float]:
    """A dropout call's input and drop probability (``F.dropout``'s default 0.5)."""
    x = args[0] if args else kwargs.get("input")
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    tensor = x if isinstance(x, torch.Tensor) else None
    if isinstance(p, torch.Tensor) and p.numel() == 1:  # p held in a tensor (a buffer)
        return tensor, float(p)
    return tensor, float(p) if isinstance(p, (int, float)) else 0.0


class _DropoutCallMode(TorchFunctionMode):
    """Hands every functional dropout call (:data:`spear.model.DROPOUT_CALLS`) made while
    it is active, with its input and ``p``, to :meth:`on_call`; other calls run as they
    are."""

    def on_call(self, func: Callable[..., object], x: torch.Tensor, p: float) -> object | None:
        """What the call returns instead, or ``None`` to run it as it is."""
        raise NotImplementedError

    def __torch_function__(
        self,
        func: Callable[..., object],
        types: object,
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        kwargs = kwargs or {}
        if func in DROPOUT_CALLS:
            x, p = _call_input_and_p(args, kwargs)
            if x is not None:
                out = self.on_call(func, x, p)
                if out is not None:
                    return out
        return func(*args, **kwargs)


class _DropoutCalls(_DropoutCallMode):
    """Records the name, input and ``p`` of every functional dropout call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.Tensor, float]] = []

    def on_call(self, func: Callable[..., object], x: torch.Tensor, p: float) -> object | None:
        self.seen.append((_call_name(func), x.detach().clone(), p))
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
    dropout: DirectDropout, activations: torch.Tensor, scales: torch.Tensor
) -> Iterator[None]:
    """Run the model (in eval mode) as the client did: the Dropout's output multiplied by
    each example's scales.

    Each row of the Dropout's input that is one of the examples' ReLU outputs at the
    attacked layer, ``activations`` ``(k, m)`` (to :data:`ACTIVATION_MATCH_RTOL`), is
    multiplied by that example's ``scales`` ``(k, m)``; other rows pass as they are. A
    Dropout module is hooked (the hook goes with copies of the model); a functional call
    (:attr:`DirectDropout.module` ``None``) is replaced through a ``TorchFunctionMode``
    while the context is open. Removed on exit.
    """
    rows = _ExampleRows(activations, scales)
    if dropout.module is None:
        with _MaskedCalls(rows):
            yield
        return

    def scale(_mod: nn.Module, args: tuple[object, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else None
        return rows.scaled(x, out) if isinstance(x, torch.Tensor) else out

    handle = dropout.module.register_forward_hook(scale)
    try:
        yield
    finally:
        handle.remove()


class _ExampleRows:
    """The examples' ReLU outputs ``(k, m)`` at the attacked layer and their Dropout
    scales ``(k, m)``: which rows of a Dropout's input are which example's."""

    def __init__(self, activations: torch.Tensor, scales: torch.Tensor) -> None:
        self.activations = activations.detach().to("cpu", torch.float64)
        self.size = self.activations.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        scales = scales.detach().cpu()
        ones = torch.ones(1, scales.shape[1], dtype=scales.dtype)
        self.table = torch.cat([scales, ones])  # row -1: no example's, no dropout

    def index(self, x: torch.Tensor) -> torch.Tensor | None:
        """The example each row of ``x`` ``(r, m)`` is, ``-1`` for none ``(r,)`` (on the
        CPU, wherever ``x`` is); ``None`` when no row is an example's."""
        if x.dim() != 2 or x.shape[1] != self.activations.shape[1]:
            return None
        got = x.detach().to("cpu", torch.float64)
        # largest entry gap of every row to every example (r, k), relative to the example
        gap = torch.cdist(got, self.activations, p=math.inf) / self.size
        best, nearest = gap.min(dim=1)
        index = torch.where(best <= ACTIVATION_MATCH_RTOL, nearest, torch.full_like(nearest, -1))
        return index if bool((index >= 0).any()) else None

    def scaled(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` ``(r, m)`` (the Dropout's output for its input ``x``) with the rows that
        are examples' multiplied by their scales."""
        index = self.index(x)
        if index is None or out.shape != x.shape:
            return out
        return self.applied(index, out)

    def applied(self, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` ``(r, m)`` with row ``j`` multiplied by example ``index[j]``'s scales
        (none for ``-1``)."""
        return out * self.table[index].to(out.device, out.dtype)


class _MaskedCalls(_DropoutCallMode):
    """Replaces a functional dropout call (the model in eval mode, where it is the
    identity) by its input with the examples' rows scaled (:class:`_ExampleRows`)."""

    def __init__(self, rows: _ExampleRows) -> None:
        super().__init__()
        self.rows = rows

    def on_call(self, func: Callable[..., object], x: torch.Tensor, p: float) -> object | None:
        index = self.rows.index(x)
        if index is None:
            return None
        out = self.rows.applied(index, x)
        if func is torch.ops.aten.native_dropout.default:  # returns (output, kept units)
            return out, self.rows.applied(index, torch.ones_like(x)) != 0
        return out
