"""Optimisation-based gradient inversion in the style of Inverting Gradients.

Geiping et al. (2020), "Inverting Gradients - How easy is it to break privacy in federated
learning?": start from random dummy inputs, compute the gradient the model would produce
for them, and move the dummies (by Adam) so that this gradient points the same way as the
observed update. The objective is

    1 - <g(x), u> / (||g(x)|| ||u||)  +  tv_weight * TV(x)

where ``g(x)`` and ``u`` are the dummy and observed gradients concatenated over all
parameters in the update (one cosine over the whole model, as in the paper) and ``TV`` is
the mean absolute difference between neighbouring pixels (image inputs only).

The cosine is scale invariant, so it does not matter whether the client averaged or summed
its loss over the batch, or clipped its gradient; nor does the learning rate of a one-step
FedAvg delta (which is negated to point along the gradient).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from spear.baselines.analytic import CERTIFICATE_NOTE
from spear.baselines.labels import as_gradient, infer_labels
from spear.errors import InputError
from spear.results import Reconstruction
from spear.update import UpdateKind, check_partial_update, check_update_kind

__all__ = ["gradient_matching_attack", "total_variation"]

#: Added to the norm product in the cosine so that a zero dummy gradient gives no NaN; far
#: below any gradient norm that matters, in float32 and float64 alike.
_NORM_FLOOR = 1e-30

#: Learning-rate schedule of Geiping et al.: multiply by ``_LR_DECAY`` at these fractions of
#: the planned steps.
_LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)
_LR_DECAY = 0.1
#: Steps timed before a run under a time budget plans how many it can take: the schedule
#: then follows the planned steps, so that a budget cut does not leave the learning rate
#: undecayed (the last, small steps are where the images settle).
PLAN_AFTER_STEPS = 10
#: Share of the time left that the planned steps fill: the pace of the timed steps varies by
#: a few percent over a run, and the run should end on its schedule, not on the deadline.
PLAN_SHARE = 0.9


def planned_steps(iterations: int, taken: int, seconds: float, time_left: float) -> int:
    """Steps a run can take in all: the ``taken`` steps that used ``seconds``, and as many
    more at that pace as :data:`PLAN_SHARE` of ``time_left`` allows, at most
    ``iterations``."""
    if taken <= 0 or seconds <= 0.0:
        return iterations
    more = int(PLAN_SHARE * max(0.0, time_left) * taken / seconds)
    return max(taken, min(iterations, taken + more))


def learning_rate(lr: float, step: int, planned: int) -> float:
    """The Inverting Gradients schedule: ``lr`` divided by 10 at 3/8, 5/8 and 7/8 of the
    ``planned`` steps; ``step`` counts from 0."""
    passed = sum(step >= max(1, int(f * planned)) for f in _LR_MILESTONES)
    return lr * _LR_DECAY**passed


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels.

    Parameters
    ----------
    images:
        ``(b, C, H, W)``.

    Returns
    -------
    torch.Tensor
        Scalar: mean ``|x[..., i+1, :] - x[..., i, :]|`` plus mean
        ``|x[..., :, j+1] - x[..., :, j]|``.
    """
    vertical = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    horizontal = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    return vertical + horizontal


def _cosine_distance(
    dummy_grads: list[torch.Tensor | None], target: list[torch.Tensor], target_norm: torch.Tensor
) -> torch.Tensor:
    """``1 - cos`` between the concatenations of ``dummy_grads`` and ``target``.

    Parameters whose dummy gradient is ``None`` (not reached by the graph) count as zero.
    """
    dot = target_norm.new_zeros(())
    dummy_sq = target_norm.new_zeros(())
    for grad, observed in zip(dummy_grads, target, strict=True):
        if grad is None:
            continue
        dot = dot + (grad * observed).sum()
        dummy_sq = dummy_sq + grad.pow(2).sum()
    return 1 - dot / (dummy_sq.sqrt() * target_norm + _NORM_FLOOR)


