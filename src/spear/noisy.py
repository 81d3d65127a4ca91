"""Noisy updates (DP-SGD noise): the best estimate the update allows, with error bars.

:func:`approximate_layer` turns the layer's noisy update into a
:class:`~spear.results.LayerReconstruction` of estimates
(:mod:`spear.inversion.approximate`): inputs, gradient columns (from which
:mod:`spear.labels` reads the labels), per-example error bars and a residual check
against the estimated noise. Nothing it returns is verified: verification is for exact
answers only.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from spear.inversion.approximate import ApproximateInversion, approximate_inversion
from spear.noise import NoiseEstimate, augmented, estimate_noise
from spear.results import LayerReconstruction

__all__ = ["approximate_layer", "describe", "noisy_batch_size", "predicted_psnr"]


def predicted_psnr(error_rms: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``(k,)`` PSNR in dB the error bars predict: ``20 log10(data_range / error_rms)``.

    Examples
    --------
    >>> predicted_psnr(torch.tensor([0.01, 0.1])).round().tolist()
    [40.0, 20.0]
    """
    return 20.0 * torch.log10(data_range / error_rms.clamp_min(torch.finfo(torch.float64).tiny))


def approximate_layer(
    exact: LayerReconstruction | None,
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    batch_size: int | None,
    time_budget: float | None = None,
    size_given: bool = True,
) -> LayerReconstruction | None:
    """Estimates of a noisy layer's inputs, as a (never verified) layer result.

    Parameters
    ----------
    exact:
        What the exact pipeline returned for the same update (its examples, if any, are
        extra candidates; its singular values and solver records are kept), or ``None``
        when it did not run (mixed-precision updates).
    weight_grad, bias_grad:
        ``(m, n)`` and ``(m,)`` the layer's noisy update.
    weight, bias:
        ``(m, n)`` and ``(m,)`` the layer's parameters as the server sent them.
    batch_size:
        ``b`` when known (otherwise from the spectrum).
    time_budget:
        Seconds for the search (:func:`~spear.inversion.approximate.approximate_inversion`),
        or ``None`` for no limit.
    size_given:
        False when ``batch_size`` was itself read off the spectrum (the note says so).

    Returns
    -------
    LayerReconstruction or None
        ``.inputs`` ``(b, n)`` float64 estimates, ``.output_grads`` ``(m, b)``,
        ``.error_rms``, ``.noise``, ``.noise_consistent``, ``.residual_ratio``;
        ``verified`` False. ``None`` when no direction stands above the noise.
    """
    found = approximate_inversion(
        weight_grad,
        bias_grad,
        weight,
        bias,
        batch_size=batch_size,
        initial=exact.inputs.to(torch.float64).cpu() if exact is not None and exact.found else None,
        time_budget=time_budget,
    )
    if found is None:
        return None
    if not size_given and found.noise.given:
        found = dataclasses.replace(found, noise=dataclasses.replace(found.noise, given=False))
    k = int(found.inputs.shape[0])
    base = exact if exact is not None else _no_exact_result(weight_grad, found)
    return dataclasses.replace(
        base,
        inputs=found.inputs,
        batch_size=found.noise.batch_size,
        complete=k == found.noise.batch_size,
        verified=False,
        output_grads=found.output_grads,
        rank_gap=1.0 / found.noise.noise_ratio if found.noise.noise_ratio > 0 else math.inf,
        sparsity=(found.output_grads == 0).to(torch.float64).mean(dim=0),
        consistency=None,
        residual=found.residual_ratio,
        precision=found.noise.relative,
        notes=[*base.notes, describe(found)],
        found_by=["approximate"] * k,
        noise=found.noise,
        error_rms=found.error_rms,
        noise_consistent=found.consistent,
        residual_ratio=found.residual_ratio,
        zero_row_sigma=found.zero_row_sigma,
    )


