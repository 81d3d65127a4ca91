"""Invert one linear layer followed by ReLU: ``(dW, db[, W, c]) -> inputs``.

The entry point: it checks the arguments, builds the :class:`spear.inversion.problem.Problem`
and runs the pipeline of :mod:`spear.inversion` (docs/algorithm.md, facts 1-8; the steps
are listed in that package's docstring).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from spear import validate
from spear.downstream import Downstream
from spear.errors import InputError
from spear.inversion.driver import invert
from spear.inversion.problem import MIN_RANK_GAP, MaskedModel, Problem, Request
from spear.results import LayerReconstruction
from spear.solvers import get_solver
from spear.update import check_update_kind

__all__ = ["MIN_RANK_GAP", "invert_layer"]

#: Default minimal fraction of zero entries for a direction to count as a ReLU column.
DEFAULT_MIN_ZERO_FRACTION = 0.1
#: Updates whose largest entry lies outside this range are solved rescaled (exactly, by a
#: power of two): beyond it, sums of squares under- or overflow in float64.
SAFE_SCALE_LOW = 1e-100
SAFE_SCALE_HIGH = 1e100


def _validate(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Raise :class:`InputError` when the arguments do not fit together."""
    if not isinstance(weight_grad, torch.Tensor) or weight_grad.dim() != 2:
        found = (
            f"shape {tuple(weight_grad.shape)}"
            if isinstance(weight_grad, torch.Tensor)
            else type(weight_grad).__name__
        )
        raise InputError(
            f"weight_grad must be a 2-D tensor (m, n) (out_features x in_features), found "
            f"{found}. For a convolution or a batched gradient, reshape to the linear "
            "layer's (out, in) first."
        )
    m, n = weight_grad.shape
    named = {"weight_grad": weight_grad, "bias_grad": bias_grad, "weight": weight, "bias": bias}
    expected = {"weight_grad": (m, n), "bias_grad": (m,), "weight": (m, n), "bias": (m,)}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, found {type(tensor).__name__}.")
        if tuple(tensor.shape) != expected[name]:
            raise InputError(
                f"{name} must have shape {expected[name]} to match weight_grad {(m, n)}, "
                f"found {tuple(tensor.shape)}. Pass the gradient and parameters of the same "
                "nn.Linear (weight is (out_features, in_features))."
            )
        if not tensor.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, found {tensor.dtype}.")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError(
                f"{name} contains {bad} NaN or infinite entries; the attack needs a finite "
                "update. Check the client's training (a diverged step) or the file it came "
                "from."
            )


