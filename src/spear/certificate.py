"""Recompute the update from a reconstruction and compare (docs/algorithm.md, "Certificate").

For a gradient update the certificate is the relative error

    || sum_i c_i grad l(x_i, y_i) - update || / || update ||

over all parameters, where ``l`` is softmax cross-entropy and the weights ``c_i`` are
``1/k`` (mean), ``1`` (sum), or fitted per example (duplicates counted several times,
per-example clipping of DP-SGD): the smallest of these errors is returned. A value near
machine precision proves that the reconstruction reproduces everything the client sent;
changing one example by a small amount makes it large (tests check there are no false
positives).

A FedAvg delta cannot be recomputed without the client's learning rate, step count and
batch order. For ``update_kind="delta"`` the certificate checks what the delta does
determine: the attacked layer's weight delta must lie in the row space of the
reconstructed inputs (``|| dW - dW X^+ X || / || dW ||``). It cannot confirm labels.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.optimize import nnls
from torch import nn

from spear.errors import InputError
from spear.linalg import least_squares
from spear.model import parameter_dtype
from spear.update import check_update, check_update_kind, without_buffers

__all__ = [
    "VERIFIED_BELOW",
    "certify",
    "nonnegative_fit",
    "relative_error",
    "verified_threshold",
]

#: ``.verified`` needs the certificate below this, by the model's dtype. float64 reproduces
#: the update to about 1e-12 on real data. float32 reconstructions that are exact to its
#: precision measured 4e-7 to 7e-7 (b = 25-64, 784 -> 1000 MLPs), about 100 of its machine
#: epsilons below the threshold; one example off by 1e-3 of its scale measured 2e-5 to
#: 8e-4, and one scaled by 1.01 measured 7e-4 at b = 64 (so 1e-3 would let it through).
VERIFIED_BELOW: dict[torch.dtype, float] = {torch.float64: 1e-8, torch.float32: 1e-5}
#: Integer dtypes accepted for candidate inputs (converted to the model's dtype).
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Largest number of parameter entries used to fit the per-example weights ``c_i``.
FIT_PARAMETER_BUDGET = 200_000
#: Largest design matrix for that fit, in entries (parameter entries times examples; 400 MB
#: in float64): above it the per-example weights are not fitted and only the mean and sum
#: weights are tried.
FIT_DESIGN_BUDGET = 50_000_000
#: Iterations of :func:`scipy.optimize.nnls` per weight (its own default is 3 per weight,
#: which a poorly conditioned design of noisy estimates can exhaust).
NNLS_ITERATIONS_PER_WEIGHT = 30


def verified_threshold(dtype: torch.dtype) -> float:
    """The certificate threshold for a model of ``dtype`` (see :data:`VERIFIED_BELOW`)."""
    return VERIFIED_BELOW.get(dtype, 1e-2)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def certify(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    inputs: torch.Tensor | ArrayLike,
    labels: torch.Tensor | ArrayLike,
    *,
    update_kind: str = "gradient",
) -> float:
    """Relative error of the update recomputed from a candidate reconstruction.

    Parameters
    ----------
    model:
        The model as the server sent it (not modified).
    update:
        Parameter name -> tensor, as the client returned it (entries named after the
        model's buffers are left out).
    inputs:
        ``(k, *input_shape)`` candidate inputs in the model's input space: a tensor, or
        anything ``torch.as_tensor`` takes (a NumPy array; nested lists are read in the
        model's dtype).
    labels:
        ``(k,)`` candidate class indices in ``[0, classes)``, or ``(k, classes)`` exact
        one-hot rows (read with ``argmax``); a tensor or an array. Soft labels
        (probabilities) and booleans are refused.
    update_kind:
        ``"gradient"`` or ``"delta"``.

    Returns
    -------
    float
        The relative error (0 is perfect); ``inf`` when the candidate is empty.

    Raises
    ------
    InputError
        The update does not fit the model (names, shapes, dtype, NaN or infinite
        entries); ``update_kind`` is unknown; inputs or labels
        are not arrays, have non-finite entries, differ in length, or do not fit the model
        (input shape, class indices outside ``[0, classes)``, one-hot rows of the wrong
        width).

    Notes
    -----
    When the model has a BatchNorm that normalises with batch statistics (training
    mode), the update is recomputed on the whole candidate batch only (mean and sum
    reductions); per-example weights (duplicates, DP-SGD clipping) are not fitted, since
    one example alone cannot be normalised with the batch's statistics.
    """
    return _recomputed_errors(model, update, inputs, labels, update_kind, ("signed",))[0]


def nonnegative_fit(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    inputs: torch.Tensor | ArrayLike,
    labels: torch.Tensor | ArrayLike,
    *,
    update_kind: str = "gradient",
) -> float:
    """How well a candidate explains a noisy update: :func:`certify` with the fitted
    per-example weights held non-negative (:func:`scipy.optimize.nnls`).

    :func:`certify` drops its fitted weights when one comes out negative, which an
    estimate's example easily does under noise; its error then jumps to that of the
    mean or sum weights, several times the update's norm under DP-SGD clipping. Holding
    the weights at zero or above gives an error that moves smoothly with the estimate,
    so that estimates of a noisy update can be ranked by it. An example weighted zero is
    not in the fit: this is a measure of fit, never a certificate of exactness. Same
    parameters, errors and delta rule as :func:`certify`; where :func:`certify` fits no
    weights (BatchNorm with batch statistics, a design above
    :data:`FIT_DESIGN_BUDGET`) the two agree.
    """
    return _recomputed_errors(model, update, inputs, labels, update_kind, ("nonnegative",))[0]


def certificate_and_fit(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    inputs: torch.Tensor | ArrayLike,
    labels: torch.Tensor | ArrayLike,
    *,
    update_kind: str = "gradient",
) -> tuple[float, float]:
    """:func:`certify` and :func:`nonnegative_fit` of one candidate, from one set of
    per-example gradients (the design of ``k`` backward passes is built once)."""
    certificate, fit = _recomputed_errors(
        model, update, inputs, labels, update_kind, ("signed", "nonnegative")
    )
    return certificate, fit


def _recomputed_errors(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    inputs: torch.Tensor | ArrayLike,
    labels: torch.Tensor | ArrayLike,
    update_kind: str,
    fits: tuple[str, ...],
) -> tuple[float, ...]:
    """:func:`certify` (``"signed"``) and :func:`nonnegative_fit` (``"nonnegative"``), one
    error per entry of ``fits``."""
    model, update, x, y, kind = _checked(model, update, inputs, labels, update_kind)
    if x.shape[0] == 0:
        return (math.inf,) * len(fits)
    if kind == "delta":
        return (_certify_delta(model, update, x),) * len(fits)
    return _gradient_errors(model, update, x, y, fits=fits)


def _checked(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    inputs: torch.Tensor | ArrayLike,
    labels: torch.Tensor | ArrayLike,
    update_kind: str,
) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, str]:
    """The arguments of :func:`certify` checked: a copy of the model, the update's
    parameter entries (detached), inputs ``(k, *input_shape)`` in the model's dtype,
    labels ``(k,)`` or ``(k, classes)`` as given, and the update kind."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, found {type(model).__name__}.")
    given = without_buffers(model, update)[0]
    check_update(model, given)
    update = {name: tensor.detach() for name, tensor in given.items()}
    x = _as_tensor(inputs, "inputs", parameter_dtype(model))
    y = _as_tensor(labels, "labels")
    if x.dim() == 0 or y.dim() == 0 or y.dim() > 2:
        raise InputError(
            f"inputs must be (k, *input_shape) and labels (k,) class indices or (k, classes) "
            f"one-hot rows; found inputs of shape {tuple(x.shape)} and labels of shape "
            f"{tuple(y.shape)}. Stack the examples along the first dimension."
        )
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"inputs hold {x.shape[0]} examples but labels {y.shape[0]}; pass one "
            "label per example."
        )
    if x.shape[0] == 0:
        return model, update, x, y, update_kind
    if not (x.is_floating_point() or x.dtype in _INTEGER_DTYPES):
        raise InputError(f"inputs must be real numbers, found dtype {x.dtype}.")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"inputs contain {bad} NaN or infinite entries; pass a finite candidate.")
    kind = check_update_kind(update_kind)
    model = copy.deepcopy(model)  # a forward pass may touch buffers (BatchNorm statistics)
    if kind == "delta":
        _class_indices(y, None)
    return model, update, x, y, kind


