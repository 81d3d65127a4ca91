"""Models with one logit trained with binary cross-entropy, read as two-class softmax.

A binary classifier often ends in one output ``z`` per example and is trained with
``BCEWithLogitsLoss`` (labels 0 and 1). Softmax cross-entropy on the two logits
``(-z/2, z/2)`` is the same loss: the softmax of those logits is ``(1 - s, s)`` with
``s = sigmoid(z)``, and the gradient with respect to ``z`` is ``s - y`` for both. So the
attack reads such a model through that two-logit view and every part of it that fits
softmax cross-entropy (the model after the layer, labels, certificate, images) applies
unchanged. The symmetric pair, rather than ``(0, z)``, keeps the least-squares
coefficients of the logits' Jacobian (rank one, rows ``-j/2`` and ``j/2``) proportional
to ``p - e_y``, as cross-entropy's are.

Not covered: ``pos_weight`` or per-example weights, soft labels, a model that ends in a
sigmoid and is trained with ``BCELoss`` on its probabilities, and regression losses on one
output (their labels do not fit, and nothing is verified).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import fx, nn

from spear.errors import InputError

__all__ = [
    "LOSSES",
    "Loss",
    "as_two_logits",
    "check_loss",
    "one_logit",
    "two_logits",
    "two_logits_hook",
    "view_as_two_logits",
]

Loss = Literal["auto", "cross_entropy", "binary_cross_entropy"]
#: ``"auto"``: softmax cross-entropy, or binary cross-entropy on a model with one output;
#: ``"cross_entropy"``: softmax cross-entropy always; ``"binary_cross_entropy"``: one
#: logit per example with ``BCEWithLogitsLoss`` (refused for other models).
LOSSES: tuple[str, ...] = ("auto", "cross_entropy", "binary_cross_entropy")


def check_loss(loss: object) -> Loss:
    """``loss`` when it is one of :data:`LOSSES`; else :class:`InputError`."""
    if loss not in LOSSES:
        raise InputError(
            f"loss must be one of {', '.join(repr(name) for name in LOSSES)}, found {loss!r}: "
            "'cross_entropy' for softmax cross-entropy over the model's outputs, "
            "'binary_cross_entropy' for one logit per example with BCEWithLogitsLoss."
        )
    return loss  # type: ignore[return-value]


def two_logits(outputs: torch.Tensor) -> torch.Tensor:
    """``(k, 2)`` logits ``(-z/2, z/2)`` of one-logit outputs ``z`` ``(k,)`` or ``(k, 1)``;
    other outputs are returned unchanged."""
    if outputs.ndim == 1:
        z = outputs[:, None]
    elif outputs.ndim == 2 and outputs.shape[1] == 1:
        z = outputs
    else:
        return outputs
    return torch.cat([-0.5 * z, 0.5 * z], dim=1)


def _logits_of(outputs: object) -> torch.Tensor | None:
    """The logits among a model's outputs: the tensor, or the first of a tuple or list
    (an exported program returns its outputs as a tuple); ``None`` otherwise."""
    if isinstance(outputs, (tuple, list)) and outputs:
        outputs = outputs[0]
    return outputs if isinstance(outputs, torch.Tensor) else None


def _with_two_logits(outputs: object) -> object:
    """``outputs`` with their logits (:func:`_logits_of`) as :func:`two_logits`."""
    if isinstance(outputs, torch.Tensor):
        return two_logits(outputs)
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        rest = list(outputs[1:])
        return type(outputs)([two_logits(outputs[0]), *rest])
    return outputs


def two_logits_hook(_module: nn.Module, _inputs: object, outputs: object) -> object:
    """A forward hook that gives a model's one-logit outputs as :func:`two_logits`."""
    return _with_two_logits(outputs)


def view_as_two_logits(model: nn.Module) -> None:
    """Make ``model`` (a working copy: changed in place) return its one-logit outputs as
    :func:`two_logits`, in a way that survives ``copy.deepcopy``.

    A ``torch.fx.GraphModule`` (an exported program as :mod:`spear.files` loads it) gets
    the conversion as a node of its graph, since its deep copies drop forward hooks;
    any other module gets a forward hook (:func:`two_logits_hook`).
    """
    if not isinstance(model, fx.GraphModule):
        model.register_forward_hook(two_logits_hook)
        return
    graph = model.graph
    output = next(node for node in graph.nodes if node.op == "output")
    result = output.args[0]
    with graph.inserting_before(output):
        if isinstance(result, fx.Node):
            output.args = (graph.call_function(two_logits, (result,)),)
        elif isinstance(result, (tuple, list)) and result and isinstance(result[0], fx.Node):
            first = graph.call_function(two_logits, (result[0],))
            output.args = (type(result)([first, *result[1:]]),)
    model.recompile()


def as_two_logits(
    after: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``after`` (pre-activations ``(k, m)`` -> outputs) with its outputs as
    :func:`two_logits`."""

    def two(pre_activations: torch.Tensor) -> torch.Tensor:
        return _with_two_logits(after(pre_activations))  # type: ignore[return-value]

    return two


def one_logit(after: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> bool:
    """Whether the model after a layer of weight ``weight`` ``(m, n)`` gives one output per
    example (``(k,)`` or ``(k, 1)``), probed with two zero pre-activations; ``False`` when
    it does not run on them."""
    probe = torch.zeros(2, weight.shape[0], dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad():
            outputs = after(probe)
    except Exception:  # a model that does not run on the probe: not read as one logit
        return False
    logits = _logits_of(outputs)
    return logits is not None and tuple(logits.shape) in ((2,), (2, 1))
