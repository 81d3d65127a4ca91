"""Shared helpers of the baseline attacks: reading an update, finding layers, labels.

Labels come from the gradient of the *last* ``nn.Linear`` (the classifier head) under
softmax cross-entropy. For one example with label ``y`` and softmax output ``p`` the bias
gradient is ``p - onehot(y)``: every entry is positive except the one at ``y`` (the iDLG
rule, Zhao et al. 2020). For a batch the bias gradient is the sum (or mean) of those
vectors, and :func:`infer_labels` uses the LLG-style greedy count of Wainakh et al. (2022):
each example contributes about the same "impact" ``1 - p_y`` to the negative side, so it
repeatedly takes the most negative class and adds one impact back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from spear.errors import InputError
from spear.update import UpdateKind

__all__ = [
    "LabelInference",
    "as_gradient",
    "find_linear",
    "greedy_count",
    "infer_labels",
    "parameter_name",
]


def as_gradient(tensor: torch.Tensor, update_kind: UpdateKind) -> torch.Tensor:
    """Turn an update entry into something proportional to a gradient (up to a positive scale).

    A FedAvg weight difference after one local step is ``-lr * gradient``, so a ``"delta"``
    is negated; after several local steps this is only an approximation.
    """
    return -tensor if update_kind == "delta" else tensor


def parameter_name(module_name: str, attribute: str) -> str:
    """The ``named_parameters()`` key of ``attribute`` of the module called ``module_name``."""
    return f"{module_name}.{attribute}" if module_name else attribute


def find_linear(model: nn.Module, *, last: bool = False) -> tuple[str, nn.Linear] | None:
    """The first (or last) ``nn.Linear`` in ``model.named_modules()`` order, or ``None``.

    Registration order is usually, but not always, the order of the forward pass; that is
    good enough for a baseline (SPEAR's own layer finder traces the model instead).
    """
    found: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
            if not last:
                return found
    return found


@dataclass
class LabelInference:
    """Labels inferred from the classifier head's gradient.

    Attributes
    ----------
    labels:
        ``(batch_size,)`` int64 class indices sorted by confidence (most negative gradient
        entry first), or ``None`` when the model has no usable last linear layer.
    layer:
        Name of the classifier layer used (``""`` when none).
    source:
        ``"bias"``, ``"weight"`` (row sums of the weight gradient; assumes non-negative
        features, e.g. after a ReLU) or ``""``.
    scores:
        ``(num_classes,)`` float64: the per-class statistic used (negative = present).
    notes:
        Plain-language remarks.
    """

    labels: torch.Tensor | None
    layer: str = ""
    source: str = ""
    scores: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


def infer_labels(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    update_kind: UpdateKind = "gradient",
) -> LabelInference:
    """Infer the batch's labels from the last linear layer's gradient (iDLG / LLG rule).

    Let ``g`` be the bias gradient of the last ``nn.Linear`` (``(C,)``, any positive scale,
    so mean and sum reduction are alike). For ``batch_size == 1`` the label is the single
    negative entry, ``argmin g`` (exact for softmax cross-entropy). For ``batch_size > 1``
    each example adds ``-(1 - p_y)`` at its label and ``+(1 - p_y)`` spread over the other
    classes, so ``sum |g| / (2 b)`` estimates one example's impact; the greedy rule takes
    ``argmin g`` ``b`` times, adding the impact back to the chosen entry each time (so a
    class can be picked more than once). Exact when every class in the batch has a negative
    entry and the impacts are similar; a heuristic otherwise.

    Without a bias the row sums of the weight gradient are used instead: row ``c`` is
    ``sum_i (p_ic - y_ic) h_i``, whose sum has the same signs when the features ``h`` are
    non-negative (a ReLU before the head).

    Parameters
    ----------
    model:
        The model as sent (read only).
    update:
        Parameter name -> gradient (or delta) tensor.
    batch_size:
        ``b``, the number of labels to return.
    update_kind:
        ``"gradient"`` or ``"delta"`` (a delta is negated first).

    Returns
    -------
    LabelInference
        ``labels`` is ``(b,)`` int64, or ``None`` with a note saying why.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    head = find_linear(model, last=True)
    if head is None:
        return LabelInference(None, notes=["no nn.Linear layer found: labels not inferred."])
    name, module = head
    bias_key = parameter_name(name, "bias")
    weight_key = parameter_name(name, "weight")
    if module.bias is not None and bias_key in update:
        scores = as_gradient(update[bias_key].detach(), update_kind).to(torch.float64).cpu()
        source = "bias"
    elif weight_key in update:
        weight_grad = as_gradient(update[weight_key].detach(), update_kind)
        scores = weight_grad.to(torch.float64).cpu().sum(dim=1)
        source = "weight"
    else:
        return LabelInference(
            None,
            layer=name,
            notes=[f"the update has no gradient for the last linear layer {name!r}."],
        )
    notes: list[str] = []
    if batch_size == 1:
        labels = scores.argmin().reshape(1)
        negatives = int((scores < 0).sum())
        if negatives != 1:
            notes.append(
                f"expected exactly one negative entry in the {source} gradient of {name!r} "
                f"for one example, found {negatives}; took the most negative."
            )
    else:
        labels = greedy_count(scores, batch_size)
        notes.append(
            f"labels from the {source} gradient of {name!r} by the LLG-style greedy count "
            "(a heuristic for batch_size > 1: repeated or confident classes may be miscounted)."
        )
    return LabelInference(
        labels.to(torch.int64), layer=name, source=source, scores=scores, notes=notes
    )


def greedy_count(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``(count,)`` labels from a head's bias gradient ``scores`` ``(C,)`` by the LLG-style
    greedy count: ``sum |scores| / (2 count)`` estimates one example's impact; the most
    negative class is taken ``count`` times, the impact added back each time.

    >>> greedy_count(torch.tensor([-0.5, 0.2, -0.3, 0.6]), 2).tolist()
    [0, 2]
    """
    impact = float(scores.abs().sum()) / (2 * count)
    work = scores.detach().to(torch.float64).clone()
    chosen: list[int] = []
    for _ in range(count):
        index = int(work.argmin())
        chosen.append(index)
        work[index] += impact
    return torch.tensor(chosen, dtype=torch.int64)