def _gradient_errors(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    fits: tuple[str, ...],
) -> tuple[float, ...]:
    """The smallest relative error of the gradient recomputed from ``x`` ``(k, ...)`` and
    ``y`` under mean, sum and fitted per-example weights, once for each entry of ``fits``:
    ``"signed"`` uses the least-squares weights only where all are positive,
    ``"nonnegative"`` the weights held at zero or above."""
    from spear.model import batch_statistics_layers

    params = list(model.named_parameters())
    dtype = params[0][1].dtype
    x = x.detach().to(dtype)
    classes = _classes(model, x)
    y = _class_indices(y, classes)
    observed = _flat([update[n] for n, _ in params])
    tensors = [p for _, p in params]
    k = x.shape[0]
    best = math.inf
    for weights in (torch.full((k,), 1.0 / k, dtype=dtype), torch.ones(k, dtype=dtype)):
        grad = _weighted_grad(model, tensors, x, y, weights)
        best = min(best, relative_error(grad, observed))
    errors = [best] * len(fits)
    if best <= verified_threshold(dtype) or batch_statistics_layers(model):
        return tuple(errors)
    system = _per_example_design(model, params, x, y, update)
    if system is None:
        return tuple(errors)
    for position, fit in enumerate(fits):
        fitted = _fit_weights(*system, nonnegative=fit == "nonnegative")
        # a loss weighs its examples by positive amounts; a negative weight fits a wrong
        # label where gradients of two labels are parallel (two classes)
        if fit == "nonnegative" or bool((fitted > 0).all()):
            grad = _weighted_grad(model, tensors, x, y, fitted.to(dtype))
            errors[position] = min(best, relative_error(grad, observed))
    return tuple(errors)


