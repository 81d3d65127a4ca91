"""``spear.attack``: from the model the server sent and a client's update to its batch.

Flow: find the attackable layer (:mod:`spear.model`), invert it (:mod:`spear.layer`),
recover the labels (:mod:`spear.labels`) and certify the result
(:mod:`spear.certificate`). The truth is never seen here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from spear import validate
from spear.binary import Loss, as_two_logits, check_loss, one_logit, view_as_two_logits
from spear.certificate import certify, verified_threshold
from spear.decay import find_decay, without_decay
from spear.dropout import (
    DirectDropout,
    direct_dropout,
    dropout_scales,
    masks_applied,
    refined_scales,
)
from spear.errors import BatchTooLargeError, InputError, NotAttackableError
from spear.fallback import Estimate, best_noisy_estimate
from spear.images import (
    ImageReconstruction,
    MissingImages,
    example_weights,
    feature_image_share,
    image_shape_for,
    images_behind_batch_statistics,
    images_of_missing,
    reconstruct_images,
)
from spear.inversion.identifiability import near_full_rank_note
from spear.inversion.problem import HALF_PRECISIONS
from spear.inversion.result import DROPOUT_UNVERIFIED, PARTIAL_RECOVERY
from spear.labels import LabelResult, label_fit_tol, missing_labels, recover_labels
from spear.layer import MIN_RANK_GAP, invert_layer
from spear.linalg import estimate_rank, gap_at, rounding_rank
from spear.model import (
    AttackTarget,
    batch_statistics_layers,
    check_batch_norm,
    check_dropout,
    dropout_layers_after,
    dropout_layers_before,
    find_target,
    guess_input_shape,
    parameter_dtype,
)
from spear.noisy import approximate_layer, noisy_batch_size, rounding_batch_size
from spear.results import LayerReconstruction, Reconstruction
from spear.update import (
    UpdateKind,
    check_update,
    check_update_kind,
    float32_in_float64,
    without_buffers,
)
from spear.verify import exact_precision

__all__ = ["attack"]

#: Seconds the exact pipeline gets on an update whose spectrum shows no rank gap at the
#: given batch size (noise: it finds no exact zeros, and the approximate path follows).
NOISY_EXACT_SECONDS = 2.0
#: Share of ``time_budget`` (counted from the start of the attack) after which the
#: approximate path of a noisy update stops its search; the rest is for the
#: gradient-matching estimates that run where its answer is not reliable.
APPROXIMATE_SHARE = 0.75
#: Share of ``time_budget`` the first search gets when a Dropout follows the attacked
#: layer: one reading of the update (computed with the Dropout active, :mod:`spear.dropout`,
#: or not) first, and where it leaves examples out, the other with the rest.
DROPOUT_FIRST_SHARE = 0.5
#: Models with at most this many outputs give each example's output gradient one
#: dimension (one logit; two classes under softmax, where ``p - e_0`` and ``p - e_1`` are
#: parallel), and an incomplete result on them says why (:func:`_narrow_head_note`).
NARROW_HEAD_OUTPUTS = 2
#: Fewest singular values past a batch size read off the spectrum of an update with no
#: exact rank gap: a "noise band" of one value (the batch read as one less than the
#: layer's live units) is what a batch as large as the layer is wide leaves as well
#: (``b = 16`` through ``784 -> 8``: all 8 values clear of rounding), and is no noise.
MIN_NOISE_BAND = 2


def attack(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    update_kind: str = "gradient",
    batch_size: int | None = None,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    solver: str = "auto",
    time_budget: float = 120.0,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    input_range: tuple[float, float] | None = None,
    layer: str | None = None,
    image_budget: float = 60.0,
    loss: str = "auto",
) -> Reconstruction:
    """Rebuild a client's batch (inputs and labels) from its update.

    Parameters
    ----------
    model:
        The ``nn.Module`` exactly as the server sent it; never modified.
    update:
        What the client returned: parameter name -> tensor, keyed like
        ``model.named_parameters()``. Entries named after the model's buffers (a
        state-dict difference holds BatchNorm running statistics) are left out, with a
        note.
    update_kind:
        ``"gradient"`` (FedSGD, any loss reduction, clipping allowed) or ``"delta"``
        (FedAvg: weights after local training minus weights sent; learning rate and step
        count unknown).
    batch_size:
        The number of distinct examples, when known; otherwise read off the update.
    seed:
        Seed of every random choice: on one machine the same update, seed, budget and
        thread count give the same result, unless a step stops on its share of the
        wall-clock ``time_budget`` at another point.
    input_shape:
        Shape of one model input, e.g. ``(1, 28, 28)``. By default guessed from the
        attacked layer's width when the model only flattens before it (``784`` ->
        ``(1, 28, 28)``, ``3072`` -> ``(3, 32, 32)``); see ``.notes``.
    solver:
        ``"auto"`` or a name from :func:`spear.solvers.available`.
    time_budget:
        Seconds for the layer inversion; partial results are returned when it runs out.
        For a noisy update the approximate search stops at :data:`APPROXIMATE_SHARE` of it
        (after its first round) and the gradient-matching estimates get the rest.
    progress:
        Progress bar; default only on a terminal.
    device:
        Where the linear algebra runs (``"cuda"`` when available).
    input_range:
        ``(low, high)`` of the model's inputs when known (``(0, 1)`` for pixels): the
        estimates returned for a noisy update are clipped into it, and the
        gradient-matching fallback is boxed by it.
    layer:
        Name of the linear layer to attack (followed by a ReLU), e.g. ``"fc2"``: then
        ``.inputs`` are the features entering it. Default: the first such layer.
    image_budget:
        Seconds for rebuilding model inputs from the features when ``.inputs`` are
        features (a layer behind convolutions, or a deeper layer): ``.images``; ``0``
        skips it. See :mod:`spear.images`.
    loss:
        The client's loss: ``"auto"`` (softmax cross-entropy, or on a model with one
        output per example binary cross-entropy on that logit, ``BCEWithLogitsLoss``),
        ``"cross_entropy"`` or ``"binary_cross_entropy"``. Binary labels come back as 0
        and 1 (:mod:`spear.binary`).

    Returns
    -------
    Reconstruction
        ``.inputs`` ``(k, *input_shape)``, ``.labels`` ``(k,)`` or ``None``,
        ``.certificate``, ``.verified``, ``.batch_size``, ``.notes``.

    Raises
    ------
    InputError
        The update does not fit the model; ``update_kind`` is unknown; ``batch_size`` is
        not a positive integer; ``time_budget`` is not a finite number of seconds above 0;
        ``device`` is unknown or not available (``"cuda"`` on a CPU-only torch build);
        ``seed`` is not an integer from 0 to ``2**63 - 1``; ``input_range`` is not finite
        ``(low, high)`` with ``low < high``; ``input_shape`` is not positive integers or
        does not hold the first layer's features; ``loss`` is unknown, or
        ``"binary_cross_entropy"`` for a model with more than one output. An update entry
        of another dtype than float16, bfloat16, float32 or float64, or with NaN or
        infinite values, is named.
    NotAttackableError
        No linear layer followed by a ReLU (or ``layer`` is not one), a BatchNorm
        that normalises with the batch's own statistics after the attacked layer's input,
        or a Dropout that drops units (both: training mode; pass ``model.eval()``). A
        BatchNorm in training mode before the attacked layer is accepted, with a note.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, found {type(model).__name__}.")
    update, buffers = without_buffers(model, update)
    check_update(model, update)
    update = {name: tensor.detach() for name, tensor in update.items()}
    kind = check_update_kind(update_kind)
    validate.batch_size(batch_size)
    validate.time_budget(time_budget)
    if image_budget != 0:
        validate.time_budget(image_budget, "image_budget")
    validate.device(device)
    validate.seed(seed)
    input_range = validate.input_range(input_range)
    input_shape = validate.input_shape(input_shape)
    loss_kind = check_loss(loss)
    check_dropout(model)
    work = copy.deepcopy(model)
    try:
        target = find_target(work, layer)
    except NotAttackableError:
        check_batch_norm(work)  # a BatchNorm that mixes the batch is the first reason
        raise
    batch_statistics = check_batch_norm(work, target)
    _check_input_shape(input_shape, target)
    notes: list[str] = []
    binary = _binary(loss_kind, target)
    if binary:
        # BCE on one logit is softmax cross-entropy on (-z/2, z/2): read the model so
        target = dataclasses.replace(
            target, after=as_two_logits(target.after) if target.after is not None else None
        )
        view_as_two_logits(work)
        notes.append(
            "the model has one output per example: read as the logit of binary "
            "cross-entropy (BCEWithLogitsLoss), which is softmax cross-entropy on the two "
            "logits (-z/2, z/2); labels are 0 and 1. Pass loss='cross_entropy' otherwise."
        )
    if buffers:
        notes.append(_buffers_note(buffers))
    if batch_statistics:
        notes.append(_batch_statistics_note(batch_statistics, target.name))
    if float32_in_float64(update):
        update = {name: tensor.to(torch.float32) for name, tensor in update.items()}
        notes.append(
            "every entry of the float64 update is a float32 number (computed in float32, "
            "then cast): it is read at float32's precision."
        )
    if len(target.examined) > 1:
        notes.append("layers examined: " + "; ".join(target.examined))
    direct = direct_dropout(work, target) if target.bias is not None else None
    bias_key = target.bias_key
    update = _decay_removed(update, work, target, target.weight_key, bias_key, seed, notes)
    weight_grad = update[target.weight_key]
    bias_grad = update.get(bias_key) if bias_key is not None else None
    if target.bias is None:
        notes.append(
            f"layer {target.name!r} has no bias: examples come out only up to a scale each, "
            "and labels and the certificate are not available."
        )

    # with a Dropout right after the layer's ReLU, the update may have been computed with
    # it active or not: a model input's examples are searched for first as if it was (the
    # certificate then tells), a deeper layer's as if not (the model after the layer helps
    # there); the other reading gets the rest of the budget where examples are left out.
    # A Dropout further on leaves the layer's zero patterns exact but not the model after
    # it: the second search goes without that model.
    dropout_first = direct is not None and target.first
    # (a delta's search never uses the model after the layer: nothing to search again)
    deeper = direct is None and kind == "gradient" and bool(dropout_layers_after(work, target))

    def invert(
        size: int | None,
        dropout: bool = dropout_first,
        budget: float | None = None,
        use_after: bool = True,
    ) -> LayerReconstruction:
        if budget is None:
            split = direct is not None or deeper
            budget = time_budget * (DROPOUT_FIRST_SHARE if split else 1.0)
        if size is not None and _rank_gap(weight_grad, size) < MIN_RANK_GAP:
            budget = min(time_budget, NOISY_EXACT_SECONDS)
            dropout = False
        return invert_layer(
            weight_grad,
            bias_grad,
            weight=target.weight.detach(),
            bias=target.bias.detach() if target.bias is not None else None,
            batch_size=size,
            seed=seed,
            solver=solver,
            update_kind=kind,
            time_budget=budget,
            progress=progress,
            device=device,
            after=target.after if kind == "gradient" and use_after else None,
            dropout=dropout,
            dropout_p=direct.p if direct is not None else None,
        )

    half = (
        weight_grad.dtype in HALF_PRECISIONS and bias_grad is not None and target.bias is not None
    )
    size_read = False  # the batch size read off a noisy update's spectrum
    try:
        result = (
            _mixed_precision(
                weight_grad,
                bias_grad,
                target,
                batch_size,
                notes,
                _seconds_left(start, APPROXIMATE_SHARE * time_budget),
            )
            if half and bias_grad is not None
            else invert(batch_size)
        )
    except BatchTooLargeError:
        spectrum = noisy_batch_size(weight_grad, bias_grad)
        live = int((weight_grad != 0).any(dim=1).sum())
        # a rank of at least the live units is no batch: the update's rows bound it
        # (exactly zero rows, units off for every example, hold no noise either), and
        # the noise needs a band of values past the batch to show as noise
        values = min(live, weight_grad.shape[1] + (bias_grad is not None))
        readable = spectrum.confident and 1 <= spectrum.batch_size <= values - MIN_NOISE_BAND
        if batch_size is not None or not readable:
            raise
        batch_size, size_read = spectrum.batch_size, True
        notes.append(
            f"no exact rank gap: the update looks noisy; batch size {batch_size} read off "
            "the spectrum above the noise edge."
        )
        full = near_full_rank_note(batch_size, live)
        if full is not None:
            notes.append(full)
        result = invert(batch_size)
    exact_gap = batch_size is None or result.rank_gap >= MIN_RANK_GAP
    if (direct is not None or deeper) and not half and exact_gap and _incomplete(result):
        second = invert(
            batch_size,
            dropout=direct is not None and not result.dropout,
            budget=max(_seconds_left(start, time_budget), 1.0),
            use_after=not deeper,
        )
        if second.found > result.found or (second.complete and not result.complete):
            result = second
            if deeper:
                notes.append(
                    "examples found without the model after the layer: a Dropout further on "
                    "may have masked the client's pass through it at random, which this "
                    "model (in eval mode) does not reproduce, so the labels read with it are "
                    "best estimates and the update recomputed with it does not fit."
                )
    # the layer's note on a result solved for an active Dropout is replaced by what the
    # masks read off it say (below)
    notes.extend(n for n in result.notes if n != DROPOUT_UNVERIFIED)
    narrow = None if result.complete or result.interrupted else _narrow_head_note(target, binary)
    if narrow is not None:
        notes.append(narrow)
    dropouts = [] if result.complete else dropout_layers_after(work, target)
    if dropouts:
        notes.append(
            f"{', '.join(dropouts)} after the attacked layer: if the client trained with "
            "dropout active, each example's gradient at the layer carries a random mask. "
            "spear reads the masks of a Dropout right after the layer's ReLU off the "
            "update; the masks of a Dropout further on are not in it, and this model (in "
            "eval mode) does not reproduce them, so true examples fail its checks. An update "
            "computed in eval mode (dropout off) is attacked exactly."
        )
    # input_range bounds model inputs, not the features a layer behind others takes
    clip = half and target.first
    features = _clipped(result.inputs.cpu(), input_range) if clip else result.inputs.cpu()
    if half:
        batch_size = result.batch_size
    if target.first:
        shape = input_shape or target.input_shape or _guessed_shape(work, target.in_features)
        if input_shape is None and target.input_shape is None and len(shape) > 1:
            notes.append(
                f"input shape guessed as {shape} from the {target.in_features} features the "
                "first layer takes; pass input_shape= to override."
            )
        inputs = features.reshape(features.shape[0], *shape)
    else:
        inputs = features
        if layer is not None:
            why = " as asked"
        elif len(target.examined) > 1:
            why = " (the first layer could not be)"
        else:
            why = (
                " (the first linear layer, but the model's inputs reach it through other "
                "operations)"
            )
        notes.append(
            f"layer {target.name!r} was attacked{why}, so .inputs are the features entering "
            "it, not model inputs."
        )
        masked_before = dropout_layers_before(work, target)
        if masked_before:
            notes.append(_dropout_before_note(masked_before))
    dtype = target.weight.dtype
    if not half and torch.finfo(weight_grad.dtype).eps > torch.finfo(dtype).eps:
        # a float64 model whose client sent float32: the update's rounding bounds the fit
        dtype = weight_grad.dtype
    # a mixed-precision update is compared with the model's own dtype
    observed = {name: t.to(dtype) for name, t in update.items()} if half else update
    labels: torch.Tensor | None = None
    certificate: float | None = None
    noisy = half or (batch_size is not None and result.rank_gap < MIN_RANK_GAP)
    source = "approximate" if half else "exact"
    if noisy and not half and bias_grad is not None and target.bias is not None:
        approximate = approximate_layer(
            result,
            weight_grad,
            bias_grad,
            target.weight.detach(),
            target.bias.detach(),
            batch_size=batch_size,
            time_budget=_seconds_left(start, APPROXIMATE_SHARE * time_budget),
            size_given=not size_read,
        )
        if approximate is not None and not result.interrupted:
            # the exact search's count of what it recovered no longer describes the answer
            notes = [n for n in notes if not n.startswith(PARTIAL_RECOVERY)]
            result, source = approximate, "approximate"
            features = result.inputs.cpu()
            if target.first:
                features = _clipped(features, input_range)
            inputs = features.reshape(features.shape[0], *inputs.shape[1:])
            notes.append(result.notes[-1])
    label_result: LabelResult | None = None
    kind_mismatch = False
    dropped: DirectDropout | None = None
    scales: torch.Tensor | None = None
    pre: torch.Tensor | None = None  # the examples' pre-activations at the layer (k, m)
    if direct is not None and result.dropout and result.found:
        pre = _pre_activations(target, features.to(dtype))
        scales = _dropout_scales(
            direct, target, features.to(dtype), pre, result, weight_grad.dtype, kind == "gradient"
        )
        if bool((scales == 0).any()):
            dropped = direct
            notes.append(_dropout_note(direct, scales, target.first and kind == "gradient"))
        else:
            scales = None  # no unit dropped: read as an update computed in eval mode
    if target.bias is not None and result.found and target.after is not None:
        label_result, kind_mismatch = _labels(
            target, features.to(dtype), result, kind, unit_scales=scales
        )
        labels = label_result.labels
        if kind_mismatch:
            other: UpdateKind = "gradient" if kind == "delta" else "delta"
            notes.append(
                f"the update looks like a {other}, not a {kind}: its labels fit only "
                f"with the sign of a {other} (the labels returned use it). Pass "
                f"update_kind={other!r}; nothing is verified under the wrong kind."
            )
        elif kind == "gradient":
            notes.extend(_label_notes(label_result.notes, noisy))
            if label_result.reduction in ("mean", "sum"):
                notes.append(f"loss reduction detected: {label_result.reduction}.")
        else:
            notes.append(
                "labels from a FedAvg delta use the Jacobian at the sent weights; they are "
                "a best estimate, not certified, so .verified is False (see "
                ".examples_verified)."
            )
    elif target.after is None:
        notes.append("the model could not be split at the attacked layer: no labels.")
    error_rms = result.error_rms if source == "approximate" else None
    if error_rms is not None and not target.first and bool(torch.isfinite(error_rms).any()):
        notes.append(
            "the error bars of approximate features assume each example's ReLU pattern at "
            "the layer is right; where the bias dominates the features (most units on, or "
            "off, for the whole batch) a pattern can be wrong and an example far off under a "
            "small bar."
        )
    rebuilt, missing_images = _images(
        work,
        target,
        observed,
        features.to(dtype),
        label_result,
        result,
        max(result.batch_size, batch_size or 0),
        kind,
        input_shape,
        input_range,
        image_budget,
        seed,
        progress,
        notes,
    )
    determined = rebuilt is not None and rebuilt.all_determined and result.complete
    if target.first and labels is not None:
        with _client_masks(dropped, pre, scales):
            certificate = certify(work, observed, inputs.to(dtype), labels, update_kind=kind)
        if kind == "delta":
            notes.append(
                "certificate for a FedAvg delta: without the client's learning rate, step "
                "count and batch order the update cannot be recomputed; it checks that the "
                "attacked layer's delta lies in the span of the reconstructed inputs, and "
                "says nothing about labels."
            )
        if not result.complete and source == "exact":
            notes.append(
                "the certificate is for a partial reconstruction, so it cannot be small: "
                "missing examples contribute to the update."
            )
        elif (
            kind == "gradient"
            and source == "exact"
            and not noisy
            and certificate > verified_threshold(dtype)
        ):
            notes.append(
                f"the update recomputed from the {inputs.shape[0]} examples and their labels "
                f"leaves {certificate:.3g} of it unexplained (verified needs at most "
                f"{verified_threshold(dtype):.0e}): the batch may hold examples the attacked "
                "layer does not show (every unit off for them; under a sum reduction nothing "
                "else counts them), or the loss is not softmax cross-entropy."
            )
    elif determined and rebuilt is not None and labels is not None and dropped is None:
        certificate = certify(work, observed, rebuilt.images, labels, update_kind=kind)
        notes.append(
            "certificate computed from .images, which their features determine: the update "
            "recomputed from the images and labels."
        )
    elif not target.first:
        why = ""
        if rebuilt is not None:
            why = (
                " (the images rebuilt from it are estimates)."
                if not rebuilt.all_determined
                else " (the images rebuilt from it are exact, but the batch is incomplete)."
            )
        notes.append(
            "no certificate: the reconstruction is not in the model's input space" + (why or ".")
        )
    reliable = bool(result.noise_consistent) and result.noise is not None and result.noise.confident
    if noisy and target.first and not result.interrupted and not reliable:
        # the approximate answer does not explain the update, or its weakest example is
        # not clearly above the noise: the mean of several gradient-matching runs, or
        # that answer where it fits the update better (spear.fallback)
        best = best_noisy_estimate(
            work,
            observed,
            Estimate(inputs, labels, certificate, source, ""),
            result.batch_size,
            kind,
            seed,
            input_range,
            lambda: _seconds_left(start, time_budget),
            notes,
        )
        inputs, labels, certificate = best.inputs, best.labels, best.certificate
        source = best.source
        if source != "approximate":
            error_rms = None  # the error bars are the approximate estimate's
    certified = (
        certificate is not None
        and math.isfinite(certificate)
        and certificate <= verified_threshold(dtype)
        and source == "exact"
        and not kind_mismatch
    )
    repeated = (
        label_result is not None
        and bool((label_result.multiplicity > 1).any())
        and not exact_precision(float(torch.finfo(dtype).eps))
    )
    if repeated and certified and result.verified:
        notes.append(
            f"an example fits the update as counted more than once; at {dtype}'s precision "
            "that may be several examples whose gradients agree to rounding, shown as their "
            "mean: not verified."
        )
    # examples a plain mean counts but the update does not show: the batch is incomplete
    unseen = label_result.unseen if label_result is not None and not kind_mismatch else 0
    complete = result.complete and unseen == 0
    counted = (
        int(label_result.multiplicity.sum()) if label_result is not None else result.found
    ) + unseen
    if complete and batch_size is not None and counted < batch_size and source == "exact":
        # an example that turns every unit of the layer off leaves no trace in it
        complete = False
        notes.append(
            f"the examples returned count {counted} of the batch_size={batch_size} given: "
            f"{batch_size - counted} leave no trace of their own in the update (an example "
            "that turns every unit of the layer off, or one whose gradient is a combination "
            "of the others'), so the batch is incomplete and not verified."
        )
    # with an active Dropout the layer checks only the units each example turns off; a
    # gradient's certificate, recomputed with the masks, checks the rest (a delta's span
    # check cannot: mixtures of the examples span the same space)
    checked = result.verified or (result.dropout and result.complete and kind == "gradient")
    examples_verified = certified and checked and complete and not repeated
    labels_certified = kind == "gradient" and label_result is not None and label_result.exact
    verified = examples_verified and labels_certified
    if examples_verified and not verified and kind == "gradient":
        notes.append(
            "the examples are certified but not every label fits softmax cross-entropy "
            "exactly, so .verified is False."
        )
    return Reconstruction(
        inputs=inputs,
        labels=labels,
        certificate=certificate,
        verified=verified,
        examples_verified=examples_verified,
        interrupted=result.interrupted,
        batch_size=result.batch_size + unseen,
        complete=complete,
        layer=target.name,
        feature_space=not target.first,
        layer_result=result,
        seconds=time.perf_counter() - start,
        notes=notes,
        estimate=source,
        error_rms=error_rms,
        noise=result.noise,
        images_determined=determined,
        image_feature_residual=rebuilt.feature_residual if rebuilt is not None else None,
        multiplicity=_multiplicity(label_result, inputs.shape[0], source),
        **_image_fields(rebuilt, labels, missing_images),
    )