def _rescaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor / scale`` (any shape), or ``tensor`` itself when ``scale`` is 1."""
    return tensor if scale == 1.0 else tensor / scale


def _unit_scale(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> float:
    """A power of two near the update's largest entry when that is far from 1, else 1.

    Entries outside ``[SAFE_SCALE_LOW, SAFE_SCALE_HIGH]`` make sums of squares under- or
    overflow in float64 (a norm of entries of size 1e-160 is 0).
    """
    largest = float(weight_grad.detach().abs().max())
    if bias_grad is not None:
        largest = max(largest, float(bias_grad.detach().abs().max()))
    if largest == 0.0 or SAFE_SCALE_LOW <= largest <= SAFE_SCALE_HIGH:
        return 1.0
    return float(2.0 ** math.floor(math.log2(largest)))


def invert_layer(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    solver: str = "auto",
    update_kind: str = "gradient",
    time_budget: float = 120.0,
    max_samples: int | None = None,
    zero_tol: float | None = None,
    min_zero_fraction: float = DEFAULT_MIN_ZERO_FRACTION,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    search_with_weights: bool = True,
    after: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dropout: bool = False,
    dropout_p: float | None = None,
) -> LayerReconstruction:
    """Rebuild the ``b`` inputs of a linear layer followed by ReLU from its gradient.

    Parameters
    ----------
    weight_grad:
        ``(m, n)`` gradient (or FedAvg delta) of the layer's weight; any float dtype.
    bias_grad:
        ``(m,)`` gradient of its bias, or ``None`` for a layer without bias (inputs then
        come out only up to a positive scale each; see notes).
    weight, bias:
        ``(m, n)`` and ``(m,)``: the layer's parameters as the server sent them. Optional,
        but they enable peeling and the per-example verification (facts 7-8).
    batch_size:
        ``b`` when known; otherwise the numerical rank of ``weight_grad``.
    seed:
        Seed of every random choice (the result is deterministic given it).
    solver:
        ``"auto"`` (peeling, then sampling or the sparse solver by size), or a name from
        :func:`spear.solvers.available`.
    update_kind:
        ``"gradient"`` (FedSGD, DP clipping) or ``"delta"`` (FedAvg weight differences;
        the sign is irrelevant). Deltas let ReLU masks move between local steps.
    time_budget:
        Seconds after which the search stops and what is verified so far is returned.
    max_samples:
        Optional cap on samples drawn by the solvers.
    zero_tol:
        Relative zero tolerance; by default derived from the dtype and conditioning.
    min_zero_fraction:
        Fraction of zeros a direction needs to count as a ReLU column.
    device:
        Where to compute (``"cuda"`` when available); default: the gradient's device.
    progress:
        Show a progress bar of examples recovered; default: only on a terminal.
    search_with_weights:
        Use the weights to find examples (row candidates, guided sampling) and not only
        to verify them. When the guided search stalls on a small problem, a search
        without guidance runs in the remaining time and its examples are verified with
        the weights all the same.
    after:
        The model after the layer: maps its pre-activations ``(k, m)`` to logits
        ``(k, C)``, example by example (:attr:`spear.model.AttackTarget.after`). With the
        weights and an exact one-step gradient, it finds the examples whose zero sets
        leave the layer's own update ambiguous and checks every example whose direction
        it found (:mod:`spear.downstream`); :func:`spear.attack` passes it.
    dropout:
        A Dropout right after the layer's ReLU was active when the client computed the
        update: a unit an example turns on may carry no gradient (dropped), so each
        example is checked only on the units its ReLU pattern turns off, ``after`` is not
        used (the model after the layer does not know the masks), and the result is not
        :attr:`~spear.results.LayerReconstruction.verified` (:func:`spear.attack` checks
        the whole update with the masks read off the columns, :mod:`spear.dropout`).
    dropout_p:
        With ``dropout``, the Dropout's drop probability ``p`` (``0 < p < 1``), where
        known. With it and ``after``, an example the input side finds (fact 13) is checked
        against the model after the layer run with the mask its column shows (its units
        on with a zero entry dropped, the others scaled by ``1 / (1 - p)``).

    Returns
    -------
    LayerReconstruction
        ``.inputs`` ``(k, n)`` float64 of verified examples, ``k == b`` when complete.

    Raises
    ------
    InputError
        Shapes do not fit, non-finite values, unknown options.
    BatchTooLargeError
        The rank cannot reveal ``b`` (``b >= m`` or ``b > n``).
    NoReluSparsityError
        The gradient has no exact zeros where a ReLU would put them.
    """
    start = time.perf_counter()
    validate.batch_size(batch_size)
    validate.time_budget(time_budget)
    validate.drop_probability(dropout_p)
    validate.device(device)
    _validate(weight_grad, bias_grad, weight, bias)
    if solver != "auto":
        get_solver(solver)  # an unknown name fails here, before any work
    kind = check_update_kind(update_kind)
    # far from 1, squares under- or overflow inside the linear algebra; a power of two
    # rescales exactly and leaves the inputs unchanged (they are ratios of the two)
    scale = _unit_scale(weight_grad, bias_grad)
    request = Request(
        weight_grad=_rescaled(weight_grad, scale),
        bias_grad=_rescaled(bias_grad, scale) if bias_grad is not None else None,
        weight=weight,
        bias=bias,
        batch_size=batch_size,
        seed=seed,
        solver=solver,
        update_kind=kind,
        time_budget=time_budget,
        max_samples=max_samples,
        zero_tol=zero_tol,
        min_zero_fraction=min_zero_fraction,
        device=device,
        progress=progress,
        search_with_weights=search_with_weights,
        downstream=(
            Downstream(after, weight, bias, weight_grad.dtype)
            if after is not None and weight is not None and not dropout
            else None
        ),
        scale=scale,
        dropout=dropout,
        masked=(
            MaskedModel(Downstream(after, weight, bias, weight_grad.dtype), dropout_p)
            if after is not None and weight is not None and dropout and dropout_p is not None
            else None
        ),
    )
    result = invert(Problem.build(request, start))
    if scale != 1.0:
        result.output_grads = result.output_grads * scale
        result.notes.append(
            f"the update's entries are of size about {scale:.1e}; it was solved rescaled "
            "by that power of two (exactly), and the gradient columns scaled back."
        )
    return result