def relative_error(recomputed: torch.Tensor, observed: torch.Tensor) -> float:
    """``||recomputed - observed|| / ||observed||``, free of under- and overflow.

    Both are divided by a power of two near ``observed``'s largest entry first (exact),
    so that an update of entries about 1e-300 gets a true relative error instead of a
    norm that underflows to 0. An all-zero ``observed`` gives ``inf`` (nothing certifies
    against it).

    Examples
    --------
    >>> o = torch.tensor([3e-300, 4e-300], dtype=torch.float64)
    >>> round(relative_error(o * (1 + 1e-6), o), 12)
    1e-06
    """
    largest = float(observed.abs().max()) if observed.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return math.inf
    scale = 2.0 ** math.floor(math.log2(largest))
    denominator = float((observed / scale).norm())
    return float(((recomputed - observed) / scale).norm()) / denominator


def _as_tensor(value: object, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a tensor: tensors and arrays keep their dtype; nested lists and other
    sequences are converted to ``dtype`` when given (Python floats are float64, and
    ``torch.as_tensor`` would round them to float32)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        dtype = None
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"{name} must be a torch.Tensor or an array torch.as_tensor can convert, found "
            f"{type(value).__name__} ({exc}); pass a tensor or a NumPy array."
        ) from exc


def _input_hint(model: nn.Module) -> str:
    """What inputs the model's attacked layer expects, when that can be told."""
    from spear.errors import NotAttackableError
    from spear.model import find_target, guess_input_shape

    try:
        target = find_target(model)
    except NotAttackableError:
        return ""
    if not target.first:
        return ""
    shape = target.input_shape or guess_input_shape(target.in_features)
    return (
        f" Its first layer {target.name!r} takes {target.in_features} features per example, "
        f"e.g. inputs of shape (k, {', '.join(str(d) for d in shape)})."
    )