def _no_exact_result(weight_grad: torch.Tensor, found: ApproximateInversion) -> LayerReconstruction:
    """The layer result the exact pipeline would have returned empty-handed."""
    m, n = weight_grad.shape
    return LayerReconstruction(
        inputs=torch.zeros(0, n, dtype=torch.float64),
        batch_size=found.noise.batch_size,
        complete=False,
        verified=False,
        output_grads=torch.zeros(m, 0, dtype=torch.float64),
        singular_values=torch.linalg.svdvals(weight_grad.detach().to(torch.float64)),
        rank_gap=0.0,
        sparsity=torch.zeros(0, dtype=torch.float64),
        consistency=None,
        residual=1.0,
        precision=float(torch.finfo(weight_grad.dtype).eps),
    )


def describe(found: ApproximateInversion) -> str:
    """One note: what was estimated, the error bars, and the residual check."""
    errors = found.error_rms
    zero_rows = (
        f"; the units off for every example give sigma {found.zero_row_sigma:.3g}"
        if found.zero_row_sigma is not None
        else ""
    )
    check = "consistent" if found.consistent else "NOT consistent"
    cut = (
        "; the time budget ran out during the search, so this is the best fit found by then"
        if found.out_of_time
        else ""
    )
    bars = (
        f"predicted RMS error per input coordinate {float(errors.median()):.3g} (median; "
        f"{float(errors.max()):.3g} worst)"
        if bool(torch.isfinite(errors).all())
        else "no error bars (the examples are not clearly above the noise, or the fit "
        "leaves more than noise)"
    )
    return (
        f"{found.noise.describe()} Approximate reconstruction of {errors.numel()} examples "
        f"(pattern-constrained least squares, {found.rounds} rounds{zero_rows}{cut}): {bars}; "
        "the update recomputed from it leaves "
        f"{found.residual_ratio:.3f}x the residual the noise alone leaves ({check} with "
        "the estimated noise). Estimates, not verified."
    )


#: A half-precision update's batch size is read off its spectrum where the ``b``-th singular
#: value stands at least this factor above the bound on the rounding's largest one and the
#: next at most this factor below it (:func:`rounding_batch_size`). Measured (float16 and
#: bfloat16 gradients of ``784 -> 1000``, Fashion-MNIST, b = 8 to 32): the next singular
#: value sits at 0.05 of the bound, the b-th at 1.3 to 108 times it.
ROUNDING_MARGIN = 2.0


def rounding_batch_size(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> int | None:
    """The batch size a half-precision update's spectrum shows above its rounding.

    Rounding to nearest moves each entry by at most half an ulp (``eps / 2`` of it, or
    half the smallest subnormal), so the rounding error ``E`` has
    ``||E||_2 <= ||E||_F <= eps / 2 ||A||_F + sqrt(mn) tiny / 2``, and no singular value
    past the batch size exceeds that bound. The batch size is the count above it, when
    the ``b``-th stands :data:`ROUNDING_MARGIN` times above it and the next as far below;
    ``None`` otherwise (an example too weak to tell from the rounding).

    Parameters
    ----------
    weight_grad, bias_grad:
        ``(m, n)`` and ``(m,)`` (or ``None``) the layer's update, float16 or bfloat16.
    """
    info = torch.finfo(weight_grad.dtype)
    a = augmented(weight_grad, bias_grad)  # (m, n + 1) float64
    tiny = info.smallest_normal * info.eps  # the smallest subnormal
    bound = 0.5 * info.eps * float(a.norm()) + 0.5 * tiny * math.sqrt(a.numel())
    s = torch.linalg.svdvals(a)
    b = int((s > bound).sum())
    if b == 0 or b >= s.numel():
        return None
    if float(s[b - 1]) < ROUNDING_MARGIN * bound or float(s[b]) > bound / ROUNDING_MARGIN:
        return None
    return b


def noisy_batch_size(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> NoiseEstimate:
    """The batch size a noisy update's spectrum shows (:func:`spear.noise.estimate_noise`).

    Parameters
    ----------
    weight_grad, bias_grad:
        ``(m, n)`` and ``(m,)`` (or ``None``) the layer's update.

    Returns
    -------
    NoiseEstimate
        Check ``.confident`` before relying on ``.batch_size``.
    """
    a = augmented(weight_grad, bias_grad)
    return estimate_noise(torch.linalg.svdvals(a), a.shape[0], a.shape[1])