def gradient_matching_attack(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    input_shape: tuple[int, ...],
    update_kind: str = "gradient",
    seed: int = 0,
    time_budget: float | None = None,
    iterations: int = 300,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    box: tuple[float, float] | None = None,
    signed_gradients: bool = True,
    restarts: int = 1,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
) -> Reconstruction:
    """Reconstruct a batch by matching gradient directions (Inverting Gradients).

    Labels are inferred first from the last linear layer's gradient (iDLG for one example,
    an LLG-style count for more; see :func:`spear.baselines.labels.infer_labels`) and then
    held fixed. When they cannot be inferred (no last linear layer in the update) they are
    optimised jointly as soft labels, as in DLG (Zhu et al. 2019), and reported as argmax.

    Parameters
    ----------
    model:
        The model as the server sent it. It is deep-copied (never modified); the copy keeps
        the train/eval mode it was sent in, which should match what the client used.
    update:
        Parameter name -> gradient (any loss reduction: the cosine is scale invariant) or
        FedAvg delta (``update_kind="delta"``; one local step matches exactly, more steps
        only approximately).
    batch_size:
        ``b``, the number of dummy inputs optimised.
    input_shape:
        Shape of one input, e.g. ``(1, 28, 28)``. For image-shaped inputs ``(C, H, W)`` with
        ``H, W > 1`` a total-variation prior is added; flat inputs get none.
    update_kind:
        ``"gradient"`` or ``"delta"``.
    seed:
        Seeds the Gaussian initialisation (and the soft labels, if optimised); restart ``r``
        uses ``seed + r``.
    time_budget:
        Wall-clock seconds for the whole attack, or ``None`` for no limit. When it runs out
        the best inputs so far are returned and ``notes`` says so.
    iterations:
        Adam steps per restart.
    lr:
        Initial Adam learning rate; divided by 10 at 3/8, 5/8 and 7/8 of the steps. Under
        a ``time_budget`` the steps are planned after :data:`PLAN_AFTER_STEPS` timed ones
        (at most ``iterations``, the time left shared by the restarts still to run), and
        the schedule follows that plan.
    tv_weight:
        Weight of the total-variation prior (ignored for flat inputs).
    box:
        ``(low, high)`` to clamp the dummy inputs into after every step (e.g. ``(0, 1)`` for
        pixels in ``[0, 1]``; pass the normalised range when inputs are normalised), or
        ``None`` for no constraint. Clamping is the projected-gradient form of the paper's
        box constraint.
    signed_gradients:
        Step along the sign of the input gradient (as in the paper's reference code), which
        is robust to the widely varying scale of the objective's gradient.
    restarts:
        Independent starts; the one with the lowest final objective is returned.
    known:
        ``(images (k, *input_shape), labels (k,))`` of examples of the same batch already
        recovered by other means: they are held fixed in the batch whose gradient is
        matched, and ``batch_size`` more dummies are optimised (the examples still
        missing). The dummies' labels are those inferred for the whole batch of
        ``k + batch_size`` less one occurrence of each known label.
    labels:
        ``(batch_size,)`` labels of the optimised inputs when known by other means; they
        are then not inferred.
    initial:
        ``(batch_size, *input_shape)`` inputs to start the first restart from (e.g. an
        approximate reconstruction) instead of Gaussian noise; clamped into ``box``.

    Returns
    -------
    Reconstruction
        ``inputs`` ``(b, *input_shape)`` in the model's dtype; ``labels`` ``(b,)`` int64;
        ``certificate`` ``None``; ``complete`` False (the inputs are approximations, not
        verified); ``notes`` carry the final cosine similarity, iterations run and whether
        the time budget cut the run short.

    Raises
    ------
    InputError
        When the update does not fit the model or an argument is invalid.
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    if iterations < 0 or restarts < 1:
        raise InputError(
            f"iterations must be >= 0 and restarts >= 1, got {iterations} and {restarts}."
        )
    if box is not None and not box[0] < box[1]:
        raise InputError(f"box must be (low, high) with low < high, got {box}.")
    if initial is not None and tuple(initial.shape) != (batch_size, *input_shape):
        raise InputError(
            f"initial must have shape {(batch_size, *input_shape)} (batch_size, "
            f"*input_shape), found {tuple(initial.shape)}."
        )
    kind = check_update_kind(update_kind)
    checked = check_partial_update(model, update)
    deadline = math.inf if time_budget is None else start + time_budget

    attacked = copy.deepcopy(model)
    named = dict(attacked.named_parameters())
    for param in attacked.parameters():
        param.requires_grad_(False)
    params = [named[name] for name in checked]
    for param in params:
        param.requires_grad_(True)
    dtype = params[0].dtype
    device = params[0].device
    target = [as_gradient(checked[name], kind).to(device, dtype) for name in checked]
    target_norm = torch.sqrt(
        sum((t.pow(2).sum() for t in target), torch.zeros((), dtype=dtype, device=device))
    )
    if float(target_norm) == 0.0:
        raise InputError("the update is zero everywhere: there is nothing to match.")

    notes: list[str] = []
    held, held_labels = _held(known, input_shape, dtype, device)
    fixed_labels = _dummy_labels(model, checked, kind, batch_size, held_labels, labels, notes)
    fixed_labels = None if fixed_labels is None else fixed_labels.to(device)
    if fixed_labels is None:
        notes.append("labels could not be inferred: optimised jointly as soft labels (DLG).")

    image_like = len(input_shape) == 3 and input_shape[1] > 1 and input_shape[2] > 1
    use_tv = image_like and tv_weight > 0

    best_inputs: torch.Tensor | None = None
    best_labels: torch.Tensor | None = None
    best_loss = math.inf
    best_cosine = math.nan
    steps_done = 0
    out_of_time = False
    shortened = False
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed + restart)
        dummy = torch.randn((batch_size, *input_shape), generator=generator, dtype=dtype)
        if initial is not None and restart == 0:
            dummy = initial.detach().to(dtype).clone()
        dummy = dummy.to(device)
        if box is not None:
            dummy = dummy.clamp(box[0], box[1])
        dummy.requires_grad_(True)
        variables = [dummy]
        label_logits: torch.Tensor | None = None
        if fixed_labels is None:
            with torch.no_grad():
                n_classes = int(attacked(dummy).shape[-1])
            label_logits = torch.randn(
                (batch_size, n_classes), generator=generator, dtype=dtype
            ).to(device)
            label_logits.requires_grad_(True)
            variables.append(label_logits)
        optimizer = torch.optim.Adam(variables, lr=lr)
        planned = iterations
        began = time.perf_counter()

        def objective(
            dummy: torch.Tensor = dummy, label_logits: torch.Tensor | None = label_logits
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """(full objective, cosine distance) at the current dummies."""
            outputs = attacked(torch.cat([held, dummy]))
            if label_logits is None:
                assert fixed_labels is not None
                loss = functional.cross_entropy(outputs, torch.cat([held_labels, fixed_labels]))
            else:
                soft = label_logits.softmax(dim=-1)
                hard = functional.one_hot(held_labels, soft.shape[1]).to(soft.dtype)
                loss = functional.cross_entropy(outputs, torch.cat([hard, soft]))
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            distance = _cosine_distance(list(grads), target, target_norm)
            total = distance + tv_weight * total_variation(dummy) if use_tv else distance
            return total, distance

        progress = tqdm(
            range(iterations),
            desc=f"gradient matching (restart {restart + 1}/{restarts})",
            disable=not sys.stderr.isatty(),
            leave=False,
        )
        for step in progress:
            now = time.perf_counter()
            if now >= deadline:
                out_of_time = True
                break
            if step >= planned:
                shortened = True
                break
            if step == PLAN_AFTER_STEPS and math.isfinite(deadline):
                share = (deadline - now) / (restarts - restart)
                planned = planned_steps(iterations, step, now - began, share)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, step, planned)
            total, _distance = objective()
            steps = torch.autograd.grad(total, variables)
            for variable, step in zip(variables, steps, strict=True):
                variable.grad = step.sign() if signed_gradients else step
            optimizer.step()
            if box is not None:
                with torch.no_grad():
                    dummy.clamp_(box[0], box[1])
            steps_done += 1
            progress.set_postfix(loss=f"{float(total.detach()):.4g}")
        progress.close()

        final_total, final_distance = (value.detach() for value in objective())
        if float(final_total) < best_loss:
            best_loss = float(final_total)
            best_cosine = 1 - float(final_distance)
            best_inputs = dummy.detach().clone()
            if label_logits is None:
                assert fixed_labels is not None
                best_labels = fixed_labels.clone()
            else:
                best_labels = label_logits.detach().argmax(dim=-1)
        if out_of_time:
            break

    assert best_inputs is not None and best_labels is not None
    if held.shape[0]:
        notes.append(
            f"{held.shape[0]} known examples held fixed; the {batch_size} inputs returned "
            "are the missing ones."
        )
    notes.append(
        f"{steps_done} Adam steps over {restart + 1} restart(s); final cosine similarity "
        f"between the dummy and observed gradients {best_cosine:.6f} (1 = same direction)."
    )
    if out_of_time:
        notes.append(
            f"stopped early: the time budget of {time_budget} s ran out; returned the best "
            "inputs found so far."
        )
    elif shortened:
        notes.append(
            f"fewer than {iterations} steps per restart fit the time budget of {time_budget} s: "
            "the learning-rate schedule followed the steps planned."
        )
    notes.append(
        "inputs are approximations from optimisation (complete=False): nothing guarantees "
        "they equal the client's batch."
    )
    notes.append(CERTIFICATE_NOTE)
    return Reconstruction(
        inputs=best_inputs,
        labels=best_labels.to(torch.int64),
        certificate=None,
        verified=False,
        batch_size=batch_size,
        complete=False,
        layer="",
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def _held(
    known: tuple[torch.Tensor, torch.Tensor] | None,
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The known examples ``(k, *input_shape)`` and labels ``(k,)`` (``k = 0`` for none)."""
    if known is None:
        empty = torch.zeros((0, *input_shape), dtype=dtype, device=device)
        return empty, torch.zeros(0, dtype=torch.int64, device=device)
    images, labels = known
    if tuple(images.shape[1:]) != tuple(input_shape) or labels.shape != images.shape[:1]:
        raise InputError(
            f"known must be (images (k, *{tuple(input_shape)}), labels (k,)); got images "
            f"{tuple(images.shape)} and labels {tuple(labels.shape)}."
        )
    return images.detach().to(device, dtype), labels.detach().to(device, torch.int64)


