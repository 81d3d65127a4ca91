"""Recompute the update from a reconstruction and compare (ALGORITHM.md, "Certificate").

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

import torch
from torch import nn

from spear.client import check_update
from spear.errors import InputError

__all__ = ["VERIFIED_BELOW", "certify", "verified_threshold"]

#: ``.verified`` is true when the certificate is below this, by the model's dtype: float64
#: reproduces the update to about 1e-12 on real data; float32 to about 1e-5. A
#: reconstruction with one example off by 1% gives about 1e-2.
VERIFIED_BELOW: dict[torch.dtype, float] = {torch.float64: 1e-8, torch.float32: 1e-3}
#: Largest number of parameter entries used to fit the per-example weights ``c_i``.
FIT_PARAMETER_BUDGET = 200_000


def verified_threshold(dtype: torch.dtype) -> float:
    """The certificate threshold for a model of ``dtype`` (see :data:`VERIFIED_BELOW`)."""
    return VERIFIED_BELOW.get(dtype, 1e-2)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def certify(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    update_kind: str = "gradient",
) -> float:
    """Relative error of the update recomputed from a candidate reconstruction.

    Parameters
    ----------
    model:
        The model as the server sent it (not modified).
    update:
        Parameter name -> tensor, as the client returned it.
    inputs:
        ``(k, *input_shape)`` candidate inputs in the model's input space.
    labels:
        ``(k,)`` candidate class indices.
    update_kind:
        ``"gradient"`` or ``"delta"``.

    Returns
    -------
    float
        The relative error (0 is perfect); ``inf`` when the candidate is empty.
    """
    check_update(model, update)
    model = copy.deepcopy(model)  # a forward pass may touch buffers (BatchNorm statistics)
    params = list(model.named_parameters())
    if inputs.shape[0] != labels.shape[0]:
        raise InputError(
            f"inputs hold {inputs.shape[0]} examples but labels {labels.shape[0]}; pass one "
            "label per example."
        )
    if inputs.shape[0] == 0:
        return math.inf
    if update_kind == "delta":
        return _certify_delta(model, update, inputs)
    if update_kind != "gradient":
        raise InputError(f"update_kind must be 'gradient' or 'delta', found {update_kind!r}.")
    dtype = params[0][1].dtype
    x = inputs.detach().to(dtype)
    y = labels.detach().to(torch.int64)
    observed = _flat([update[n] for n, _ in params])
    norm = float(observed.norm()) or 1.0
    tensors = [p for _, p in params]
    k = x.shape[0]
    best = math.inf
    for weights in (torch.full((k,), 1.0 / k, dtype=dtype), torch.ones(k, dtype=dtype)):
        best = min(best, float((_weighted_grad(model, tensors, x, y, weights) - observed).norm()))
    if best / norm > verified_threshold(dtype):
        fitted = _fit_weights(model, params, x, y, update)
        if fitted is not None:
            grad = _weighted_grad(model, tensors, x, y, fitted.to(dtype))
            best = min(best, float((grad - observed).norm()))
    return best / norm


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


def _fit_weights(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    x: torch.Tensor,
    y: torch.Tensor,
    update: dict[str, torch.Tensor],
) -> torch.Tensor | None:
    """Per-example weights ``c`` (k,) fitted on the parameters nearest the output."""
    chosen: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, p in reversed(params):
        if size + p.numel() > FIT_PARAMETER_BUDGET and chosen:
            break
        chosen.append((name, p))
        size += p.numel()
    tensors = [p for _, p in chosen]
    k = x.shape[0]
    if size * k > 50_000_000:
        return None
    rows = []
    for i in range(k):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        rows.append(_flat(_fill(grads, tensors)))
    design = torch.stack(rows, dim=1)  # (size, k)
    target = _flat([update[n] for n, _ in chosen])
    return torch.linalg.lstsq(design, target[:, None]).solution[:, 0]


def _certify_delta(
    model: nn.Module, update: dict[str, torch.Tensor], inputs: torch.Tensor
) -> float:
    """Row-space check of the attacked layer's delta (see the module docstring)."""
    from spear.model import find_target

    target = find_target(model)
    delta = update[f"{target.name}.weight"].detach().to(torch.float64)
    x = inputs.detach().reshape(inputs.shape[0], -1).to(torch.float64)
    if x.shape[1] != delta.shape[1]:
        raise InputError(
            f"inputs flatten to {x.shape[1]} features but the attacked layer "
            f"{target.name!r} takes {delta.shape[1]}; pass inputs in the model's input space."
        )
    proj = delta @ torch.linalg.pinv(x) @ x
    return float((delta - proj).norm()) / (float(delta.norm()) or 1.0)
