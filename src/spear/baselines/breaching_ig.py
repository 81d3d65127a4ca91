"""Inverting Gradients as implemented in ``breaching``, run on spear's cases.

``breaching`` (Geiping, PyPI ``breaching==0.1.2``) is the reference collection of gradient
inversion attacks. This adapter runs its Inverting Gradients attack (the
``invertinggradients`` attack config: ``1 - cos`` between the dummy and observed gradients
plus total variation, Adam on the sign of the input gradient with step 0.1 decayed tenfold
at 3/8, 5/8 and 7/8 of the iterations, dummies boxed into ``[0, 1]``) with breaching's own
code through its public API (``breaching.get_attack_config``,
``breaching.attacks.prepare_attack``, ``attacker.reconstruct``), on exactly the update and
model that the other attacks of :mod:`spear.baselines` get.

What the adapter sets, and why:

* **Data range.** No mean or standard deviation is given to breaching, so it works on the
  raw inputs and its box is ``[0, 1]``: the pixel range of every spear dataset.
* **Precision.** breaching computes in the dtype named by its ``impl.dtype`` setting; the
  adapter sets it from the model (``double`` for float64, ``float`` otherwise), so float64
  models run in float64. Models in any other dtype run in float32 (a note says so); the
  inputs come back in the model's dtype.
* **Labels.** As for the gradient-matching baseline, spear infers the labels from the
  classifier head's gradient (:func:`spear.baselines.labels.infer_labels`) and gives them to
  breaching as known; ``label_strategy=`` hands label recovery to breaching instead
  (its IG default is ``"bias-corrected"``).
* **Partial updates.** Parameters without an entry in the update (frozen) are turned into
  buffers of a copy of the model, so that breaching matches exactly the gradients sent.
* **Time budget.** breaching has none; the adapter stops its optimisation loop once the
  budget is spent (breaching then returns the best candidate so far, as after Ctrl-C).
* **No download.** LPIPS (whose AlexNet/VGG weights are downloaded on first use) is only
  loaded by ``breaching.analysis``, which the adapter never calls; the attack loads no
  pretrained model and makes no network access.
* **torchvision.** ``import breaching`` imports torchvision. PyPI's torchvision wheels are
  built against the CUDA build of torch; beside a CPU-only torch their compiled operators
  (``nms``, ``roi_align``, ...) cannot load and torchvision 0.28 fails at import. breaching's
  Inverting Gradients uses none of them, so the adapter then imports torchvision without
  them (and says so in the notes).

Install with ``pip install "spear[breaching]"`` after ``pip install torch==2.13.0``: the
extra pins ``breaching==0.1.2`` and ``torchvision==0.28.0``, the release built for torch
2.13.0 (a newer torchvision would replace torch).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import math
import sys
import threading
import time
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from spear.baselines.analytic import CERTIFICATE_NOTE
from spear.baselines.labels import as_gradient, infer_labels
from spear.errors import InputError, NotAttackableError
from spear.results import Reconstruction
from spear.update import check_partial_update, check_update_kind

__all__ = ["BREACHING_LABEL_STRATEGIES", "INSTALL_HINT", "breaching_ig_attack", "load_breaching"]

#: How to install the optional dependency (named in every error about it).
INSTALL_HINT = (
    'pip install "spear[breaching]" (breaching 0.1.2 and torchvision 0.28.0, the release '
    "built for torch 2.13.0; install torch==2.13.0 first so that pip keeps it)"
)

#: breaching's label-recovery strategies that work on image classifiers (``label_strategy=``).
BREACHING_LABEL_STRATEGIES = (
    "bias-corrected",
    "iDLG",
    "analytic",
    "yin",
    "wainakh-simple",
    "wainakh-whitebox",
    "random",
)

_TORCHVISION_NOTE = (
    "torchvision's compiled operators could not be loaded beside this torch build (PyPI's "
    "torchvision is built against CUDA torch): torchvision was imported without them; "
    "Inverting Gradients does not use them."
)

#: hydra's configuration state is global: compose one configuration at a time.
_CONFIG_LOCK = threading.Lock()
#: Set once torchvision had to be imported without its compiled operators.
_torchvision_without_ops = False


class _OutOfTime(KeyboardInterrupt):
    """Raised inside breaching's loop when the time budget is spent.

    breaching catches ``KeyboardInterrupt`` in its optimisation loop and returns the best
    candidate so far; this is the only way to stop the loop from outside.
    """


@contextlib.contextmanager
def _tolerate_missing_torchvision_ops() -> Iterator[None]:
    """Let torchvision register fake kernels only for operators that exist.

    torchvision 0.28 registers fake kernels for ``torchvision::nms`` and ``qnms`` without
    checking that its compiled operators were loaded (everything else it guards); those
    two registrations are skipped when the operator does not exist.
    """
    original = torch.library.register_fake

    def register_fake(op: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            try:
                getattr(torch.ops.torchvision, op.split("::", 1)[1])
            except (AttributeError, RuntimeError):
                return lambda function: function
        return original(op, *args, **kwargs)

    torch.library.register_fake = register_fake  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.library.register_fake = original


def _import_torchvision() -> None:
    global _torchvision_without_ops
    try:
        importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise InputError(f"torchvision failed to import ({exc}); {INSTALL_HINT}.") from exc
        for name in [key for key in sys.modules if key.partition(".")[0] == "torchvision"]:
            del sys.modules[name]
        with _tolerate_missing_torchvision_ops():
            try:
                importlib.import_module("torchvision")
            except (ImportError, RuntimeError) as retry:
                raise InputError(
                    f"torchvision failed to import ({retry}); {INSTALL_HINT}."
                ) from retry
        _torchvision_without_ops = True


def load_breaching() -> Any:
    """Import ``breaching`` (the optional extra) and return the module.

    Raises
    ------
    InputError
        When breaching or one of its dependencies is not installed or fails to import;
        the message names the extra to install.
    """
    loaded = sys.modules.get("breaching")
    if loaded is not None:
        return loaded
    try:
        _import_torchvision()
        import breaching
    except ImportError as exc:
        raise InputError(
            f"the breaching-ig attack needs the optional extra breaching, which could not be "
            f"imported here ({exc}). Install it: {INSTALL_HINT}."
        ) from exc
    return breaching


def _attack_config(breaching: Any, overrides: Sequence[str]) -> Any:
    """breaching's ``invertinggradients`` attack configuration with ``overrides``."""
    with _CONFIG_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # hydra's version_base notice
        try:
            return breaching.get_attack_config("invertinggradients", overrides=list(overrides))
        except Exception as exc:  # hydra's override and config errors have many types
            raise InputError(
                f"breaching rejected the attack configuration {list(overrides)}: {exc}"
            ) from exc


