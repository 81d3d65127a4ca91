"""The classic analytic single-example attack on a linear layer with a bias.

For a linear layer ``z = W x + c`` and one example, the gradients are ``dW = g x^T`` and
``dc = g`` (``g`` the gradient at ``z``), so every row ``j`` with ``g_j != 0`` gives the
input exactly: ``x = dW[j] / dc[j]`` (Phong et al. 2017; Geiping et al. 2020, Prop. D.1).
This module combines all usable rows by least squares, ``x = dc^T dW / ||dc||^2``, which
is the bias-weighted average of the per-row answers ``dW[j] / dc[j]`` (weights
``dc[j]^2``): exact for one example and robust to rows whose ``dc[j]`` is tiny.

For a batch of ``b > 1`` examples ``dW = sum_i g_i x_i^T`` and the same formula returns
``sum_i w_i x_i`` with ``w_i = <dc, g_i> / ||dc||^2`` (the ``w_i`` sum to one): a mixture of
the batch, not any one example. That is the known limitation SPEAR removes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import nn

from spear.baselines.labels import as_gradient, infer_labels, parameter_name
from spear.errors import InputError, NotAttackableError
from spear.results import Reconstruction
from spear.update import check_partial_update, check_update_kind

__all__ = ["analytic_attack"]

#: Note attached to every baseline result: the certificate is filled in by the caller.
CERTIFICATE_NOTE = (
    "certificate not computed by the baseline (None); use spear.certify to check the "
    "reconstruction against the update."
)


def _first_linear_with_bias(
    model: nn.Module, update: Mapping[str, torch.Tensor]
) -> tuple[str, nn.Linear, int]:
    """Name, module and index (among all ``nn.Linear``) of the first attackable linear layer."""
    index = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if (
            module.bias is not None
            and parameter_name(name, "weight") in update
            and parameter_name(name, "bias") in update
        ):
            return name, module, index
        index += 1
    raise NotAttackableError(
        "the analytic attack needs an nn.Linear layer with a bias whose weight and bias "
        "gradients are both in the update; the model has none. Try the gradient-matching "
        "baseline, which works on any differentiable model."
    )


def analytic_attack(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    input_shape: tuple[int, ...],
    update_kind: str = "gradient",
    seed: int = 0,
    time_budget: float | None = None,
    rows: int | None = None,
) -> Reconstruction:
    """Recover one input from the first linear layer's weight and bias gradients.

    The first ``nn.Linear`` (in ``model.named_modules()`` order, which is a baseline's
    shortcut: registration order is usually the forward order) that has a bias and whose
    gradients are in ``update`` is attacked. If it is not the model's first layer, or its
    input size differs from ``prod(input_shape)``, the result is in that layer's input
    feature space (``feature_space=True``).

    Parameters
    ----------
    model:
        The model as the server sent it (read only; never modified).
    update:
        Parameter name -> tensor: a gradient of softmax cross-entropy (any reduction, the
        formula is scale invariant) or, with ``update_kind="delta"``, a FedAvg weight
        difference (exact only for one local step).
    batch_size:
        ``b``, the number of examples in the client's batch. For ``b > 1`` the result is a
        mixture of the batch (see the module docstring).
    input_shape:
        Shape of one model input, e.g. ``(1, 28, 28)``.
    update_kind:
        ``"gradient"`` or ``"delta"``.
    seed:
        Unused (the attack is deterministic); accepted for the common call.
    time_budget:
        Unused (the attack is a single matrix product); accepted for the common call.
    rows:
        Use only the ``rows`` rows with the largest ``|dc[j]|`` (``None``: every row with a
        non-zero bias gradient). ``rows=1`` is the textbook "best row" variant.

    Returns
    -------
    Reconstruction
        ``inputs`` is ``(1, *input_shape)`` (or ``(1, n)`` in feature space; ``(0, ...)``
        when the bias gradient is zero) in the model's dtype; ``labels`` is ``(1,)`` int64
        for ``b = 1`` and ``None`` for ``b > 1`` (the batch's inferred labels are in
        ``notes``); ``certificate`` is ``None``; ``complete`` is True only for ``b = 1``.

    Raises
    ------
    NotAttackableError
        When the model has no linear layer with a bias in the update.
    InputError
        When the update does not fit the model or the arguments are invalid.
    """
    del seed, time_budget  # deterministic and instantaneous
    start = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    if rows is not None and rows < 1:
        raise InputError(f"rows must be a positive number of rows or None, got {rows}.")
    kind = check_update_kind(update_kind)
    checked = check_partial_update(model, update)
    name, layer, linear_index = _first_linear_with_bias(model, checked)
    dtype = layer.weight.dtype
    weight_grad = as_gradient(checked[parameter_name(name, "weight")], kind)
    bias_grad = as_gradient(checked[parameter_name(name, "bias")], kind)
    weight_grad = weight_grad.to(torch.float64).cpu()
    bias_grad = bias_grad.to(torch.float64).cpu()

    notes: list[str] = [
        f"attacked the first nn.Linear with a bias in module order: {name!r} "
        f"({layer.in_features} -> {layer.out_features}); module order is a baseline's "
        "shortcut for the forward order."
    ]
    n_features = layer.in_features
    feature_space = linear_index > 0 or n_features != math.prod(input_shape)
    if feature_space:
        notes.append(
            f"layer {name!r} does not see the raw input (it is not the first linear layer or "
            f"its {n_features} inputs differ from prod(input_shape) = {math.prod(input_shape)}"
            "): the result is in its input feature space."
        )
    out_shape: tuple[int, ...] = (n_features,) if feature_space else tuple(input_shape)

    magnitude = bias_grad.abs()
    usable = magnitude > 0
    if not bool(usable.any()):
        notes.append(
            f"the bias gradient of {name!r} is zero (no example activated the layer's "
            "output gradient): nothing to recover."
        )
        notes.append(CERTIFICATE_NOTE)
        return Reconstruction(
            inputs=torch.zeros((0, *out_shape), dtype=dtype),
            labels=None,
            certificate=None,
            verified=False,
            batch_size=batch_size,
            complete=False,
            layer=name,
            feature_space=feature_space,
            seconds=time.perf_counter() - start,
            notes=notes,
        )
    if rows is not None:
        top = torch.topk(magnitude, min(rows, int(usable.sum()))).indices
        selected = torch.zeros_like(usable)
        selected[top] = True
        usable = selected
    coeffs = bias_grad[usable]
    # Least squares fit dW[usable] ~= coeffs x^T: the dc^2-weighted mean of dW[j] / dc[j].
    recovered = (coeffs @ weight_grad[usable]) / (coeffs @ coeffs)
    notes.append(
        f"combined {int(usable.sum())} of {bias_grad.numel()} rows by least squares "
        "(x = dc^T dW / ||dc||^2)."
    )

    labels: torch.Tensor | None
    inference = infer_labels(model, checked, batch_size=batch_size, update_kind=kind)
    if batch_size == 1:
        labels = inference.labels
        notes.extend(inference.notes)
        complete = True
    else:
        labels = None
        complete = False
        notes.append(
            f"batch_size = {batch_size} > 1: the result is a weighted mixture of the "
            "batch's inputs, not any single example (the known limitation of this attack)."
        )
        if inference.labels is not None:
            notes.append(
                "labels of the mixture are undefined; the batch's labels inferred from the "
                f"last layer are {inference.labels.tolist()}."
            )
    notes.append(CERTIFICATE_NOTE)
    return Reconstruction(
        inputs=recovered.reshape(1, *out_shape).to(dtype),
        labels=labels,
        certificate=None,
        verified=False,
        batch_size=batch_size,
        complete=complete,
        layer=name,
        feature_space=feature_space,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
