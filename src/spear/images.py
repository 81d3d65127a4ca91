"""Images from the features entering the attacked layer (conv nets).

When the attacked linear layer sits behind a feature extractor ``h`` (the conv blocks of a
CNN), the layer inversion returns the features ``f_i = h(x_i)``, not the images. This
module searches for images with those features, using everything else the update holds:

* the features, exactly: ``sum_i ||h(x_i) - f_i||^2 / sum_i ||f_i||^2``;
* the extractor's own gradients in the update (the conv layers'): one minus the cosine
  between them and the gradients recomputed from the candidate images and the recovered
  labels (a cosine, so that the loss reduction and a delta's learning rate do not
  matter), weighted by :data:`GRADIENT_WEIGHT`; used only when the batch is complete, since
  missing examples contribute to those gradients too. Each example's loss counts with the
  weight the attacked layer's gradient column gives it (:func:`example_weights`): a copy
  counts as often as it occurs, and an example that DP-SGD clipping scaled down counts as
  little in the recomputed gradients as it does in the update;
* a total-variation prior (natural images are smooth), weighted by :func:`tv_weight`:
  the fewer the equations the nonzero features give per pixel, the more the prior has
  to decide.

The last two terms are used only when the features are fewer than the pixels; otherwise
the features alone may determine the images, and a prior would only bias the fit.

The images are ``low + (high - low) * sigmoid(z)`` when the input range is known, so they
stay in it, and Adam runs on ``z`` for as many steps as the time budget allows (at most
:data:`IMAGE_STEPS`).

Max-pooling and ReLU make ``h`` many-to-one: 400 pooled features of Flower's tutorial CNN
cannot pin down 3072 pixels, and the result is an estimate whose quality
:func:`spear.metrics.psnr` measures against the truth. Where ``h`` is locally invertible (a
conv stack without pooling, or a wide linear+ReLU layer when a deeper layer was attacked,
whose active units outnumber the pixels), the features do
determine the image: the Jacobian of ``h`` at the estimate then has full column rank, and
Gauss-Newton steps on the features alone converge to it; such images are marked
``determined`` (see :class:`ImageReconstruction`).

Behind layers that normalise with the batch's statistics (BatchNorm in training mode)
the features say little about the images, and :func:`images_behind_batch_statistics`
fits the whole batch to the update by gradient matching instead.

Examples
--------
>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> head = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten()).double()
>>> truth = torch.rand(2, 1, 6, 6, dtype=torch.float64)
>>> found = images_from_features(head, head(truth).detach(), (1, 6, 6), input_range=(0, 1),
...                              time_budget=30)
>>> bool(found.determined.all()), float((found.images - truth).abs().max()) < 1e-8
(True, True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from spear.errors import InputError
from spear.linalg import least_squares
from spear.model import batch_statistics_layers

if TYPE_CHECKING:
    from spear.results import Reconstruction

__all__ = [
    "CALIBRATION_STEPS",
    "FEATURE_IMAGE_SHARE",
    "GRADIENT_WEIGHT",
    "IMAGE_LEARNING_RATE",
    "IMAGE_STEPS",
    "JACOBIAN_MAX_ENTRIES",
    "LEAKY_SHARE",
    "LEAKY_START",
    "MISSING_IMAGE_STEPS",
    "MISSING_IMAGE_TV",
    "NEWTON_STEPS",
    "SEARCH_SHARE",
    "START_STEPS",
    "TV_REFERENCE_SHARE",
    "TV_WEIGHT",
    "WEIGHT_MAX_FIT",
    "ZERO_FEATURE_EPS",
    "ImageReconstruction",
    "MissingImages",
    "example_weights",
    "feature_image_share",
    "gradient_term",
    "guess_image_shape",
    "image_shape_for",
    "images_behind_batch_statistics",
    "images_from_features",
    "images_of_missing",
    "leaky_copy",
    "reconstruct_images",
    "tv_weight",
]

#: Weight of ``1 - cos`` between the extractor's observed and recomputed gradients.
GRADIENT_WEIGHT = 0.1
#: Largest relative fit error of a label (``r_i`` against ``(p_i - e_y) / B_i``) at
#: which the divisors ``B_i`` weigh the examples in the gradient term
#: (:func:`example_weights`); beyond it the gradient term takes a plain mean. Exact
#: columns fit to rounding (1e-6 and below); a column 10% off cross-entropy's shape gives
#: its scale to no better than that.
WEIGHT_MAX_FIT = 0.1
#: Weight of the total-variation prior (mean absolute difference of neighbouring pixels)
#: where the nonzero features number :data:`TV_REFERENCE_SHARE` of the pixels; see
#: :func:`tv_weight`.
TV_WEIGHT = 0.3
#: Nonzero features per pixel at which the prior has :data:`TV_WEIGHT`: Flower's CNN
#: (about 230 of 400 pooled features nonzero, for 3072 pixels).
TV_REFERENCE_SHARE = 0.075
#: Most Adam steps of the image search: after :data:`CALIBRATION_STEPS` steps the search
#: plans as many as its time budget allows, up to this (more steps, better images: on
#: Flower's CNN at b = 4, 2000 steps gave a median 14 dB and 8000 steps 18 dB).
IMAGE_STEPS = 20_000
#: Most Adam steps where the features may determine the images: enough to start
#: Gauss-Newton inside the right ReLU patterns.
START_STEPS = 2000
#: Steps timed before the search plans its length (the learning rate follows a cosine
#: from :data:`IMAGE_LEARNING_RATE` to 0 over the planned steps).
CALIBRATION_STEPS = 20
#: Adam's learning rate on the image parameters (``z`` above).
IMAGE_LEARNING_RATE = 0.05
#: Most Gauss-Newton steps on the features for images whose features determine them.
NEWTON_STEPS = 30
#: Slope of the ReLUs' negative side at the start of a search for determined images (it
#: falls linearly to 0 at :data:`LEAKY_SHARE` of the steps): gradients reach units that
#: the start leaves dead.
LEAKY_START = 0.5
#: Share of the steps over which the slope falls to 0.
LEAKY_SHARE = 0.7
#: Share of the time budget for the Adam search where the features may determine the
#: images; the Gauss-Newton polish has the rest (elsewhere the search has it all).
SEARCH_SHARE = 0.75
#: Largest Jacobian (features x pixels, per image) formed explicitly for the rank test and
#: Gauss-Newton; above it the images are not tested for determination.
JACOBIAN_MAX_ENTRIES = 20_000_000
#: A recovered feature within this many rounding units (``eps``) of its example's largest
#: feature counts as a ReLU zero (the layer inversion leaves rounding where zeros were).
ZERO_FEATURE_EPS = 1000.0
#: Bounds of the share of the image budget for the images of the recovered features when
#: some examples' features were not recovered (:func:`feature_image_share`); gradient
#: matching for the missing ones has the rest.
FEATURE_IMAGE_SHARE = (0.2, 0.8)
#: Adam steps (at most, within the time left) of the gradient-matching search for the
#: examples whose features were not recovered: the steps of the reference Inverting
#: Gradients comparison (docs/benchmarks.md).
MISSING_IMAGE_STEPS = 2000
#: Weight of the total-variation prior (mean absolute vertical plus horizontal
#: difference) in that search, against ``1 - cos`` of the gradients: the default of the
#: reference Inverting Gradients implementation (breaching) for the same objective.
#: Measured on the untrained VGG-style CNN at b = 16 (15 examples missing, 60 s): median
#: PSNR 13.3 dB against 8.3 dB with a weight of 1e-4.
MISSING_IMAGE_TV = 0.2
#: Smallest probed side when the image shape is guessed (``guess_image_shape``).
_MIN_SIDE = 4
#: Largest probed side.
_MAX_SIDE = 256


@dataclass
class ImageReconstruction:
    """Images found for the recovered features.

    Attributes
    ----------
    images:
        ``(k, *input_shape)``, one per recovered feature vector, in the features' order.
    feature_residual:
        ``(k,)`` ``||h(x_i) - f_i|| / ||f_i||`` of each image.
    determined:
        ``(k,)`` True where the features determine the image around it: the Jacobian of
        the extractor at the image (its active rows) has full column rank, and Gauss-Newton
        brought the feature residual to rounding level. Such an image is the exact one
        unless another, far away, has the same features.
    steps:
        Adam steps taken.
    seconds:
        Wall time.
    notes:
        Plain-language findings.
    used_gradients:
        Whether the extractor's gradients in the update took part (only where the
        features do not determine the images).
    """

    images: torch.Tensor
    feature_residual: torch.Tensor
    determined: torch.Tensor
    steps: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    used_gradients: bool = False

    @property
    def all_determined(self) -> bool:
        """True when every image is determined by its features."""
        return bool(self.determined.numel() > 0 and self.determined.all())


@dataclass
class GradientTerm:
    """What the extractor's gradients in the update say about the images.

    Attributes
    ----------
    model:
        The whole model (its output for the candidate images gives the loss).
    parameters:
        The extractor's parameters, in the order of ``observed``.
    observed:
        Their entries of the update, flattened and concatenated, signed as a gradient.
    labels:
        ``(k,)`` the recovered labels.
    weights:
        ``(k,)`` each example's weight in the loss (:func:`example_weights`), or ``None``
        for a plain mean.
    """

    model: nn.Module
    parameters: list[torch.Tensor]
    observed: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` between the observed gradients and those of ``images`` ``(k, ...)``."""
        out = self.model(images)
        if self.weights is None:
            ce = nn.functional.cross_entropy(out, self.labels)
        else:
            each = nn.functional.cross_entropy(out, self.labels, reduction="none")
            ce = (self.weights.to(device=each.device, dtype=each.dtype) * each).sum()
        grads = torch.autograd.grad(ce, self.parameters, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return 1.0 - nn.functional.cosine_similarity(flat, self.observed, dim=0)


def example_weights(
    divisors: torch.Tensor, fit_error: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``(k,)`` each example's weight in the update, ``1 / |B_i|`` scaled to mean 1, from
    the per-example divisors ``B_i`` the labels were read with
    (:attr:`spear.labels.LabelResult.divisor`); ``None`` (a plain mean) where a divisor is
    zero, not finite or of the other sign than the rest, since such a divisor was not read
    off a gradient column, or where a label's relative fit error (``fit_error`` ``(k,)``,
    :attr:`spear.labels.LabelResult.fit_error`) exceeds :data:`WEIGHT_MAX_FIT`: such a
    column is not cross-entropy's (another loss, or noise that swamps it), and its scale
    is no weight.

    Under a plain mean every ``B_i = B`` and the weights are all 1; a copy's divisor is
    ``B / 2``, and DP-SGD clipping by a factor ``c_i`` makes it ``B / c_i``. Clipping
    scales an example's whole gradient, the extractor's part included, so these weights
    hold for every layer.

    >>> example_weights(torch.tensor([8.0, 4.0, 8.0, 8.0])).tolist()
    [0.8, 1.6, 0.8, 0.8]
    >>> example_weights(torch.tensor([8.0, -4.0])) is None
    True
    >>> example_weights(torch.tensor([8.0, 4.0]), torch.tensor([1e-7, 0.5])) is None
    True
    """
    d = divisors.to(torch.float64)
    if d.numel() == 0 or not bool(torch.isfinite(d).all()):
        return None
    if fit_error is not None and not bool((fit_error <= WEIGHT_MAX_FIT).all()):
        return None
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        return None
    w = 1.0 / d.abs()
    return w / w.mean()


def gradient_term(
    model: nn.Module,
    head: nn.Module,
    update: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    sign: float,
    weights: torch.Tensor | None = None,
) -> GradientTerm | None:
    """The gradient term for ``head``'s parameters that the update holds, or ``None``.

    ``head``'s parameter names are the model's (``fx`` keeps qualified names); ``sign`` is
    ``+1`` for a gradient, ``-1`` for a FedAvg delta; ``weights`` ``(k,)`` weigh the
    examples' losses (:func:`example_weights`; ``None``: a plain mean).
    """
    own = dict(model.named_parameters())
    names = [n for n, _ in head.named_parameters() if n in update and n in own]
    if not names:
        return None
    observed = torch.cat([update[n].detach().reshape(-1) for n in names]) * sign
    if not bool(torch.isfinite(observed).all()) or float(observed.norm()) == 0.0:
        return None
    dtype = own[names[0]].dtype
    return GradientTerm(model, [own[n] for n in names], observed.to(dtype), labels, weights)


def guess_image_shape(
    head: Callable[[torch.Tensor], torch.Tensor], features: int, channels: int, dtype: torch.dtype
) -> tuple[int, ...] | None:
    """The square image shape ``(channels, s, s)`` for which ``head`` gives ``features``
    values per image (the smallest), or ``None`` when no side from 4 to 256 does, or when
    twice that side does too (adaptive pooling: the features do not tell the size)."""

    def size_at(side: int) -> int | None:
        try:
            # two images: a BatchNorm1d with the batch's statistics refuses one
            return int(head(torch.zeros(2, channels, side, side, dtype=dtype))[0].numel())
        except (RuntimeError, ValueError):
            return None

    with torch.no_grad():
        for side in range(_MIN_SIDE, _MAX_SIDE + 1):
            size = size_at(side)
            if size is None:
                continue
            if size == features:
                # pooling that rounds down gives a run of sides the same count; twice
                # the side gives more, unless the pooling is adaptive
                return None if size_at(2 * side) == features else (channels, side, side)
            if size > features:
                return None
    return None


def _first_weight(head: nn.Module) -> torch.Tensor | None:
    """The first convolution (4-d) or linear (2-d) weight of ``head``, in the order its
    parameters are registered (``nn.Module`` children, or an exported graph's)."""
    for name, parameter in head.named_parameters():
        if name.endswith("weight") and parameter.dim() in (2, 4):
            return parameter
    return None


class _Leaky(nn.Module):
    """A ReLU whose negative side has an adjustable slope (0: the ReLU itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.slope = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` where positive, ``slope * x`` elsewhere."""
        return nn.functional.leaky_relu(x, self.slope) if self.slope > 0 else torch.relu(x)


_RELU_FUNCTIONS = {torch.relu, nn.functional.relu, torch.ops.aten.relu.default}


def leaky_copy(head: nn.Module) -> tuple[nn.Module, list[_Leaky]]:
    """A copy of ``head`` whose ReLUs are :class:`_Leaky` (slope 0: the same function),
    and those units, so that a search can let gradients through dead units first."""
    copy = deepcopy(head)
    units: list[_Leaky] = []
    if isinstance(copy, fx.GraphModule):
        for node in list(copy.graph.nodes):
            relu_module = node.op == "call_module" and isinstance(
                copy.get_submodule(str(node.target)), nn.ReLU
            )
            if relu_module or (node.op == "call_function" and node.target in _RELU_FUNCTIONS):
                unit = _Leaky()
                name = f"spear_leaky_{len(units)}"
                copy.add_module(name, unit)
                node.op, node.target = "call_module", name
                node.args, node.kwargs = node.args[:1], {}
                units.append(unit)
        copy.recompile()
        return copy, units
    for parent in copy.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                unit = _Leaky()
                setattr(parent, name, unit)
                units.append(unit)
    return copy, units


def _nonzero(features: torch.Tensor) -> torch.Tensor:
    """``(k, n)`` True where a recovered feature is not a ReLU zero: above
    :data:`ZERO_FEATURE_EPS` rounding units of its example's largest feature."""
    eps = torch.finfo(features.dtype).eps
    top = features.abs().amax(dim=1, keepdim=True)
    return features.abs() > ZERO_FEATURE_EPS * eps * top


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels of ``x`` ``(k, c, h, w)``."""
    if x.dim() < 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def _to_images(z: torch.Tensor, input_range: tuple[float, float] | None) -> torch.Tensor:
    """The images parametrised by ``z``: boxed into ``input_range`` by a sigmoid."""
    if input_range is None:
        return z
    low, high = input_range
    return low + (high - low) * torch.sigmoid(z)


def tv_weight(active: int, pixels: int) -> float:
    """Weight of the total-variation prior for images whose features have ``active``
    nonzero entries (each an equation) for ``pixels`` unknowns.

    ``TV_WEIGHT * min(1, (TV_REFERENCE_SHARE / share)^2)``, ``share = active / pixels``:
    the more equations, the less the prior has to decide. Measured (float32, 60 s, median
    PSNR): on Flower's CNN (share 0.075) a weight of 0.3 gave 17.6 dB (b = 4) and 19.8 dB
    (b = 8), 0.03 gave 17.4 dB (b = 8); on the VGG-style CNN (about 600 of 1024 features
    nonzero, share 0.195, b = 4) 0.3 gave 16.5 and 15.0 dB (two batches), 0.03 gave
    21.6 dB on the second.

    >>> round(tv_weight(230, 3072), 3), round(tv_weight(600, 3072), 3)
    (0.3, 0.044)
    """
    share = active / max(1, pixels)
    if share <= 0:
        return TV_WEIGHT
    return TV_WEIGHT * min(1.0, (TV_REFERENCE_SHARE / share) ** 2)


def _search(
    head: nn.Module,
    features: torch.Tensor,
    shape: tuple[int, ...],
    term: GradientTerm | None,
    prior: float,
    leaky: bool,
    input_range: tuple[float, float] | None,
    deadline: float,
    steps: int,
    seed: int,
    progress: bool,
) -> tuple[torch.Tensor, int]:
    """Adam on the objective of the module docstring, with total-variation weight
    ``prior``; with ``leaky``, the ReLUs leak at first (:data:`LEAKY_START`);
    ``(images (k, *shape), steps)``."""
    units: list[_Leaky] = []
    if leaky:
        head, units = leaky_copy(head)
    generator = torch.Generator().manual_seed(seed)
    k = features.shape[0]
    start = torch.randn((k, *shape), generator=generator, dtype=features.dtype) * 0.01
    if input_range is None:
        start = start + 0.5 * float(features.abs().mean())
    z = start.to(features.device).requires_grad_(True)
    scale = float((features**2).sum().clamp_min(torch.finfo(features.dtype).tiny))
    optimiser = torch.optim.Adam([z], lr=IMAGE_LEARNING_RATE)
    planned, taken, began = steps, 0, time.perf_counter()
    bar = tqdm(total=steps, desc="images", unit="step", disable=not progress, leave=False)
    try:
        while taken < planned:
            if taken == CALIBRATION_STEPS:  # as many steps as the time left allows
                each = (time.perf_counter() - began) / taken
                left = (deadline - time.perf_counter()) / each  # inf: no deadline
                planned = steps if left >= steps else taken + int(left)
                bar.total = planned
            taken += 1
            done = taken / planned
            optimiser.param_groups[0]["lr"] = (
                IMAGE_LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * done))
            )
            for unit in units:
                unit.slope = max(0.0, LEAKY_START * (1.0 - done / LEAKY_SHARE))
            optimiser.zero_grad()
            x = _to_images(z, input_range)
            loss = ((head(x) - features) ** 2).sum() / scale
            if prior > 0:
                loss = loss + prior * _total_variation(x)
            if term is not None:
                loss = loss + GRADIENT_WEIGHT * term.loss(x)
            loss.backward(inputs=[z])
            optimiser.step()
            bar.update(1)
            if time.perf_counter() > deadline:
                break
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
    return _to_images(z.detach(), input_range), taken


def _jacobian(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(F, P)`` Jacobian of ``head`` at one image ``x`` ``(*shape)``."""

    def flat(v: torch.Tensor) -> torch.Tensor:
        return head(v.reshape(1, *x.shape)).reshape(-1)

    with torch.no_grad():  # torch.func differentiates anyway; nothing tracks the weights
        return torch.func.jacrev(flat)(x.reshape(-1).detach())


def _rank_tolerance(dtype: torch.dtype, size: int) -> float:
    """Relative singular value below which a Jacobian column space counts as lost:
    ``size * eps`` (the rounding of an SVD of that size), at least ``sqrt(eps)`` for
    float32, where the features themselves carry ``eps``-relative rounding."""
    eps = torch.finfo(dtype).eps
    return max(size * eps, math.sqrt(eps) if dtype == torch.float32 else 0.0)


def _newton(
    head: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    input_range: tuple[float, float] | None,
    deadline: float = math.inf,
) -> tuple[torch.Tensor, bool]:
    """Gauss-Newton on ``||h(x) - target||`` for one image; ``(image, determined)``.

    Determined: the Jacobian's active rows have full column rank at every step and the
    residual ends at rounding level (``sqrt(P) * eps`` relative to the features). No step
    starts after ``deadline`` (``time.perf_counter()``); the image reached then is
    returned, determined only where a step has tested the Jacobian's rank and the
    residual is at rounding level.
    """
    eps = torch.finfo(x.dtype).eps
    size = x.numel()
    norm = float(target.norm().clamp_min(torch.finfo(x.dtype).tiny))
    full_rank = False
    for _ in range(NEWTON_STEPS):
        if time.perf_counter() > deadline:
            break
        jac = _jacobian(head, x)
        rows = jac.abs().sum(dim=1) > 0
        active = jac[rows]
        if active.shape[0] < size:
            return x, False
        s = torch.linalg.svdvals(active)
        if float(s[-1]) <= _rank_tolerance(x.dtype, size) * float(s[0]):
            return x, False
        full_rank = True
        with torch.no_grad():
            residual = head(x.reshape(1, *x.shape)).reshape(-1) - target
        if float(residual.norm()) <= math.sqrt(size) * eps * norm:
            break
        step = least_squares(active, residual[rows].unsqueeze(1))
        x = x - step.reshape(x.shape)
    with torch.no_grad():
        residual = head(x.reshape(1, *x.shape)).reshape(-1) - target
    inside = input_range is None or bool(
        ((x >= input_range[0] - eps) & (x <= input_range[1] + eps)).all()
    )
    return x, full_rank and inside and float(residual.norm()) <= 10 * math.sqrt(size) * eps * norm


def feature_image_share(found: int, batch_size: int) -> float:
    """Share of the image budget for the images of ``found`` recovered features in a batch
    of ``batch_size``: their share of the batch, within :data:`FEATURE_IMAGE_SHARE`; the
    rest goes to gradient matching for the missing examples, whose every step costs a
    forward and a double backward pass of the whole batch.

    >>> feature_image_share(2, 16), feature_image_share(8, 16), feature_image_share(15, 16)
    (0.2, 0.5, 0.8)
    """
    low, high = FEATURE_IMAGE_SHARE
    return min(high, max(low, found / max(1, batch_size)))


def images_from_features(
    head: nn.Module,
    features: torch.Tensor,
    input_shape: tuple[int, ...],
    *,
    gradients: GradientTerm | None = None,
    input_range: tuple[float, float] | None = None,
    time_budget: float = 60.0,
    steps: int = IMAGE_STEPS,
    seed: int = 0,
    progress: bool | None = None,
) -> ImageReconstruction:
    """Images whose features under ``head`` are ``features``.

    Parameters
    ----------
    head:
        The feature extractor: ``(k, *input_shape)`` -> ``(k, n)`` (``AttackTarget.before``).
    features:
        ``(k, n)`` the recovered features, in ``head``'s dtype.
    input_shape:
        Shape of one image, e.g. ``(3, 32, 32)``.
    gradients:
        The extractor's gradients in the update (:func:`gradient_term`), used when given.
    input_range:
        ``(low, high)`` of the pixels when known; the images stay inside it.
    time_budget:
        Seconds in all (``math.inf``: ``steps`` alone bound the search). Where the features
        may determine the images, the Adam search takes :data:`SEARCH_SHARE` of them and
        the Gauss-Newton polish the rest.
    steps:
        Most Adam steps.
    seed:
        Seed of the start.
    progress:
        Progress bar; default only on a terminal.

    Returns
    -------
    ImageReconstruction

    Raises
    ------
    InputError
        When ``head`` does not map ``input_shape`` images to ``n`` features.
    """
    start = time.perf_counter()
    dtype = features.dtype
    with torch.no_grad():
        try:
            # two images: a BatchNorm1d with the batch's statistics refuses one
            probe = head(torch.zeros(2, *input_shape, dtype=dtype, device=features.device))[0]
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                f"the layers before the attacked one do not take images of shape "
                f"{input_shape} ({exc}); pass the model's input_shape=."
            ) from exc
    if probe.numel() != features.shape[1]:
        raise InputError(
            f"images of shape {input_shape} give {probe.numel()} features, but the attacked "
            f"layer takes {features.shape[1]}; pass the model's input_shape=."
        )
    show = progress if progress is not None else False
    pixels = math.prod(input_shape)
    # nonzero features that outnumber the pixels may determine them: no prior to bias
    # the fit, and the gradients add nothing (a zero feature only bounds the image)
    active = int(_nonzero(features).sum(dim=1).min())
    underdetermined = active < pixels
    images, taken = _search(
        head,
        features,
        input_shape,
        gradients if underdetermined else None,
        tv_weight(active, pixels) if underdetermined else 0.0,
        not underdetermined,
        input_range,
        start + (1.0 if underdetermined else SEARCH_SHARE) * time_budget,
        steps if underdetermined else min(steps, START_STEPS),
        seed,
        show,
    )
    determined = torch.zeros(features.shape[0], dtype=torch.bool)
    notes: list[str] = []
    if underdetermined:
        notes.append(
            f"the layers before the attacked one map {pixels} input values to as few as "
            f"{active} nonzero features, so the features do not determine the images: "
            "they are estimates (features, "
            + ("the extractor's gradients, " if gradients is not None else "")
            + "a smoothness prior), not exact."
        )
    elif batch_statistics_layers(head):
        notes.append(
            "the layers before the attacked one normalise with the batch's statistics, so "
            "each image's features depend on the whole batch: the images are fitted together "
            "and none is polished or determined alone."
        )
    elif features.shape[1] * pixels <= JACOBIAN_MAX_ENTRIES:
        polished: list[torch.Tensor] = []
        for i in range(features.shape[0]):
            if time.perf_counter() > start + time_budget:
                polished.extend(images[i:])
                notes.append("the time budget ran out before every image was polished.")
                break
            x, ok = _newton(head, images[i], features[i], input_range, start + time_budget)
            polished.append(x)
            determined[i] = ok
        images = torch.stack(polished)
    else:
        notes.append(
            f"the Jacobian of the layers before the attacked one ({features.shape[1]} x "
            f"{pixels}) is too large to test whether the features determine the images."
        )
    with torch.no_grad():
        residual = (head(images) - features).norm(dim=1) / features.norm(dim=1).clamp_min(
            torch.finfo(dtype).tiny
        )
    return ImageReconstruction(
        images=images.detach(),
        feature_residual=residual.detach().cpu(),
        determined=determined,
        steps=taken,
        seconds=time.perf_counter() - start,
        notes=notes,
        used_gradients=underdetermined and gradients is not None,
    )


def image_shape_for(head: nn.Module, features: int, dtype: torch.dtype) -> tuple[int, ...] | None:
    """The shape of one model input that ``head`` maps to ``features`` values: square
    images with the first convolution's channels, or the first linear layer's inputs as
    :func:`spear.model.guess_input_shape` reads them; ``None`` when neither fits."""
    from spear.model import guess_input_shape

    weight = _first_weight(head)
    if weight is None:
        return None
    if weight.dim() == 4:  # (out, in / groups, kh, kw): groups are taken to be 1
        return guess_image_shape(head, features, int(weight.shape[1]), dtype)
    return guess_input_shape(int(weight.shape[1]))


def reconstruct_images(
    model: nn.Module,
    head: nn.Module,
    update: dict[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    update_kind: str,
    complete: bool,
    weights: torch.Tensor | None = None,
    input_shape: tuple[int, ...] | None,
    input_range: tuple[float, float] | None,
    time_budget: float,
    seed: int,
    progress: bool | None,
) -> ImageReconstruction | None:
    """:func:`images_from_features` as :func:`spear.attack` runs it: the image shape given
    or guessed, the extractor's gradients used when the batch is complete and labelled.

    ``features`` ``(k, n)`` are the recovered inputs of the attacked layer and
    ``weights`` ``(k,)`` their weights in the update (:func:`example_weights`; ``None``: a
    plain mean); ``None`` is returned when no input shape fits ``head`` (the reason is not
    an error: the features stand on their own).
    """
    shape = input_shape or image_shape_for(head, features.shape[1], features.dtype)
    if shape is None:
        return None
    term = None
    if complete and labels is not None:
        sign = -1.0 if update_kind == "delta" else 1.0
        term = gradient_term(model, head, update, labels, sign=sign, weights=weights)
    found = images_from_features(
        head,
        features,
        shape,
        gradients=term,
        input_range=input_range,
        time_budget=time_budget,
        seed=seed,
        progress=progress,
    )
    used = "features and the extractor's gradients" if found.used_gradients else "features"
    found.notes.insert(
        0,
        f"images of shape {shape}{'' if input_shape else ' (guessed; pass input_shape=)'} "
        f"rebuilt from the {used} in {found.seconds:.1f} s "
        f"({found.steps} steps): feature residual median "
        f"{float(found.feature_residual.median()):.1e}; "
        f"{int(found.determined.sum())} of {found.determined.numel()} determined by "
        "their features.",
    )
    return found


def _matched(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    batch_size: int,
    input_shape: tuple[int, ...],
    update_kind: str,
    input_range: tuple[float, float] | None,
    time_budget: float,
    seed: int,
    *,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
) -> Reconstruction:
    """``batch_size`` images ``(batch_size, *input_shape)`` fitted to the whole update by
    gradient matching: :func:`spear.baselines.gradient_matching.gradient_matching_attack`
    with :data:`MISSING_IMAGE_STEPS` steps at most, a total-variation weight of
    :data:`MISSING_IMAGE_TV` and the pixels boxed into ``input_range``."""
    from spear.baselines.gradient_matching import gradient_matching_attack

    return gradient_matching_attack(
        model,
        update,
        batch_size=batch_size,
        input_shape=input_shape,
        update_kind=update_kind,
        seed=seed,
        time_budget=time_budget,
        iterations=MISSING_IMAGE_STEPS,
        tv_weight=MISSING_IMAGE_TV,
        box=input_range,
        known=known,
        labels=labels,
    )


@dataclass
class MissingImages:
    """Estimates of the examples whose features were not recovered.

    Attributes
    ----------
    images:
        ``(r, *input_shape)`` gradient-matching estimates, in no particular order.
    labels:
        ``(r,)`` their labels, read off the classifier head's gradient
        (:func:`spear.labels.missing_labels`, or
        :func:`spear.baselines.labels.infer_labels` less the recovered examples' labels).
    notes:
        Plain-language findings.
    """

    images: torch.Tensor
    labels: torch.Tensor
    notes: list[str] = field(default_factory=list)


def images_of_missing(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    known: tuple[torch.Tensor, torch.Tensor] | None,
    missing: int,
    input_shape: tuple[int, ...],
    *,
    update_kind: str,
    input_range: tuple[float, float] | None,
    time_budget: float,
    seed: int,
    labels: torch.Tensor | None = None,
) -> MissingImages | None:
    """Images of the ``missing`` examples whose features the layer inversion did not
    recover, by gradient matching on the whole update (Inverting Gradients, the recipe of
    :func:`spear.baselines.gradient_matching.gradient_matching_attack`, boxed by
    ``input_range``), with the recovered examples' images and labels ``known``
    (``(k, *input_shape)``, ``(k,)``) held fixed in the batch, and ``labels``
    ``(missing,)`` when known (:func:`spear.labels.missing_labels`; else inferred from the
    classifier head's gradient). Estimates only: nothing in the update pins these images
    down the way exact features do. ``None`` when no label can be inferred for them.
    """
    estimate = _matched(
        model, update, missing, input_shape, update_kind, input_range, time_budget, seed,
        known=known, labels=labels,
    )  # fmt: skip
    if estimate.labels is None or estimate.labels.shape[0] != missing:
        return None
    steps = next((n for n in estimate.notes if "Adam steps" in n), "")
    held = known[0].shape[0] if known is not None else 0
    return MissingImages(
        images=estimate.inputs.detach(),
        labels=estimate.labels,
        notes=[
            f"{missing} images of the examples whose features were not recovered estimated by "
            f"gradient matching on the whole update"
            + (f" with the {held} recovered examples held" if held else "")
            + f" ({steps.split(';')[0]}); labels from the classifier head's gradient. "
            "Estimates, not exact."
        ],
    )


def images_behind_batch_statistics(
    model: nn.Module,
    head: nn.Module,
    update: dict[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    input_shape: tuple[int, ...],
    *,
    missing_labels: torch.Tensor | None = None,
    update_kind: str,
    input_range: tuple[float, float] | None,
    time_budget: float,
    seed: int,
) -> tuple[ImageReconstruction, MissingImages | None]:
    """Images of a batch behind layers that normalise with the batch's statistics
    (BatchNorm in training mode before the attacked layer), by gradient matching of the
    whole batch.

    Behind such layers each image's features depend on the whole batch, and a search on
    the features finds little of the images' structure (docs/algorithm.md, "Images from
    features"); the gradients of the first layers, which gradient matching fits, carry
    more of it. The batch holds the ``k`` recovered examples, ``counts`` ``(k,)`` times
    each, with ``labels`` ``(k,)``, and the examples whose features were not recovered,
    with ``missing_labels`` ``(r,)``. Gradient matching (the recipe of
    :func:`images_of_missing`) fits the whole batch with those labels held; each
    recovered feature vector ``features`` ``(k, n)`` is then given the image of its label
    whose features under ``head`` (with the fitted batch's statistics) are nearest
    (:func:`scipy.optimize.linear_sum_assignment`), the images of a duplicate's other
    copies are dropped, and the rest are the missing examples' estimates.

    Returns
    -------
    tuple
        The recovered features' images, in their order, and the missing examples'
        (``None`` when none are missing).
    """
    from spear.fallback import label_assignment

    start = time.perf_counter()
    extra = missing_labels.cpu() if missing_labels is not None else labels.new_zeros(0).cpu()
    batch_labels = torch.cat([torch.repeat_interleave(labels.cpu(), counts.cpu()), extra])
    estimate = _matched(
        model, update, int(batch_labels.shape[0]), input_shape, update_kind, input_range,
        time_budget, seed, labels=batch_labels,
    )  # fmt: skip
    images = estimate.inputs.detach().to(features.dtype).to(features.device)
    with torch.no_grad():  # on a copy: training mode moves the running statistics
        found = deepcopy(head)(images).reshape(images.shape[0], -1)
    norms = features.norm(dim=1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)
    residual = (torch.cdist(features, found) / norms).to(torch.float64).cpu()
    order = label_assignment(residual, labels, batch_labels)  # images keep their labels
    paired = residual[torch.arange(features.shape[0]), order]
    steps = next((n for n in estimate.notes if "Adam steps" in n), "")
    taken = int(steps.split()[0]) if steps else 0
    rebuilt = ImageReconstruction(
        images=images[order],
        feature_residual=paired,
        determined=torch.zeros(features.shape[0], dtype=torch.bool),
        steps=taken,
        seconds=time.perf_counter() - start,
        notes=[
            f"the layers before the attacked one normalise with the batch's statistics: the "
            f"batch's {batch_labels.shape[0]} images were fitted to the whole update by "
            f"gradient matching ({taken} Adam steps, the labels held) and each recovered "
            "feature vector paired with the image of its label whose features are nearest "
            f"(feature residual median {float(paired.median()):.1e}). "
            "Estimates, not exact: a BatchNorm right after the first layer leaves the "
            "batch's contrast and each input channel's offset out of the update."
        ],
        used_gradients=True,
    )
    if not extra.shape[0]:
        return rebuilt, None
    spare = torch.ones(batch_labels.shape[0], dtype=torch.bool)
    spare[order] = False
    chosen = [
        int(i)
        for label in extra.unique()
        for i in torch.nonzero(spare & (batch_labels == label)).flatten()[
            : int((extra == label).sum())
        ]
    ]
    return rebuilt, MissingImages(
        images=images[chosen],
        labels=batch_labels[chosen],
        notes=[
            f"{extra.shape[0]} images of the examples whose features were not recovered "
            "come from the same fit of the whole batch. Estimates, not exact."
        ],
    )
