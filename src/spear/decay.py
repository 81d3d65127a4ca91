"""Weight decay: an update that is a low-rank gradient plus a multiple of the sent weights.

An L2 penalty ``lam/2 ||W||^2`` in the loss, or an optimiser's ``weight_decay``, adds
``lam W`` to every weight's gradient, so a FedSGD update of the attacked layer is
``dW = G X^T + lam W``: full rank, although its first term has the batch's rank. FedAvg
with weight decay (and momentum, or any optimiser linear in the gradients) moves the
first layer's weights to ``a W + (terms in the row space of X)`` for a scalar ``a``, so
its delta is ``G~ X^T + mu W`` with ``mu = a - 1``. The server knows ``W``. The ``mu``
that leaves ``dW - mu W`` of low rank is where the nuclear norm of ``dW - mu W``, a convex
function of ``mu``, has its kink (away from it the full-rank ``W`` adds to every singular
value): a golden-section search finds it to rounding. Measured (``784 -> 256`` and
``784 -> 1000``, b = 16, float64 and float32): ``mu`` to 8 digits in float32 and 13 in
float64, after which the update shows rank 16 with roundoff after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DECAY_SKETCH", "DECAY_STEPS", "Decay", "find_decay", "without_decay"]

#: Both sides of the update are sketched to at most this many dimensions for the search
#: (a batch of fewer examples keeps its kink in the sketch; one SVD of the sketch takes
#: about 10 ms, and the search about 90).
DECAY_SKETCH = 256
#: Golden-section steps: the bracket shrinks by ``0.618`` each, from twice
#: ``||dW|| / ||W||`` to about ``1e-19`` of it.
DECAY_STEPS = 90


@dataclass(frozen=True)
class Decay:
    """The multiple of the sent parameters an update holds.

    Attributes
    ----------
    weights:
        ``mu`` of every weight (parameters of two or more dimensions).
    biases:
        ``mu`` of every bias (one dimension): ``weights`` when the attacked layer's bias
        gradient shows the same decay, else 0 (biases left out of the decay).
    rank:
        The rank the attacked layer's update shows without it.
    """

    weights: float
    biases: float
    rank: int


def find_decay(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    min_gap: float,
    seed: int = 0,
) -> Decay | None:
    """The decay that leaves ``weight_grad - mu * weight`` ``(m, n)`` with a clear rank gap
    (``s_r / s_{r+1} >= min_gap`` with ``r < min(m, n)``), or ``None`` when none does.

    ``bias_grad`` and ``bias`` ``(m,)`` decide whether biases decay too: the bias
    gradient of a gradient (or delta) lies in the column space of the low-rank part.
    """
    from spear.linalg import estimate_rank

    grad = weight_grad.detach().to(torch.float64)
    sent = weight.detach().to(grad.device, torch.float64)
    eps = float(torch.finfo(weight_grad.dtype).eps)
    scale = float(sent.norm())
    if scale == 0.0 or not math.isfinite(scale):
        return None
    mu = _kink(grad, sent, seed)
    left, s, _ = torch.linalg.svd(grad - mu * sent, full_matrices=False)
    rank, gap = estimate_rank(s, eps)
    if not (0 < rank < min(grad.shape) and gap >= min_gap):
        return None
    return Decay(mu, _bias_decay(bias_grad, bias, left[:, :rank], mu), rank)


def without_decay(
    update: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: Decay
) -> dict[str, torch.Tensor]:
    """``update`` with ``decay`` times each sent parameter in ``params`` taken out (weights
    by :attr:`Decay.weights`, biases by :attr:`Decay.biases`); other entries unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, value in update.items():
        param = params.get(name)
        if param is None or param.shape != value.shape:
            out[name] = value
            continue
        mu = decay.weights if param.dim() >= 2 else decay.biases
        out[name] = value - mu * param.detach().to(value.device, value.dtype)
    return out


def _kink(grad: torch.Tensor, sent: torch.Tensor, seed: int) -> float:
    """The ``mu`` minimising the nuclear norm of ``grad - mu * sent`` (both ``(m, n)``),
    on sketches of both sides (:data:`DECAY_SKETCH`), by golden section."""
    m, n = grad.shape
    k = min(m, n, DECAY_SKETCH)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    left = torch.randn(k, m, generator=gen, dtype=torch.float64).to(grad.device) / math.sqrt(k)
    right = torch.randn(n, k, generator=gen, dtype=torch.float64).to(grad.device) / math.sqrt(k)
    a, b = left @ grad @ right, left @ sent @ right

    def nuclear(mu: float) -> float:
        return float(torch.linalg.svdvals(a - mu * b).sum())

    reach = 2.0 * float(grad.norm()) / float(sent.norm())
    lo, hi = -reach, reach
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = nuclear(x1), nuclear(x2)
    for _ in range(DECAY_STEPS):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - ratio * (hi - lo)
            f1 = nuclear(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + ratio * (hi - lo)
            f2 = nuclear(x2)
    return (lo + hi) / 2.0


def _bias_decay(
    bias_grad: torch.Tensor | None, bias: torch.Tensor | None, basis: torch.Tensor, mu: float
) -> float:
    """``mu`` when ``bias_grad - mu * bias`` lies nearer the column space ``basis``
    ``(m, r)`` than ``bias_grad`` itself, else 0."""
    if bias_grad is None or bias is None:
        return 0.0
    db = bias_grad.detach().to(basis.device, torch.float64)
    c = bias.detach().to(basis.device, torch.float64)

    def off(v: torch.Tensor) -> float:
        return float((v - basis @ (basis.T @ v)).norm()) / max(float(v.norm()), 1e-300)

    return mu if off(db - mu * c) < off(db) else 0.0
