"""The noise an update carries, estimated from the update itself.

DP-SGD adds independent Gaussian noise of one standard deviation to every entry of the
update (Opacus: ``noise_multiplier * max_grad_norm / b``). The weight gradient of a
linear layer followed by ReLU is ``dW = G X^T`` of rank ``b`` plus that noise ``N``; the
bias gradient is ``db = G 1`` plus noise of the same size. On the augmented matrix
``A = [dW | db]`` (``m x (n + 1)``, rank ``b`` without noise):

* the singular values past ``b`` are noise alone. Their energy is that of ``N`` outside
  the rank-``b`` subspaces, ``sigma^2 (m - b) (n + 1 - b)`` on average, which gives
  ``sigma`` (:func:`spectrum_sigma`);
* a pure-noise ``m x (n + 1)`` matrix has singular values up to about
  ``sigma (sqrt(m) + sqrt(n + 1))`` (the Marchenko-Pastur edge); the batch size is the
  number of singular values clearly above that edge (:func:`estimate_noise`);
* rows of units that ReLU turns off for every example carry noise alone: the spread of
  their entries is a second estimate of ``sigma``, independent of the spectrum
  (:func:`zero_row_sigma`, once the examples, hence the patterns, are estimated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "BATCH_SIZE_MARGIN",
    "NoiseEstimate",
    "augmented",
    "estimate_noise",
    "noise_edge",
    "spectrum_sigma",
    "zero_row_sigma",
]

#: A singular value counts as an example's direction when it exceeds the noise edge by
#: this factor. Finite pure-noise matrices exceed the asymptotic edge by a relative
#: ``O((m n)^(-1/3))`` (Tracy-Widom), well below 1% at the sizes attacked here.
BATCH_SIZE_MARGIN = 1.05
#: The batch size is stated with confidence when the weakest example's singular value
#: exceeds the noise edge by this factor and the strongest noise value stays below
#: :data:`BATCH_SIZE_MARGIN` times it.
CONFIDENT_MARGIN = 1.5
#: Fixed-point iterations of the joint (batch size, sigma) estimate; it settles in a few.
MAX_NOISE_ITERATIONS = 50


@dataclass(frozen=True)
class NoiseEstimate:
    """The noise of an update and the batch size read off the same spectrum.

    Attributes
    ----------
    sigma:
        Standard deviation of the noise per entry of the update, in the update's units
        (from the spectrum, :func:`spectrum_sigma`).
    batch_size:
        ``b``: the given batch size, or the number of singular values above the noise
        edge.
    given:
        True when the caller gave ``batch_size``.
    edge:
        ``sigma (sqrt(m) + sqrt(n + 1))``: the largest singular value noise alone makes.
    signal_margin:
        ``s_b / edge``: how far the weakest example's direction stands above the noise
        (below 1: that example is buried in noise).
    noise_ratio:
        ``s_{b+1} / s_b`` of the augmented update (0 when nothing is past ``b``).
    confident:
        The batch size is clear: ``signal_margin >= CONFIDENT_MARGIN`` and
        ``s_{b+1} <= BATCH_SIZE_MARGIN * edge``; for a given batch size
        ``s_b >= CONFIDENT_MARGIN * s_{b+1}`` also does (noise that is not identically
        distributed, such as a float16 update's rounding, spreads past the edge).
    relative:
        ``sigma * sqrt(m (n + 1)) / ||A||_F``: the noise's share of the update's norm.
    """

    sigma: float
    batch_size: int
    given: bool
    edge: float
    signal_margin: float
    noise_ratio: float
    confident: bool
    relative: float

    def describe(self) -> str:
        """One plain-language line for a result's notes."""
        how = "given" if self.given else "from the spectrum"
        sure = "clear" if self.confident else "uncertain"
        return (
            f"noise estimated from the update: sigma {self.sigma:.3g} per entry "
            f"({self.relative:.2%} of the update's norm); batch size {self.batch_size} "
            f"({how}; {sure}: the weakest example stands {self.signal_margin:.3g}x above "
            f"the noise edge, s_(b+1)/s_b = {self.noise_ratio:.3g})."
        )


def augmented(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """``[dW | db]`` ``(m, n + 1)`` float64 (``dW`` alone, ``(m, n)``, without a bias)."""
    dw = weight_grad.detach().to(torch.float64)
    if bias_grad is None:
        return dw
    return torch.cat([dw, bias_grad.detach().to(torch.float64)[:, None]], dim=1)


def noise_edge(sigma: float, m: int, n: int) -> float:
    """Largest singular value of an ``m x n`` matrix of noise of std ``sigma``."""
    return sigma * (math.sqrt(m) + math.sqrt(n))


def spectrum_sigma(singular_values: torch.Tensor, rank: int, m: int, n: int) -> float:
    """Noise std per entry from the energy past ``rank``: ``sum s_k^2 / ((m-b)(n-b))``.

    Parameters
    ----------
    singular_values:
        ``(min(m, n),)`` descending, of an ``m x n`` matrix.
    rank:
        ``b``.

    Returns
    -------
    float
        0 when nothing lies past the rank.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> noise = 0.01 * torch.randn(400, 300, generator=g, dtype=torch.float64)
    >>> s = torch.linalg.svdvals(noise)
    >>> round(spectrum_sigma(s, 0, 400, 300), 3)
    0.01
    """
    dof = (m - rank) * (n - rank)
    if rank >= singular_values.numel() or dof <= 0:
        return 0.0
    tail = singular_values[rank:].to(torch.float64)
    return math.sqrt(float((tail * tail).sum()) / dof)


def estimate_noise(
    singular_values: torch.Tensor, m: int, n: int, batch_size: int | None = None
) -> NoiseEstimate:
    """Noise std and batch size from the singular values of an ``m x n`` update.

    With ``batch_size`` given, sigma comes from the values past it. Otherwise ``b`` and
    sigma are fixed together: ``b`` is the number of values above
    ``BATCH_SIZE_MARGIN * edge(sigma)`` and sigma the energy past ``b``, iterated from
    ``b = 0`` until ``b`` stops changing.

    Parameters
    ----------
    singular_values:
        ``(min(m, n),)`` descending.
    m, n:
        The matrix's shape (``n`` counts the bias column when it is included).
    batch_size:
        ``b`` when known.

    Returns
    -------
    NoiseEstimate
    """
    s = singular_values.to(torch.float64)
    total = float((s * s).sum())
    if batch_size is not None:
        b = int(batch_size)
    else:
        b = 0
        for _ in range(MAX_NOISE_ITERATIONS):
            sigma = spectrum_sigma(s, b, m, n)
            edge = noise_edge(sigma, m, n)
            found = int((s > BATCH_SIZE_MARGIN * edge).sum())
            found = min(found, s.numel() - 1)
            if found == b:
                break
            b = found
    sigma = spectrum_sigma(s, b, m, n)
    edge = noise_edge(sigma, m, n)
    weakest = float(s[b - 1]) if 0 < b <= s.numel() else 0.0
    following = float(s[b]) if b < s.numel() else 0.0
    margin = weakest / edge if edge > 0 else math.inf
    clear_tail = following <= BATCH_SIZE_MARGIN * edge
    if batch_size is not None:
        # noise that is not identically distributed (rounding of a float16 update scales
        # with each entry) spreads past the edge; a given batch size then needs a gap
        clear_tail = clear_tail or weakest >= CONFIDENT_MARGIN * following
    return NoiseEstimate(
        sigma=sigma,
        batch_size=b,
        given=batch_size is not None,
        edge=edge,
        signal_margin=margin,
        noise_ratio=following / weakest if weakest > 0 else math.inf,
        confident=margin >= CONFIDENT_MARGIN and clear_tail,
        relative=sigma * math.sqrt(m * n) / math.sqrt(total) if total > 0 else 0.0,
    )


def zero_row_sigma(update: torch.Tensor, dead_rows: torch.Tensor) -> float | None:
    """Noise std from the rows ReLU makes zero for every example: their RMS entry.

    Parameters
    ----------
    update:
        ``(m, k)`` the (augmented) update.
    dead_rows:
        ``(m,)`` bool: units off for every example.

    Returns
    -------
    float or None
        ``None`` when no row is dead.
    """
    rows = update[dead_rows]
    if rows.numel() == 0:
        return None
    return float(rows.pow(2).mean().sqrt())
