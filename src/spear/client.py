"""What a simulated federated-learning client sends: FedSGD, FedAvg and DP-SGD updates.

Every function works on a deep copy of the model it is given (the server's model is never
modified) and returns an *update*: a ``dict`` parameter-name -> tensor keyed exactly like
``model.named_parameters()``, detached, with each parameter's shape, dtype and device.

* :func:`fedsgd_update` -- the gradient of the loss on the client's batch (one step).
* :func:`fedavg_update` -- the weight *delta* ``W_after - W_sent`` after ``epochs`` local
  epochs of plain SGD in mini-batches (``-lr`` times the summed mini-batch gradients).
* :func:`dp_sgd_update` -- one DP-SGD step through Opacus: per-example gradients, each
  clipped to ``max_grad_norm``, summed, Gaussian noise added, divided by the batch size;
  with the privacy spent ``(epsilon, delta)`` from Opacus's RDP accountant.
* :func:`aggregate` -- the secure-aggregation sum of several clients' updates.
* :func:`layer_truth` -- for evaluation: the true inputs of one layer and the gradients
  at its outputs, the two factors of its FedSGD weight update.
* :func:`check_update` -- does an update fit a model (names and shapes)? (defined in
  :mod:`spear.update`)

The default loss is softmax cross-entropy on class-index labels ``(b,)`` int64 in
``[0, num_classes)`` with logits ``(b, num_classes)``. A custom ``loss_fn(outputs, labels)``
must return per-example losses ``(b,)``; ``reduction`` (or the mean, for FedAvg mini-batches
and DP-SGD) combines them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from spear.errors import InputError
from spear.update import check_update

__all__ = [
    "DEFAULT_DATASET_SIZE",
    "RDP_ORDERS",
    "DPUpdate",
    "LossFn",
    "aggregate",
    "check_update",
    "dp_epsilon",
    "dp_sgd_update",
    "fedavg_update",
    "fedsgd_update",
    "layer_truth",
]

#: ``loss_fn(outputs (b, ...), labels (b, ...)) -> per-example losses (b,)``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reduction = Literal["mean", "sum"]

#: Dataset size assumed by :func:`dp_sgd_update` to derive the Poisson sample rate
#: ``batch_size / dataset_size`` when none is given (the MNIST training set).
DEFAULT_DATASET_SIZE = 60_000

_REDUCTIONS = ("mean", "sum")

#: RDP orders for the accountant: Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` (1.1 ... 63)
#: extended up to 4096, where the optimum lies for tiny sample rates or large noise.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *range(64, 256, 8),
    256,
    384,
    512,
    768,
    1024,
    2048,
    4096,
)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    raise InputError("the model has no parameters; a client update needs at least one.")


def _check_batch(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, custom_loss: bool
) -> None:
    """Types, batch sizes and dtypes of a client's batch (class range checked later)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, found {type(model).__name__}.")
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InputError(
            f"inputs and labels must be torch tensors, found {type(inputs).__name__} and "
            f"{type(labels).__name__}. Convert with torch.as_tensor(...)."
        )
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise InputError(
            f"inputs must have a non-empty batch dimension first, found shape "
            f"{tuple(inputs.shape)}."
        )
    dtype = _model_dtype(model)
    if inputs.dtype != dtype:
        raise InputError(
            f"inputs have dtype {inputs.dtype} but the model's parameters have {dtype}. "
            f"Cast with inputs.to({dtype})."
        )
    if not bool(torch.isfinite(inputs).all()):
        raise InputError("inputs contain NaN or infinite values.")
    if labels.ndim < 1 or labels.shape[0] != inputs.shape[0]:
        raise InputError(
            f"labels must have the batch size {inputs.shape[0]} of the inputs first, found "
            f"shape {tuple(labels.shape)}."
        )
    if custom_loss:
        return
    if labels.ndim != 1 or labels.dtype != torch.int64:
        raise InputError(
            f"labels must be class indices of shape (b,) and dtype torch.int64, found shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}. Use labels.long(), or pass a "
            "loss_fn for other targets."
        )