def _dummy_labels(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    kind: UpdateKind,
    batch_size: int,
    held_labels: torch.Tensor,
    labels: torch.Tensor | None,
    notes: list[str],
) -> torch.Tensor | None:
    """``(batch_size,)`` labels of the optimised inputs: ``labels`` when given, else those
    inferred for the whole batch less the held examples' (``None``: not inferable)."""
    if labels is not None:
        if labels.shape != (batch_size,):
            raise InputError(
                f"labels must have shape ({batch_size},), one per optimised input; got "
                f"{tuple(labels.shape)}."
            )
        return labels.detach().to(torch.int64)
    total = batch_size + held_labels.shape[0]
    inference = infer_labels(model, update, batch_size=total, update_kind=kind)
    notes.extend(inference.notes)
    if inference.labels is None:
        return None
    return _without(inference.labels, held_labels.cpu())[:batch_size]


def _without(labels: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``labels`` ``(n,)`` less one occurrence of each entry of ``removed``, order kept.

    >>> _without(torch.tensor([3, 1, 3, 2]), torch.tensor([3, 5])).tolist()
    [1, 3, 2]
    """
    left = labels.tolist()
    for label in removed.tolist():
        if label in left:
            left.remove(label)
    return torch.tensor(left, dtype=torch.int64)