def _classes(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes: the width of the logits ``model(x)`` (checked ``(k, c)``)."""
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise InputError(
            f"the model could not be run on inputs of shape {tuple(x.shape)} ({exc})."
            f"{_input_hint(model)} Pass inputs shaped like a batch the model takes, "
            "(k, *input_shape), in its input space."
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"certify needs a classifier whose output is logits (k, classes); for "
            f"{x.shape[0]} inputs the model returned {found}."
        )
    return int(out.shape[1])


def _class_indices(labels: torch.Tensor, classes: int | None) -> torch.Tensor:
    """``(k,)`` int64 class indices from indices or exact one-hot rows, range-checked."""
    if labels.dim() == 2:
        values = labels.to(torch.float64)
        one_hot = bool(((values == 0) | (values == 1)).all()) and bool(
            (values.sum(dim=1) == 1).all()
        )
        if not one_hot:
            raise InputError(
                f"labels of shape {tuple(labels.shape)} must be exact one-hot rows (one 1, "
                "the rest 0), but some rows are not: soft labels (probabilities) are not "
                "supported. Pass class indices (k,), e.g. labels.argmax(dim=1) if that is "
                "what you mean."
            )
        if classes is not None and labels.shape[1] != classes:
            raise InputError(
                f"one-hot labels have {labels.shape[1]} columns but the model has {classes} "
                "outputs; pass one column per class, or class indices (k,)."
            )
        return values.argmax(dim=1)
    if labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(
            f"labels must be integer class indices, found dtype {labels.dtype}; pass the "
            "class index of each example as integers (labels.long() if booleans are what "
            "you mean)."
        )
    if labels.is_floating_point():
        integral = torch.isfinite(labels) & (labels == labels.round())
        if not bool(integral.all()):
            example = float(labels[~integral][0])
            raise InputError(
                f"labels must be integer class indices, found non-integer values (e.g. "
                f"{example!r}); pass the class index of each example."
            )
    indices = labels.to(torch.int64)
    if classes is not None and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= classes:
            outside = int(((indices < 0) | (indices >= classes)).sum())
            raise InputError(
                f"labels must be class indices in [0, {classes}) for a model with {classes} "
                f"outputs, found values from {low} to {high} ({outside} outside). Pass "
                "0-based indices (labels numbered from 1: subtract 1)."
            )
    return indices


def _fill(
    grads: tuple[torch.Tensor | None, ...], tensors: list[nn.Parameter]
) -> list[torch.Tensor]:
    """Gradients with zeros for parameters the loss does not reach."""
    return [
        g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors, strict=True)
    ]


def _weighted_grad(
    model: nn.Module,
    tensors: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Flattened gradient of ``sum_i weights_i * CE(model(x_i), y_i)``."""
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    grads = torch.autograd.grad((losses * weights).sum(), tensors, allow_unused=True)
    return _flat(_fill(grads, tensors))


def _per_example_design(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    x: torch.Tensor,
    y: torch.Tensor,
    update: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The design ``(size, k)`` of per-example gradients on the parameters nearest the
    output (at most :data:`FIT_PARAMETER_BUDGET` entries) and the update's matching
    entries ``(size,)``; ``None`` when the design exceeds :data:`FIT_DESIGN_BUDGET`."""
    chosen: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, p in reversed(params):
        if size + p.numel() > FIT_PARAMETER_BUDGET and chosen:
            break
        chosen.append((name, p))
        size += p.numel()
    tensors = [p for _, p in chosen]
    k = x.shape[0]
    if size * k > FIT_DESIGN_BUDGET:
        return None
    rows = []
    for i in range(k):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        rows.append(_flat(_fill(grads, tensors)))
    return torch.stack(rows, dim=1), _flat([update[n] for n, _ in chosen])


def _fit_weights(design: torch.Tensor, target: torch.Tensor, *, nonnegative: bool) -> torch.Tensor:
    """Per-example weights ``c`` ``(k,)`` minimising ``||design c - target||`` for a design
    ``(size, k)``, held at zero or above when ``nonnegative``."""
    if nonnegative:
        # ||D c - t|| = ||R c - Q^T t|| up to a constant (D = Q R): the same problem in
        # k x k, which nnls solves in microseconds instead of seconds at 10^5 rows
        q, r = torch.linalg.qr(design)
        k = design.shape[1]
        weights, _ = nnls(r.numpy(), (q.T @ target).numpy(), maxiter=NNLS_ITERATIONS_PER_WEIGHT * k)
        return torch.as_tensor(weights)
    return least_squares(design, target[:, None])[:, 0]


def _certify_delta(
    model: nn.Module, update: dict[str, torch.Tensor], inputs: torch.Tensor
) -> float:
    """Row-space check of the attacked layer's delta (see the module docstring)."""
    from spear.model import find_target

    target = find_target(model)
    delta = update[target.weight_key].detach().to(torch.float64)
    x = inputs.detach().reshape(inputs.shape[0], -1).to(torch.float64)
    if x.shape[1] != delta.shape[1]:
        raise InputError(
            f"inputs flatten to {x.shape[1]} features but the attacked layer "
            f"{target.name!r} takes {delta.shape[1]}; pass inputs in the model's input space."
        )
    proj = delta @ torch.linalg.pinv(x) @ x
    return relative_error(proj, delta)