def _check_outputs(outputs: torch.Tensor, labels: torch.Tensor, *, custom_loss: bool) -> None:
    if custom_loss:
        return
    if outputs.ndim != 2 or outputs.shape[0] != labels.shape[0]:
        raise InputError(
            f"the default cross-entropy loss needs logits of shape (b, num_classes) = "
            f"({labels.shape[0]}, C); the model returned {tuple(outputs.shape)}. Pass a "
            "loss_fn for other outputs."
        )
    num_classes = outputs.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(
            f"labels must lie in [0, {num_classes}) for a model with {num_classes} outputs; "
            f"found values in [{int(labels.min())}, {int(labels.max())}]."
        )


def _per_example_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn | None,
) -> torch.Tensor:
    """Per-example losses ``(b,)`` of ``model`` on the batch."""
    outputs = model(inputs)
    _check_outputs(outputs, labels, custom_loss=loss_fn is not None)
    if loss_fn is None:
        return nn.functional.cross_entropy(outputs, labels, reduction="none")
    losses = loss_fn(outputs, labels)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (inputs.shape[0],):
        found = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
        raise InputError(
            f"loss_fn must return per-example losses of shape ({inputs.shape[0]},), found "
            f"{found}. Use reduction='none' in the loss (for example "
            "nn.CrossEntropyLoss(reduction='none')); the `reduction` argument combines them."
        )
    return losses


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise InputError(f"reduction must be one of {_REDUCTIONS}, found {reduction!r}.")
    return losses.mean() if reduction == "mean" else losses.sum()


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (dropout and the like) inside, restore it on exit."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``loss`` keyed like ``named_parameters`` (zeros for frozen ones)."""
    named = list(model.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    by_name = {name: g for (name, _), g in zip(trainable, grads, strict=True)}
    out: dict[str, torch.Tensor] = {}
    for name, p in named:
        g = by_name.get(name)
        out[name] = torch.zeros_like(p).detach() if g is None else g.detach().clone()
    return out


# --------------------------------------------------------------------------------------
# FedSGD and FedAvg


def fedsgd_update(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    loss_fn: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """The FedSGD update: the gradient of the loss on the client's whole batch.

    Parameters
    ----------
    model : torch.nn.Module
        The model the server sent; not modified (a deep copy is differentiated, in the
        mode -- train or eval -- the model is in).
    inputs : torch.Tensor
        ``(b, *input_shape)``, the model's dtype.
    labels : torch.Tensor
        ``(b,)`` int64 class indices in ``[0, num_classes)`` (any targets ``loss_fn``
        accepts when it is given).
    reduction : {"mean", "sum"}
        How per-example losses are combined: ``"sum"`` gives ``b`` times the ``"mean"``
        gradient.
    loss_fn : callable, optional
        ``loss_fn(outputs, labels) -> (b,)`` per-example losses; softmax cross-entropy
        when ``None``.

    Returns
    -------
    dict[str, torch.Tensor]
        Parameter name -> gradient, each of its parameter's shape and dtype.

    Raises
    ------
    InputError
        Inconsistent batch sizes, wrong label dtype or range, dtype mismatch, bad
        ``reduction``.
    """
    _check_batch(model, inputs, labels, custom_loss=loss_fn is not None)
    if reduction not in _REDUCTIONS:
        raise InputError(f"reduction must be one of {_REDUCTIONS}, found {reduction!r}.")
    local = copy.deepcopy(model)
    loss = _reduce(_per_example_loss(local, inputs, labels, loss_fn), reduction)
    return _gradients(local, loss)


def layer_truth(
    model: nn.Module,
    layer: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    loss_fn: LossFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of a linear layer's FedSGD weight update, from the client's batch:
    what an exact attack on that layer recovers, to evaluate it against
    (:func:`spear.metrics.singled_out`, :func:`spear.metrics.match`).

    Parameters
    ----------
    model : torch.nn.Module
        The model the server sent; not modified (a deep copy runs the batch).
    layer : str
        The layer's name in ``model.named_modules()`` (e.g. ``"fc1"``).
    inputs, labels, reduction, loss_fn
        As for :func:`fedsgd_update`.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        The layer's inputs ``(b, n)`` (flattened per example) and the gradients of the
        loss at its outputs ``(m, b)``, one column per example: the layer's weight
        gradient is ``columns @ inputs``.

    Raises
    ------
    InputError
        What :func:`fedsgd_update` raises, and a ``layer`` that is not a module of
        ``model``.
    """
    _check_batch(model, inputs, labels, custom_loss=loss_fn is not None)
    if reduction not in _REDUCTIONS:
        raise InputError(f"reduction must be one of {_REDUCTIONS}, found {reduction!r}.")
    local = copy.deepcopy(model)
    modules = dict(local.named_modules())
    if layer not in modules or not layer:
        names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
        raise InputError(
            f"layer {layer!r} is not a module of the model; its linear layers are {names}."
        )
    seen: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        out.retain_grad()
        seen["inputs"], seen["outputs"] = args[0], out

    handle = modules[layer].register_forward_hook(keep)
    try:
        loss = _reduce(_per_example_loss(local, inputs, labels, loss_fn), reduction)
        loss.backward()
    finally:
        handle.remove()
    grad = seen["outputs"].grad
    assert grad is not None
    b = inputs.shape[0]
    return seen["inputs"].detach().reshape(b, -1), grad.detach().reshape(b, -1).T


def fedavg_update(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    lr: float = 0.1,
    shuffle: bool = True,
    seed: int = 0,
    reduction: Reduction = "mean",
    loss_fn: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """The FedAvg update: weights after local training minus the weights sent.

    The client runs ``epochs`` passes of plain SGD (``w <- w - lr * grad``, no momentum,
    no weight decay) over its ``b`` examples in mini-batches of ``batch_size``
    (the last one smaller when ``b`` is not a multiple), reshuffled every epoch when
    ``shuffle``. The sign convention is ``delta = W_T - W_0 = -lr * sum_t grad_t``: one
    full-batch epoch gives ``-lr`` times the FedSGD gradient (the opposite sign of a
    gradient).

    Parameters
    ----------
    model : torch.nn.Module
        The model the server sent (``W_0``); not modified.
    inputs : torch.Tensor
        ``(b, *input_shape)``, the model's dtype.
    labels : torch.Tensor
        ``(b,)`` int64 class indices.
    epochs : int
        Local epochs ``E >= 1``.
    batch_size : int, optional
        Local mini-batch size; ``None`` for the full batch (one step per epoch).
    lr : float
        Learning rate (> 0).
    shuffle : bool
        Draw a new order of the examples every epoch (seeded by ``seed``).
    seed : int
        Seeds the shuffling and any randomness in the model (dropout).
    reduction : {"mean", "sum"}
        Loss reduction within each mini-batch.
    loss_fn : callable, optional
        Per-example loss, as in :func:`fedsgd_update`.

    Returns
    -------
    dict[str, torch.Tensor]
        Parameter name -> ``W_T - W_0``, each of its parameter's shape and dtype.
        Frozen parameters (``requires_grad=False``) get zeros.
    """
    _check_batch(model, inputs, labels, custom_loss=loss_fn is not None)
    if reduction not in _REDUCTIONS:
        raise InputError(f"reduction must be one of {_REDUCTIONS}, found {reduction!r}.")
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be an integer >= 1, found {epochs!r}.")
    num_examples = inputs.shape[0]
    if batch_size is None:
        batch_size = num_examples
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1 or None, found {batch_size!r}.")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a finite number > 0, found {lr!r}.")

    local = copy.deepcopy(model)
    sent = {name: p.detach().clone() for name, p in local.named_parameters()}
    trainable = [p for p in local.parameters() if p.requires_grad]
    order_gen = torch.Generator().manual_seed(seed)
    with _seeded_rng(seed, inputs.device):
        for _ in range(epochs):
            order = (
                torch.randperm(num_examples, generator=order_gen)
                if shuffle
                else torch.arange(num_examples)
            ).to(inputs.device)
            for start in range(0, num_examples, batch_size):
                index = order[start : start + batch_size]
                losses = _per_example_loss(local, inputs[index], labels[index], loss_fn)
                grads = torch.autograd.grad(
                    _reduce(losses, reduction), trainable, allow_unused=True
                )
                with torch.no_grad():
                    for p, g in zip(trainable, grads, strict=True):
                        if g is not None:
                            p.sub_(g, alpha=lr)
    return {name: (p.detach() - sent[name]).clone() for name, p in local.named_parameters()}


# --------------------------------------------------------------------------------------
# DP-SGD


@dataclass(frozen=True)
class DPUpdate:
    """One DP-SGD client update and the privacy it spends.

    Attributes
    ----------
    update : dict[str, torch.Tensor]
        Parameter name -> noisy mean of clipped per-example gradients (a *gradient*, the
        sign of :func:`fedsgd_update`), each of its parameter's shape and dtype.
    epsilon : float
        Privacy spent by ``steps`` such steps at ``sample_rate`` (Opacus RDP accountant);
        ``inf`` without noise.
    delta : float
        The ``delta`` of the ``(epsilon, delta)`` guarantee.
    noise_multiplier : float
        Noise standard deviation relative to ``max_grad_norm``.
    max_grad_norm : float
        Per-example clipping norm ``C`` (L2 over all parameters).
    sample_rate : float
        Poisson sampling rate ``q`` used for accounting.
    steps : int
        Number of steps accounted for.
    """

    update: dict[str, torch.Tensor]
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int


def dp_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Privacy spent by ``steps`` DP-SGD steps (Opacus ``RDPAccountant``).

    The accountant's history is ``[(noise_multiplier, sample_rate, steps)]`` and the RDP
    orders are :data:`RDP_ORDERS` (Opacus's defaults extended to large orders, which small
    sample rates and large noise need; any order gives a valid bound, so ``epsilon`` is at
    most what Opacus's defaults report). Opacus's warning that the best order is at the end
    of the range is silenced: the bound is then still valid, only a little loose.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma >= 0``; 0 gives ``inf``.
    sample_rate : float
        Poisson sampling rate ``q`` in ``(0, 1]``.
    steps : int
        Number of steps ``>= 1``.
    delta : float
        Target ``delta`` in ``(0, 1)``.

    Returns
    -------
    float
        ``epsilon`` (``inf`` when there is no noise).
    """
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Optimal order is the (largest|smallest)")
        return float(accountant.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def dp_sgd_update(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    sample_rate: float | None = None,
    steps: int = 1,
    delta: float = 1e-5,
    seed: int = 0,
    dataset_size: int = DEFAULT_DATASET_SIZE,
    loss_fn: LossFn | None = None,
) -> DPUpdate:
    """One DP-SGD step through Opacus, and the privacy it spends.

    Opacus's ``GradSampleModule`` computes the per-example gradients ``g_i`` and its
    ``DPOptimizer`` clips each one over all parameters together,
    ``g_i * min(1, C / (||g_i|| + 1e-6))`` (Opacus's constant 1e-6), sums them, adds
    Gaussian noise ``N(0, (noise_multiplier * C)^2)`` drawn from a generator seeded by
    ``seed`` and divides by the batch size ``b``. The noisy gradient is returned (not
    applied), with ``epsilon`` from Opacus's RDP accountant for ``steps`` steps at
    ``sample_rate`` (history ``[(noise_multiplier, sample_rate, steps)]``).

    Parameters
    ----------
    model : torch.nn.Module
        The model the server sent; not modified. Must consist of layers Opacus supports
        (no BatchNorm; see ``opacus.validators.ModuleValidator.fix``).
    inputs : torch.Tensor
        ``(b, *input_shape)``, the model's dtype (float32 or float64).
    labels : torch.Tensor
        ``(b,)`` int64 class indices.
    max_grad_norm : float
        Clipping norm ``C > 0``.
    noise_multiplier : float
        ``sigma >= 0``; 0 gives clipping only and ``epsilon = inf``.
    sample_rate : float, optional
        Poisson sampling rate ``q`` for accounting; default ``b / dataset_size``.
    steps : int
        Steps the client takes at this rate, for accounting only (the update is one step).
    delta : float
        Target ``delta`` in ``(0, 1)``.
    seed : int
        Seeds the noise (and any dropout).
    dataset_size : int
        Size of the client's dataset assumed when ``sample_rate`` is ``None``.
    loss_fn : callable, optional
        Per-example loss, as in :func:`fedsgd_update` (averaged over the batch).

    Returns
    -------
    DPUpdate
        The update and its privacy parameters.
    """
    _check_batch(model, inputs, labels, custom_loss=loss_fn is not None)
    batch_size = int(inputs.shape[0])
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise InputError(f"max_grad_norm must be a finite number > 0, found {max_grad_norm!r}.")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise InputError(
            f"noise_multiplier must be a finite number >= 0, found {noise_multiplier!r}."
        )
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, found {steps!r}.")
    if not 0 < delta < 1:
        raise InputError(f"delta must lie in (0, 1), found {delta!r}.")
    if sample_rate is None:
        if not isinstance(dataset_size, int) or dataset_size < batch_size:
            raise InputError(
                f"dataset_size must be an integer >= the batch size {batch_size}, found "
                f"{dataset_size!r}; or give sample_rate directly."
            )
        sample_rate = batch_size / dataset_size
    if not 0 < sample_rate <= 1:
        raise InputError(f"sample_rate must lie in (0, 1], found {sample_rate!r}.")

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    local = copy.deepcopy(model)
    named = list(local.named_parameters())
    trainable = [p for _, p in named if p.requires_grad]
    if not trainable:
        raise InputError("the model has no trainable parameters (all requires_grad=False).")
    with warnings.catch_warnings():
        # Opacus warns about secure_mode (we seed the noise on purpose: a simulation), and
        # torch about its full backward hooks when the inputs do not require gradients.
        warnings.filterwarnings("ignore", module=r"opacus(\.|$)")
        warnings.filterwarnings("ignore", message=r"Full backward hook is firing")
        try:
            wrapped = GradSampleModule(local, loss_reduction="mean")
        except (NotImplementedError, ValueError) as exc:
            raise InputError(
                f"Opacus cannot compute per-example gradients for this model: {exc}. Replace "
                "unsupported layers (BatchNorm -> GroupNorm: "
                "opacus.validators.ModuleValidator.fix(model))."
            ) from exc
        noise_gen = torch.Generator(device=inputs.device).manual_seed(seed)
        optimizer = DPOptimizer(
            torch.optim.SGD(trainable, lr=0.0),
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=noise_gen,
        )
        optimizer.zero_grad(set_to_none=True)
        with _seeded_rng(seed, inputs.device):
            losses = _per_example_loss(wrapped, inputs, labels, loss_fn)
            torch.autograd.backward(losses.mean())
        optimizer.pre_step()  # clip, sum, add noise, divide by b; no weight change
    update: dict[str, torch.Tensor] = {}
    for name, p in named:
        grad = p.grad if p.requires_grad else None
        update[name] = torch.zeros_like(p).detach() if grad is None else grad.detach().clone()
    wrapped.remove_hooks()
    epsilon = dp_epsilon(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
    )
    return DPUpdate(
        update=update,
        epsilon=epsilon,
        delta=float(delta),
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=float(sample_rate),
        steps=steps,
    )


# --------------------------------------------------------------------------------------
# secure aggregation


def aggregate(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The secure-aggregation sum of several clients' updates.

    The server of secure aggregation sees only ``sum_k update_k``; for FedSGD with
    ``reduction="sum"`` this is the update of the combined batch.

    Parameters
    ----------
    updates : sequence of Mapping[str, torch.Tensor]
        ``K >= 1`` updates with the same names, shapes and dtypes.

    Returns
    -------
    dict[str, torch.Tensor]
        Name -> elementwise sum over the clients, in the first update's key order.

    Raises
    ------
    InputError
        No updates, or updates whose names, shapes or dtypes differ.
    """
    if isinstance(updates, Mapping) or len(updates) == 0:
        raise InputError(
            "aggregate needs a non-empty list of updates (one dict per client), found "
            f"{type(updates).__name__}"
            + (" of length 0" if not isinstance(updates, Mapping) else "")
            + "."
        )
    first = updates[0]
    for index, other in enumerate(updates):
        if not isinstance(other, Mapping):
            raise InputError(
                f"update {index} is a {type(other).__name__}, not a mapping name -> tensor."
            )
        missing = [name for name in first if name not in other]
        extra = [name for name in other if name not in first]
        if missing or extra:
            raise InputError(
                f"update {index} has different names from update 0: missing {missing}, "
                f"unexpected {extra}. All clients must train the same model."
            )
        bad = []
        for name in first:
            mine, theirs = other[name], first[name]
            if not isinstance(mine, torch.Tensor):
                bad.append(f"{name}: not a tensor ({type(mine).__name__})")
            elif mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                bad.append(
                    f"{name}: {tuple(mine.shape)} {mine.dtype} vs "
                    f"{tuple(theirs.shape)} {theirs.dtype}"
                )
        if bad:
            raise InputError(
                f"update {index} does not match update 0 in shape or dtype: {bad}. All "
                "clients must train the same model in the same dtype."
            )
    total = {name: first[name].detach().clone() for name in first}
    for other in updates[1:]:
        for name in total:
            total[name] += other[name].detach()
    return total