def _binary(loss: Loss, target: AttackTarget) -> bool:
    """Whether the model is read as one logit under binary cross-entropy: asked for, or
    ``"auto"`` on a model whose part after the layer gives one output per example.

    Raises
    ------
    InputError
        ``"binary_cross_entropy"`` for a model with more than one output per example.
    """
    if loss == "cross_entropy":
        return False
    one = target.after is not None and one_logit(target.after, target.weight)
    if loss == "binary_cross_entropy" and target.after is not None and not one:
        raise InputError(
            "loss='binary_cross_entropy' needs a model with one output (a logit) per "
            f"example, but the model after layer {target.name!r} gives more: pass "
            "loss='cross_entropy' (softmax cross-entropy over its outputs) or 'auto'."
        )
    return one or loss == "binary_cross_entropy"


def _buffers_note(names: list[str]) -> str:
    """Which update entries named after the model's buffers were left out."""
    shown = ", ".join(repr(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")
    return (
        f"{len(names)} entries of the update are the model's buffers ({shown}: a state-dict "
        "difference holds BatchNorm running statistics too); they are no parameters' "
        "update and were left out."
    )


def _batch_statistics_note(layers: list[str], name: str) -> str:
    """What BatchNorm ``layers`` in training mode before the attacked layer ``name``
    change: the features are per example still; the images are fitted jointly, by
    gradient matching, and are estimates (docs/algorithm.md, "Images from features")."""
    verb = "normalises" if len(layers) == 1 else "normalise"
    return (
        f"{', '.join(layers)} {verb} with the statistics of the batch itself (training "
        f"mode) before the attacked layer {name!r}: the features it receives are still one "
        "vector per example and come back as the layer saw them. Images behind it depend "
        "on the whole batch: they are fitted to the update together, by gradient matching, "
        "and are estimates (one right after the first layer hides the batch's contrast and "
        "each input channel's offset from the update); none is determined by its features."
    )


def _narrow_head_note(target: AttackTarget, binary: bool = False) -> str | None:
    """Why a model with at most :data:`NARROW_HEAD_OUTPUTS` outputs leaves examples
    unidentified, or ``None`` for other models (and where the model after the layer is
    unknown, does not run on a ``(1, m)`` pre-activation, or returns no ``(1, C)``
    tensor, such as an exported program's tuple). ``binary``: the model has one logit,
    read as two (:mod:`spear.binary`)."""
    if target.after is None:
        return None
    probe = torch.zeros(
        1, target.weight.shape[0], dtype=target.weight.dtype, device=target.weight.device
    )
    try:
        with torch.no_grad():
            outputs = target.after(probe)
    except Exception:  # a model that does not run on the probe: no note
        return None
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2:
        return None  # a model whose output is not one batch of logits
    if outputs.shape[1] > NARROW_HEAD_OUTPUTS:
        return None
    count = 1 if binary else int(outputs.shape[1])
    head = "one output" if count == 1 else f"{count} outputs"
    return (
        f"the model has {head}: each example's gradient at the layer's output is one "
        "vector masked by its ReLU pattern, up to a scale, so the update's sparsity alone "
        "does not single examples out. The search tells them apart by fitting softmax "
        "cross-entropy with a plain mean or sum, which two classes under plain "
        "cross-entropy and one logit under binary cross-entropy satisfy, and label "
        "smoothing or other losses do not."
    )


def _check_input_shape(input_shape: tuple[int, ...] | None, target: AttackTarget) -> None:
    """Refuse an ``input_shape`` that does not hold the first attacked layer's features.

    Raises
    ------
    InputError
        When the attacked layer is the model's first and ``input_shape`` has another
        number of entries than it takes features.
    """
    if input_shape is None or not target.first:
        return
    if math.prod(input_shape) != target.in_features:
        raise InputError(
            f"input_shape {input_shape} has {math.prod(input_shape)} entries but layer "
            f"{target.name!r} takes {target.in_features} features per example; pass a shape "
            f"whose entries multiply to {target.in_features}, or leave input_shape=None to "
            "have it read off the model."
        )


def _decay_removed(
    update: dict[str, torch.Tensor],
    model: nn.Module,
    target: AttackTarget,
    weight_name: str,
    bias_name: str | None,
    seed: int,
    notes: list[str],
) -> dict[str, torch.Tensor]:
    """``update`` without the multiple of the sent parameters that weight decay (or an L2
    penalty) adds (:mod:`spear.decay`), when the attacked layer's update shows no rank gap
    and does once it is taken out; else ``update`` itself."""
    weight_grad = update[weight_name]
    if weight_grad.dtype in HALF_PRECISIONS:
        return update
    s = torch.linalg.svdvals(weight_grad.detach().to(torch.float64))
    rank, gap = estimate_rank(s, float(torch.finfo(weight_grad.dtype).eps))
    if rank < s.numel() and gap >= MIN_RANK_GAP:
        return update
    bias_grad = update.get(bias_name) if bias_name is not None else None
    decay = find_decay(weight_grad, bias_grad, target.weight, target.bias, MIN_RANK_GAP, seed)
    if decay is None:
        return update
    biases = "biases too" if decay.biases else "biases left out"
    notes.append(
        f"weight decay: the update is a term of rank {decay.rank} plus {decay.weights:.6g} "
        f"times the sent weights ({biases}), an L2 penalty or an optimiser's weight decay; "
        "that term is taken out of every parameter's update before the attack and the "
        "certificate."
    )
    return without_decay(update, dict(model.named_parameters()), decay)


def _guessed_shape(model: nn.Module, features: int) -> tuple[int, ...]:
    """The input shape of a model that does not say it: the image shape
    :func:`spear.model.guess_input_shape` reads off ``features`` when the model runs on
    it, else ``(features,)`` (a model whose first layer takes flat inputs)."""
    shape = guess_input_shape(features)
    if len(shape) == 1 or _runs_on(model, shape):
        return shape
    return (features,)


def _runs_on(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``model`` runs on a batch of two zero inputs of ``shape`` (its own dtype
    and device)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape, dtype=parameter_dtype(model), device=device))
    except Exception:  # any failure: the model does not take inputs of this shape
        return False
    return True


def _label_notes(notes: list[str], noisy: bool) -> list[str]:
    """The label reader's notes; under noise a misfit is the noise's, not the loss's."""
    if not noisy:
        return notes
    return [
        n.replace(
            "); is the loss cross-entropy?",
            "), as noise in the update would make them: the labels are estimates.",
        )
        for n in notes
    ]


def _multiplicity(label_result: LabelResult | None, found: int, source: str) -> torch.Tensor | None:
    """``(found,)`` how many times the batch holds each returned example, when the labels
    describe the returned examples (not a gradient-matching replacement)."""
    if label_result is None or source == "gradient-matching":
        return None
    counts = label_result.multiplicity
    return counts.clone() if counts.shape[0] == found else None


#: The note of an image search that Ctrl-C stopped in gradient matching.
_IMAGES_INTERRUPTED = (
    "interrupted (Ctrl-C) while gradient matching estimated images: the features and "
    "labels are returned without those images."
)


def _images(
    model: nn.Module,
    target: AttackTarget,
    update: dict[str, torch.Tensor],
    features: torch.Tensor,
    label_result: LabelResult | None,
    result: LayerReconstruction,
    batch_size: int,
    kind: UpdateKind,
    input_shape: tuple[int, ...] | None,
    input_range: tuple[float, float] | None,
    image_budget: float,
    seed: int,
    progress: bool | None,
    notes: list[str],
) -> tuple[ImageReconstruction | None, MissingImages | None]:
    """Model inputs for a feature-space result: images of the recovered features ``(k,
    n)`` (:func:`spear.images.reconstruct_images`) and, when examples are missing,
    gradient-matching estimates of those (:func:`spear.images.images_of_missing`); notes
    are appended to ``notes``. The batch holds ``batch_size`` examples (the caller's batch
    size where it exceeds the distinct examples the update shows: columns that agree to
    rounding); the recovered ones count with their multiplicity (duplicates), the rest
    are missing. Behind BatchNorm in training mode, with every label known, the whole
    batch is fitted at once instead
    (:func:`spear.images.images_behind_batch_statistics`)."""
    if target.first or target.before is None or image_budget <= 0:
        return None, None
    if target.bias_key is None or target.bias_key not in update:
        notes.append(
            "no images from the features: without the layer's bias gradient each feature "
            "vector is known only up to a scale, and images of rescaled features are not "
            "the examples'."
        )
        return None, None
    start = time.perf_counter()
    labels = label_result.labels if label_result is not None else None
    known_examples = (
        int(label_result.multiplicity.sum()) if label_result is not None else result.found
    )
    missing = max(0, batch_size - known_examples)
    fill = missing > 0 and (labels is not None or not result.found)
    rebuilt: ImageReconstruction | None = None
    read = _missing_labels(model, update, target, kind, features, label_result, missing)
    if (
        result.found
        and label_result is not None
        and (not missing or (read is not None and read.shape[0] == missing))
        and batch_statistics_layers(target.before)
    ):
        # behind BatchNorm with the batch's statistics: gradient matching of the batch
        shape = input_shape or image_shape_for(target.before, features.shape[1], features.dtype)
        if shape is not None:
            try:
                rebuilt, filled = images_behind_batch_statistics(
                    model,
                    target.before,
                    update,
                    features,
                    label_result.labels,
                    label_result.multiplicity,
                    shape,
                    missing_labels=read,
                    update_kind=kind,
                    input_range=input_range,
                    time_budget=image_budget,
                    seed=seed,
                )
            except KeyboardInterrupt:
                notes.append(_IMAGES_INTERRUPTED)
                return None, None
            notes.extend(rebuilt.notes + (filled.notes if filled is not None else []))
            return rebuilt, filled
    if result.found:
        rebuilt = reconstruct_images(
            model,
            target.before,
            update,
            features,
            labels,
            update_kind=kind,
            complete=result.complete,
            weights=(
                example_weights(label_result.divisor, label_result.fit_error)
                if label_result is not None
                else None
            ),
            input_shape=input_shape,
            input_range=input_range,
            time_budget=image_budget
            * (feature_image_share(result.found, batch_size) if fill else 1.0),
            seed=seed,
            progress=progress,
        )
        if rebuilt is None:
            notes.append(
                "no images from the features: the model's input shape could not be read off "
                "the layers before the attacked one; pass input_shape=."
            )
            return None, None
        notes.extend(rebuilt.notes)
    if not fill:
        return rebuilt, None
    shape = (
        tuple(rebuilt.images.shape[1:])
        if rebuilt is not None
        else input_shape or image_shape_for(target.before, features.shape[1], features.dtype)
    )
    if shape is None:
        return rebuilt, None
    known = None
    if rebuilt is not None and labels is not None:
        known = (rebuilt.images, labels)
    try:
        filled = images_of_missing(
            model,
            update,
            known,
            missing,
            shape,
            update_kind=kind,
            input_range=input_range,
            time_budget=max(1.0, _seconds_left(start, image_budget)),
            seed=seed,
            labels=read,
        )
    except KeyboardInterrupt:
        notes.append(_IMAGES_INTERRUPTED)
        return rebuilt, None
    if filled is not None:
        notes.extend(filled.notes)
    return rebuilt, filled


def _missing_labels(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    target: AttackTarget,
    kind: UpdateKind,
    features: torch.Tensor,
    label_result: LabelResult | None,
    missing: int,
) -> torch.Tensor | None:
    """``(missing,)`` the labels of the examples whose features were not recovered, read
    off a gradient's classifier head (:func:`spear.labels.missing_labels`), or ``None``
    (none missing, a FedAvg delta, no labels, or no model after the layer)."""
    if not missing or kind != "gradient" or label_result is None or target.after is None:
        return None
    return missing_labels(
        model,
        update,
        target.after,
        target.weight.detach(),
        target.bias.detach() if target.bias is not None else None,
        features,
        label_result,
        missing,
    )


def _image_fields(
    rebuilt: ImageReconstruction | None,
    labels: torch.Tensor | None,
    filled: MissingImages | None,
) -> dict[str, Any]:
    """``images``, ``image_labels`` and ``images_from_features`` of a :class:`Reconstruction`:
    the recovered features' images first (in the order of ``.inputs``), then the missing
    examples' estimates."""
    images: list[torch.Tensor] = []
    tags: list[torch.Tensor] | None = []
    if rebuilt is not None:
        images.append(rebuilt.images)
        tags = [labels.cpu()] if labels is not None else None
    if filled is not None:
        images.append(filled.images.to(images[0].dtype) if images else filled.images)
        if tags is not None:
            tags.append(filled.labels.cpu())
    return {
        "images": torch.cat(images) if images else None,
        "image_labels": torch.cat(tags) if images and tags else None,
        "images_from_features": rebuilt.images.shape[0] if rebuilt is not None else 0,
    }


def _mixed_precision(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    target: AttackTarget,
    batch_size: int | None,
    notes: list[str],
    time_budget: float,
) -> LayerReconstruction:
    """The approximate path for a float16 or bfloat16 update (rounding is its noise).

    The exact pipeline refuses such updates (too few digits for its zero tests); the
    approximate path treats the rounding as noise, searching for at most ``time_budget``
    seconds. The batch size comes from the caller or from a clear spectrum.

    Raises
    ------
    InputError
        No batch size was given and the spectrum does not show one clearly, or no
        direction stands above the rounding.
    """
    assert target.bias is not None
    size = batch_size
    if size is None:
        spectrum = noisy_batch_size(weight_grad, bias_grad)
        if spectrum.confident and spectrum.batch_size >= 1:
            size = spectrum.batch_size
        else:
            size = rounding_batch_size(weight_grad, bias_grad)
            if size is None:
                raise InputError(
                    f"the update arrived as {weight_grad.dtype} (a mixed-precision client) "
                    "and its spectrum shows no clear batch size: pass batch_size= to "
                    "estimate the batch from it, or have the client send float32."
                )
            notes.append(
                f"batch size {size} read off the spectrum: {size} singular values stand "
                f"clear of the bound on {weight_grad.dtype}'s rounding."
            )
    found = approximate_layer(
        None,
        weight_grad,
        bias_grad,
        target.weight.detach(),
        target.bias.detach(),
        batch_size=size,
        time_budget=time_budget,
        size_given=batch_size is not None,
    )
    if found is None:
        raise InputError(
            f"the update arrived as {weight_grad.dtype} (a mixed-precision client) and no "
            "example stands above its rounding; have the client send float32."
        )
    notes.append(
        f"the update arrived as {weight_grad.dtype} (a mixed-precision client): its "
        "rounding is treated as noise and the batch estimated (not exact, not verified)."
    )
    return found


def _rank_gap(weight_grad: torch.Tensor, batch_size: int) -> float:
    """``s_k / s_{k+1}`` of ``weight_grad`` ``(m, n)`` at ``k``, where the first ``b``
    values fall into the dtype's rounding (:func:`spear.linalg.rounding_rank`;
    :func:`spear.linalg.gap_at`: ``inf`` past the last value or where ``s_{k+1}`` is
    rounding; the plain ratio at ``b`` where they sink into it without a clean drop), or
    the gap at the numerical rank where that is clear and at most ``b``
    (:func:`estimate_rank`: a rank below ``b`` is repeated examples, fewer distinct
    columns than the batch, not noise)."""
    s = torch.linalg.svdvals(weight_grad.detach().to(torch.float64))
    rank, gap = estimate_rank(s, float(torch.finfo(weight_grad.dtype).eps))
    if rank <= batch_size and gap >= MIN_RANK_GAP:
        return gap
    if batch_size >= s.numel() or batch_size < 1:
        return math.inf
    eps = float(torch.finfo(weight_grad.dtype).eps)
    clear = rounding_rank(s, batch_size, eps)
    if clear is not None:
        return gap_at(s, clear, eps)
    # the b-th direction sinks into the rounding without a clean drop: no exact gap there
    following = float(s[batch_size])
    return math.inf if following == 0.0 else float(s[batch_size - 1]) / following


def _clipped(features: torch.Tensor, input_range: tuple[float, float] | None) -> torch.Tensor:
    """``features`` ``(k, n)`` clipped into ``input_range`` (unchanged without one)."""
    if input_range is None:
        return features
    return features.clamp(input_range[0], input_range[1])


def _seconds_left(start: float, budget: float) -> float:
    """Seconds left of ``budget`` counted from ``start`` (``time.perf_counter()``), at
    least 0."""
    return max(0.0, budget - (time.perf_counter() - start))


def _dropout_note(dropout: DirectDropout, scales: torch.Tensor, first: bool) -> str:
    """What the masks read off the gradient columns ``scales`` ``(k, m)`` say (``first``:
    the attacked layer takes the model's inputs and the update is a gradient, so it is
    recomputed with them)."""
    dropped = int((scales == 0).sum())
    uses = "its label and the certificate" if first else "its label"
    return (
        f"the update was computed with {dropout.describe()} "
        f"(p = {dropout.p:g}) active: each example's mask is read off its gradient column "
        f"(a unit it turns on that carries no gradient was dropped; {dropped} in all) and "
        f"applied to the model in eval mode for {uses}."
    )


def _dropout_before_note(dropouts: list[str]) -> str:
    """What Dropout ``dropouts`` before the attacked layer make of its features."""
    verb = "comes" if len(dropouts) == 1 else "come"
    return (
        f"{', '.join(dropouts)} {verb} before the attacked layer: where the client trained "
        "with dropout active, each feature vector returned is the one the layer saw, the "
        "example's own with a random share p of its entries zeroed and the others "
        "multiplied by 1 / (1 - p), and images rebuilt from it fit those masked features "
        "(estimates). An update computed in eval mode (dropout off) holds the example's own "
        "features."
    )


def _incomplete(result: LayerReconstruction) -> bool:
    """Whether a search left examples out, and was not stopped by Ctrl-C."""
    return not result.complete and not result.interrupted


def _pre_activations(target: AttackTarget, features: torch.Tensor) -> torch.Tensor:
    """``W x + c`` ``(k, m)`` of the attacked layer for ``features`` ``(k, n)``, in their
    dtype."""
    bias = target.bias.detach().to(features.dtype) if target.bias is not None else None
    with torch.no_grad():
        return nn.functional.linear(features, target.weight.detach().to(features.dtype), bias)


def _dropout_scales(
    dropout: DirectDropout,
    target: AttackTarget,
    features: torch.Tensor,
    pre: torch.Tensor,
    result: LayerReconstruction,
    update_dtype: torch.dtype,
    mend: bool,
) -> torch.Tensor:
    """The recovered examples' Dropout scales ``(k, m)`` (:func:`spear.dropout.dropout_scales`),
    from their ``features`` ``(k, n)`` and pre-activations ``pre`` ``(k, m)``, mended where
    an example's label does not fit (:func:`spear.dropout.refined_scales`; ``mend``: a
    gradient, whose columns fit cross-entropy as they are)."""
    bias = target.bias.detach() if target.bias is not None else None
    eps = float(torch.finfo(update_dtype).eps)
    columns = result.output_grads.cpu()
    scales = dropout_scales(pre, columns, dropout.p, eps)
    after = target.after
    if after is None or not mend:
        return scales

    def misfit(i: int, row: torch.Tensor) -> float:
        assert after is not None
        fitted = recover_labels(
            after,
            target.weight.detach(),
            bias,
            features[i : i + 1],
            columns[:, i : i + 1],
            unit_scales=row[None],
        )
        return float(fitted.fit_error[0])

    tol = label_fit_tol(features.dtype)
    return refined_scales(scales, pre, columns, eps, misfit, tol)


def _client_masks(
    dropout: DirectDropout | None, pre: torch.Tensor | None, scales: torch.Tensor | None
) -> contextlib.AbstractContextManager[None]:
    """The model run with the examples' Dropout masks (:func:`spear.dropout.masks_applied`;
    ``pre`` ``(k, m)``: their pre-activations at the attacked layer), or as it is."""
    if dropout is None or pre is None or scales is None:
        return contextlib.nullcontext()
    return masks_applied(dropout, torch.relu(pre), scales)


def _labels(
    target: AttackTarget,
    features: torch.Tensor,
    result: LayerReconstruction,
    update_kind: UpdateKind,
    unit_scales: torch.Tensor | None = None,
) -> tuple[LabelResult, bool]:
    """Labels of the recovered examples, and whether the update's sign contradicts its kind.

    A gradient's columns give ``r_i = (p_i - e_y) / B`` with one negative entry; a FedAvg
    delta is minus a learning rate times gradients, so its ``r_i`` has one positive entry
    (:attr:`spear.labels.LabelResult.sign`). When most examples vote for the other kind,
    the labels are taken with the other sign and the mismatch is reported.
    """
    assert target.after is not None
    sign = -1.0 if update_kind == "delta" else 1.0
    grads = result.output_grads.cpu()

    def recover(s: float) -> LabelResult:
        assert target.after is not None
        return recover_labels(
            target.after,
            target.weight.detach(),
            target.bias.detach() if target.bias is not None else None,
            features,
            grads * s,
            missing=max(0, result.batch_size - result.found),
            unit_scales=unit_scales,
        )

    found = recover(sign)
    against = int((found.sign < 0).sum())
    if against > int((found.sign > 0).sum()) and 2 * against >= found.sign.numel():
        return recover(-sign), True
    return found, False