def _trainable_copy(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose parameters are exactly those called ``names``.

    Every other parameter becomes a buffer with the same value, so that ``parameters()``
    (what breaching differentiates and matches) lists only the updated ones.
    """
    result = copy.deepcopy(model)
    keep = {id(param) for name, param in result.named_parameters() if name in names}
    for name, param in list(result.named_parameters(remove_duplicate=False)):
        if id(param) in keep:
            continue
        module_name, _, attribute = name.rpartition(".")
        module = result.get_submodule(module_name)
        del module._parameters[attribute]
        module.register_buffer(attribute, param.detach().clone())
    return result


def _fit_total_variation(attacker: Any, input_shape: tuple[int, ...]) -> str | None:
    """Make breaching's total-variation prior fit ``input_shape``; a note when changed.

    breaching's prior is a grouped convolution built for three channels. For ``C``
    channels its pair of difference filters is repeated ``C`` times (the same prior per
    channel); inputs that are not images get no prior.
    """
    priors = [r for r in attacker.regularizers if type(r).__name__ == "TotalVariation"]
    if not priors:
        return None
    if len(input_shape) != 3 or min(input_shape[1:]) < 2:
        attacker.regularizers = [r for r in attacker.regularizers if r not in priors]
        return f"inputs of shape {input_shape} are not images: no total-variation prior."
    channels = input_shape[0]
    if channels == 3:
        return None
    for prior in priors:
        if prior.double_opponents:
            raise InputError(
                f"breaching's colour total variation needs 3 channels, not {channels}."
            )
        prior.weight = prior.weight[:2].repeat(channels, 1, 1, 1)
        prior.groups = channels
    return (
        f"breaching's total-variation prior (built for 3 channels) applied to each of the "
        f"{channels} channel(s)."
    )


class _TimedObjective:
    """breaching's objective, stopped by :class:`_OutOfTime` once ``deadline`` passes."""

    def __init__(self, objective: Any, deadline: float) -> None:
        self.objective = objective
        self.deadline = deadline
        self.timed_out = False
        self.finite = True

    def initialize(self, *args: Any, **kwargs: Any) -> Any:
        return self.objective.initialize(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if time.perf_counter() >= self.deadline:
            self.timed_out = True
            raise _OutOfTime
        value, task_loss = self.objective(*args, **kwargs)
        self.finite = bool(torch.isfinite(value).all())
        return value, task_loss

    def __repr__(self) -> str:
        return repr(self.objective)


def breaching_ig_attack(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    input_shape: tuple[int, ...],
    update_kind: str = "gradient",
    seed: int = 0,
    time_budget: float | None = None,
    iterations: int | None = None,
    restarts: int = 1,
    label_strategy: str | None = None,
    overrides: Sequence[str] = (),
) -> Reconstruction:
    """Reconstruct a batch with breaching's Inverting Gradients attack.

    Labels: by default spear infers them from the classifier head's gradient (iDLG for one
    example, an LLG-style count for more; :func:`spear.baselines.labels.infer_labels`), as
    the gradient-matching baseline does, and breaching gets them as known labels. With
    ``label_strategy`` breaching recovers them itself (it assumes the update's last entry is
    the classifier's bias gradient).

    Parameters
    ----------
    model:
        The model as the server sent it (never modified). Its train/eval mode is kept: in
        eval mode breaching gets its buffers (BatchNorm statistics); in train mode
        breaching uses batch statistics, as a client in train mode does.
    update:
        Parameter name -> gradient (any reduction: the cosine is scale invariant) or
        FedAvg delta (``update_kind="delta"``, negated; exact for one local step only).
    batch_size:
        ``b``, the number of images optimised.
    input_shape:
        Shape of one input in ``[0, 1]``, e.g. ``(1, 28, 28)``. Image shapes ``(C, H, W)``
        get breaching's total-variation prior (per channel), others none.
    update_kind:
        ``"gradient"`` or ``"delta"``.
    seed:
        Seeds breaching's Gaussian initialisation (torch's global random state is restored
        afterwards).
    time_budget:
        Wall-clock seconds for the whole call (import and set-up included), or ``None``.
        When it runs out, breaching's best candidate so far is returned and ``notes`` says
        so. The step-size schedule follows ``iterations``, so a cut run never decays.
    iterations:
        Adam steps per restart (breaching's ``optim.max_iterations``); ``None`` keeps
        breaching's default of 24 000.
    restarts:
        breaching's ``restarts.num_trials``; the trial with the best cosine is returned.
    label_strategy:
        ``None`` (spear's labels) or one of :data:`BREACHING_LABEL_STRATEGIES`.
    overrides:
        Further hydra overrides of breaching's attack config, e.g.
        ``("regularization.total_variation.scale=0.1",)``.

    Returns
    -------
    Reconstruction
        ``inputs`` ``(b, *input_shape)`` in the model's dtype, within ``[0, 1]``;
        ``labels`` ``(b,)`` int64 (breaching's order: image ``i`` has label ``i``);
        ``certificate`` ``None``; ``verified`` and ``complete`` False; ``notes`` carry the
        final cosine similarity, the steps run and whether the budget cut the run short.

    Raises
    ------
    InputError
        When breaching is not installed (the message names the extra), the update does not
        fit the model, or an argument is invalid.
    NotAttackableError
        When the labels cannot be inferred (no classifier head in the update) and no
        ``label_strategy`` is given.
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    if iterations is not None and iterations < 0:
        raise InputError(f"iterations must be >= 0 or None, got {iterations}.")
    if restarts < 1:
        raise InputError(f"restarts must be at least 1, got {restarts}.")
    if label_strategy is not None and label_strategy not in BREACHING_LABEL_STRATEGIES:
        raise InputError(
            f"unknown label_strategy {label_strategy!r}; use None (spear's labels) or one of "
            f"{', '.join(BREACHING_LABEL_STRATEGIES)}."
        )
    shape = tuple(int(size) for size in input_shape)
    kind = check_update_kind(update_kind)
    checked = check_partial_update(model, update)
    breaching = load_breaching()
    deadline = math.inf if time_budget is None else start + time_budget

    params = dict(model.named_parameters())
    model_dtype = params[next(iter(checked))].dtype
    device = params[next(iter(checked))].device
    dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    notes: list[str] = []
    if _torchvision_without_ops:
        notes.append(_TORCHVISION_NOTE)
    if dtype != model_dtype:
        notes.append(f"the {model_dtype} model was run in float32 by breaching.")

    trainable = _trainable_copy(model, list(checked))
    names = [name for name, _ in trainable.named_parameters()]
    gradients = [as_gradient(checked[name], kind).to(device, dtype) for name in names]
    if all(float(gradient.abs().max()) == 0.0 for gradient in gradients):
        raise InputError("the update is zero everywhere: there is nothing to match.")
    if len(names) < len(params):
        notes.append(
            f"{len(params) - len(names)} parameter(s) without an entry in the update were "
            "held fixed (matched gradients: the update's entries only)."
        )

    labels: torch.Tensor | None = None
    if label_strategy is None:
        inference = infer_labels(model, checked, batch_size=batch_size, update_kind=kind)
        if inference.labels is None:
            raise NotAttackableError(
                "breaching-ig needs the batch's labels, and they cannot be inferred from this "
                f"update ({' '.join(inference.notes)}). Pass label_strategy= to let breaching "
                "guess them, or use the gradient-matching baseline, which optimises them."
            )
        labels = inference.labels.to(device)
        notes.extend(inference.notes)
        notes.append("labels inferred by spear and given to breaching as known.")
    else:
        notes.append(f"labels recovered by breaching's {label_strategy!r} strategy.")

    settings = [
        f"impl.dtype={'double' if dtype == torch.float64 else 'float'}",
        f"restarts.num_trials={restarts}",
    ]
    if iterations is not None:
        settings.append(f"optim.max_iterations={iterations}")
    if label_strategy is not None:
        settings.append(f"label_strategy={label_strategy}")
    config = _attack_config(breaching, [*settings, *overrides])
    attacker = breaching.attacks.prepare_attack(
        trainable, nn.CrossEntropyLoss(), config, dict(device=device, dtype=dtype)
    )
    prior_note = _fit_total_variation(attacker, shape)
    if prior_note is not None:
        notes.append(prior_note)
    timed = _TimedObjective(attacker.objective, deadline)
    attacker.objective = timed

    server_payload = [
        {
            "parameters": [param.detach() for param in trainable.parameters()],
            # breaching puts the model in eval mode when it gets buffers, in train mode
            # (batch statistics) when it gets none
            "buffers": None if model.training else [b.detach() for b in trainable.buffers()],
            "metadata": types.SimpleNamespace(shape=shape, modality="vision"),
        }
    ]
    shared_data = [
        {
            "gradients": gradients,
            "buffers": None,
            "metadata": {
                "num_data_points": batch_size,
                "labels": labels,
                "local_hyperparams": None,
            },
        }
    ]
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed)
        result, stats = attacker.reconstruct(server_payload, shared_data, server_secrets={})

    steps = sum(len(stats.get(f"Trial_{trial}_Val", [])) for trial in range(restarts))
    planned = restarts * int(config.optim.max_iterations)
    if steps < planned and not timed.timed_out and timed.finite:
        raise KeyboardInterrupt  # breaching swallowed a Ctrl-C: pass it on
    cosine = 1.0 - float(stats.get("opt_value", math.nan))
    notes.append(
        f"breaching Inverting Gradients: {steps} Adam steps over {restarts} restart(s); "
        f"final cosine similarity between the dummy and observed gradients {cosine:.6f} "
        "(1 = same direction)."
    )
    if not timed.finite:
        notes.append("breaching stopped early: its objective became non-finite.")
    if timed.timed_out:
        notes.append(
            f"stopped early: the time budget of {time_budget} s ran out; returned breaching's "
            "best candidate so far."
        )
    notes.append(
        "inputs are approximations from optimisation (complete=False): nothing guarantees "
        "they equal the client's batch."
    )
    notes.append(CERTIFICATE_NOTE)
    # breaching boxes every step into [0, 1]; only a candidate that was never stepped (the
    # budget ran out first) is still its Gaussian initialisation
    inputs = result["data"].detach().clamp(0.0, 1.0).to(model_dtype)
    return Reconstruction(
        inputs=inputs.reshape(batch_size, *shape),
        labels=result["labels"].detach().to(device, torch.int64),
        certificate=None,
        verified=False,
        batch_size=batch_size,
        complete=False,
        layer="",
        seconds=time.perf_counter() - start,
        notes=notes,
    )
