"""Find the attackable layer of a torch model and the part of the model after it.

A layer is attackable when it is an ``nn.Linear`` whose output goes straight into a ReLU
(docs/algorithm.md, "one linear layer followed by ReLU"). The model is traced with
``torch.fx`` so that flattening or reshaping inside ``forward`` is seen, not only
``nn.Flatten`` in an ``nn.Sequential``, and ``torch.export`` programs (whose linear layers
are ``aten.linear`` calls) are read the same way. The model is never modified: the part
after the layer (from its pre-activations to the logits) is a new ``GraphModule`` that
shares the model's submodules.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from spear.errors import InputError, NotAttackableError

__all__ = [
    "DROPOUT_CALLS",
    "AttackTarget",
    "batch_statistics_layers",
    "check_batch_norm",
    "check_dropout",
    "dropout_layers_after",
    "dropout_layers_before",
    "dropout_modules_after",
    "dropout_off",
    "find_target",
    "guess_input_shape",
    "parameter_dtype",
    "random_dropout_layers",
]

_RELU_MODULES = (nn.ReLU,)
_RELU_FUNCTIONS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.relu_,
    torch.ops.aten.relu.default,
    torch.ops.aten.relu_.default,
}
_CLAMP_FUNCTIONS = {
    torch.clamp,
    torch.clamp_min,
    torch.ops.aten.clamp.default,
    torch.ops.aten.clamp_min.default,
}
_CLAMP_METHODS = {"clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"}
_LINEAR_FUNCTIONS = {torch.nn.functional.linear, torch.ops.aten.linear.default}
_RESHAPE_MODULES = (nn.Flatten, nn.Identity, nn.Unflatten)
_RESHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.clone.default,
}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "float", "double", "to"}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BATCH_NORM_FUNCTIONS = {torch.nn.functional.batch_norm, torch.ops.aten.batch_norm.default}
#: Added to the error when a BatchNorm sits between a linear layer and its ReLU.
_FOLD_HINT = (
    " A BatchNorm between a linear layer and its ReLU is not folded by spear.attack. In eval"
    " mode it is a fixed affine map per unit, so the layer's own gradient still has the"
    " exact structure: with W, c the linear layer's weight and bias, gamma, beta, eps and"
    " the running mean and variance the BatchNorm's, and s = gamma / sqrt(running_var + eps),"
    " spear.invert_layer(update['<layer>.weight'], update['<layer>.bias'],"
    " weight=s[:, None] * W, bias=s * (c - running_mean) + beta) recovers its inputs. In"
    " training mode (batch statistics) the exact zeros are lost."
)
#: Activations whose outputs have no exact zeros (LeakyReLU: a slope, not a zero, below 0).
_SMOOTH = (nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus, nn.LeakyReLU, nn.Mish)


@dataclass
class AttackTarget:
    """The layer the attack inverts.

    Attributes
    ----------
    name:
        The layer's name: its module's path, or for a functional layer (``F.linear``) the
        path of its weight parameter without a final ``.weight``.
    weight:
        ``(m, n)`` the layer's weight as sent (never modified).
    bias:
        ``(m,)`` its bias, or ``None`` for a layer without bias.
    first:
        True when it receives the model input, possibly through reshapes only, so that
        its inputs are the model's inputs.
    after:
        Maps the layer's pre-activations ``(b, m)`` to the model's output, or ``None`` when
        the model could not be split there (then no labels).
    input_shape:
        Shape of one model input when the model records it (exported programs).
    examined:
        One line per layer looked at, with why it was or was not taken.
    before:
        Maps the model's inputs ``(b, *input_shape)`` to the features entering the layer
        ``(b, n)``, or ``None`` when the model could not be split there.
    weight_param, bias_param:
        The names of its weight and bias among ``model.named_parameters()`` (the update's
        keys), when they are not ``name + ".weight"`` and ``name + ".bias"``.
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    first: bool
    after: Callable[[torch.Tensor], torch.Tensor] | None
    input_shape: tuple[int, ...] | None = None
    examined: list[str] = field(default_factory=list)
    before: nn.Module | None = None
    weight_param: str | None = None
    bias_param: str | None = None

    @property
    def in_features(self) -> int:
        """``n``."""
        return int(self.weight.shape[1])

    @property
    def weight_key(self) -> str:
        """The update's key of the layer's weight gradient."""
        if self.weight_param is not None:
            return self.weight_param
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def bias_key(self) -> str | None:
        """The update's key of the layer's bias gradient (``None`` without a bias)."""
        if self.bias is None:
            return None
        if self.bias_param is not None:
            return self.bias_param
        return f"{self.name}.bias" if self.name else "bias"


def _named_modules_within(
    model: nn.Module, within: nn.Module | None
) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` that ``within`` (a part of ``model`` sharing its
    submodules, such as :attr:`AttackTarget.after`) runs; all of them for ``None``."""
    if within is None:
        return list(model.named_modules())
    inside = {id(mod) for mod in within.modules()}
    return [(name, mod) for name, mod in model.named_modules() if id(mod) in inside]


def batch_statistics_layers(model: nn.Module, within: nn.Module | None = None) -> list[str]:
    """The BatchNorm layers of ``model`` that normalise with the batch's own statistics:
    training mode, or no running statistics to use in eval mode.

    In its ``torch.fx`` graph (a ``torch.export`` program's module, or the model traced)
    a ``batch_norm`` call with ``training=True`` counts.

    Parameters
    ----------
    model:
        The model whose layers are named.
    within:
        Only the layers that ``within`` runs: a part of ``model`` that shares its
        submodules (:attr:`AttackTarget.after`); its own graph's ``batch_norm`` calls
        when it is a ``GraphModule``. ``None``: all of ``model``.

    Returns
    -------
    list of str
        One description per layer, e.g. ``"BatchNorm1d '4'"``; empty when there is none.
    """
    found = [
        f"{type(mod).__name__} {name!r}"
        for name, mod in _named_modules_within(model, within)
        if isinstance(mod, _BATCH_NORMS) and (mod.training or mod.running_mean is None)
    ]
    graph = _graph_of(model if within is None else within)
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
            training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
            if training is True:
                found.append(f"batch_norm call {node.name!r}")
    return found


def check_batch_norm(model: nn.Module, target: AttackTarget | None = None) -> list[str]:
    """Refuse a model whose BatchNorm layers mix the examples of a batch where the attack
    needs them apart; return those it accepts.

    In training mode BatchNorm normalises every example with the mean and variance of the
    whole batch. After the attacked layer's input (in :attr:`AttackTarget.after`, or
    between the layer and its ReLU) that makes the model after the layer mix the
    examples: the update is no longer a sum of one term per example there, and the
    labels cannot be read off it one example at a time. Before the attacked layer it only
    changes the features the layer receives, which are still one vector per example:
    the layer's gradient keeps its exact structure, and those layers are accepted. In
    eval mode (running statistics) BatchNorm is a fixed affine map per feature and is
    accepted anywhere.

    Parameters
    ----------
    model:
        The model, as :func:`find_target` split it.
    target:
        The layer attacked; ``None`` (or a model that could not be split at the layer)
        refuses every BatchNorm that uses the batch's statistics.

    Returns
    -------
    list of str
        The BatchNorm layers that use the batch's statistics before the attacked layer
        (accepted), as :func:`batch_statistics_layers` names them.

    Raises
    ------
    NotAttackableError
        When :func:`batch_statistics_layers` finds any after the attacked layer's input,
        naming them and what to try.
    """
    layers = batch_statistics_layers(model)
    if not layers:
        return []
    split = target is not None and target.before is not None
    after = target.after if target is not None else None
    refused = (
        batch_statistics_layers(model, after) if split and isinstance(after, nn.Module) else layers
    )
    if not refused:
        return layers
    verb = "normalises" if len(refused) == 1 else "normalise"
    where = (
        f" after the input of the attacked layer {target.name!r}"
        if split and target is not None
        else ""
    )
    raise NotAttackableError(
        f"{', '.join(refused)} {verb} with the statistics of the batch itself (training "
        f"mode){where}: each example's output then depends on the whole batch, so the "
        "update is no longer a sum of per-example terms and the labels cannot be read off "
        "it; a BatchNorm between the attacked layer and its ReLU also removes its exact "
        "zeros (a BatchNorm before the attacked layer is accepted in training mode: it "
        "only changes the features the layer receives). If the client computed its update "
        "with running statistics (BatchNorm frozen), pass the model in eval mode: "
        "model.eval(). If the BatchNorm comes after the attacked layer's ReLU, that layer's "
        "gradient keeps its exact structure: spear.invert_layer(update['<layer>.weight'], "
        "update['<layer>.bias'], weight=..., bias=...) recovers the layer's inputs, and "
        "spear.certify checks a whole candidate batch."
    )


#: Dropout modules: in training mode each drops random units at every forward pass.
_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
#: Dropout calls in a ``torch.fx`` graph, with the position of their ``train`` argument.
_DROPOUT_FUNCTIONS = {
    torch.nn.functional.dropout: (2, "training"),
    torch.dropout: (2, "train"),
    torch.ops.aten.dropout.default: (2, "train"),
    torch.ops.aten.native_dropout.default: (2, "train"),
}
#: The functional dropout calls: ``F.dropout`` or ``torch.dropout`` in a module's
#: ``forward``, ``aten.dropout`` (``aten.native_dropout`` once decomposed) in a
#: ``torch.export`` program.
DROPOUT_CALLS = frozenset(_DROPOUT_FUNCTIONS)


def _graph_of(model: nn.Module) -> fx.Graph | None:
    """``model``'s ``torch.fx`` graph (traced when it is no ``GraphModule``), for the
    functional calls its modules do not show; ``None`` when it cannot be traced."""
    if isinstance(model, fx.GraphModule):
        return model.graph
    try:
        return fx.symbolic_trace(model).graph
    except Exception:  # an untraceable model has no graph to read
        return None


def random_dropout_layers(model: nn.Module) -> list[str]:
    """The Dropout layers of ``model`` that drop units (training mode, ``p > 0``).

    In its ``torch.fx`` graph (a ``torch.export`` program's module, or the model traced)
    a ``dropout`` call with ``train=True`` and ``p > 0`` counts.

    Returns
    -------
    list of str
        One description per layer, e.g. ``"Dropout '2'"``; empty when there is none.
    """
    found = [
        f"{type(mod).__name__} {name!r}"
        for name, mod in model.named_modules()
        if isinstance(mod, _DROPOUTS) and mod.training and mod.p > 0
    ]
    graph = _graph_of(model)
    found.extend(
        f"dropout call {node.name!r}"
        for node, p, train in _dropout_calls(graph)
        if train is True and p != 0
    )
    return found


def _dropout_calls(graph: fx.Graph | None) -> list[tuple[fx.Node, object, object]]:
    """The dropout calls of ``graph`` (none for ``None``), each with its ``p`` and its
    ``train`` argument (``F.dropout``'s defaults: 0.5 and ``True``)."""
    calls: list[tuple[fx.Node, object, object]] = []
    for node in graph.nodes if graph is not None else ():
        if node.op != "call_function" or node.target not in _DROPOUT_FUNCTIONS:
            continue
        position, keyword = _DROPOUT_FUNCTIONS[node.target]
        train = node.args[position] if len(node.args) > position else node.kwargs.get(keyword, True)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        calls.append((node, p, train))
    return calls


def dropout_layers_after(model: nn.Module, target: AttackTarget) -> list[str]:
    """The Dropout modules with ``p > 0`` in the model after the attacked layer
    (:attr:`AttackTarget.after`), in whichever mode (in eval mode they are the identity,
    but a client that trained with them active masked each example's gradient at random),
    and the functional dropout calls with ``p > 0`` in its graph.

    Returns
    -------
    list of str
        One description per module or call, e.g. ``"Dropout 'dropout2'"`` or ``"dropout
        call 'dropout'"``; empty when there is none or the model was not split at the
        layer.
    """
    return _dropouts_within(model, target.after)


def dropout_layers_before(model: nn.Module, target: AttackTarget) -> list[str]:
    """The Dropout modules and functional dropout calls with ``p > 0`` in the part of the
    model before the attacked layer (:attr:`AttackTarget.before`), in whichever mode: a
    client that trained with them active fed the layer its features with random entries
    zeroed and the others scaled by ``1 / (1 - p)``.

    Returns
    -------
    list of str
        As :func:`dropout_layers_after`; empty when there is none or no part before.
    """
    return _dropouts_within(model, target.before)


def _dropouts_within(model: nn.Module, part: object) -> list[str]:
    """The Dropout modules (``p > 0``) that ``part`` (a piece of ``model``) runs and the
    dropout calls (``p > 0``) of its graph, described."""
    found = [f"{type(mod).__name__} {name!r}" for name, mod in _dropout_modules_within(model, part)]
    graph = part.graph if isinstance(part, fx.GraphModule) else None
    found.extend(f"dropout call {node.name!r}" for node, p, _ in _dropout_calls(graph) if p != 0)
    return found


def dropout_modules_after(model: nn.Module, target: AttackTarget) -> list[tuple[str, nn.Module]]:
    """The Dropout modules with ``p > 0`` that the model after the attacked layer runs,
    with their names in ``model``, in whichever mode (see :func:`dropout_layers_after`)."""
    return _dropout_modules_within(model, target.after)


def _dropout_modules_within(model: nn.Module, part: object) -> list[tuple[str, nn.Module]]:
    """The Dropout modules with ``p > 0`` that ``part`` (a piece of ``model``) runs, with
    their names in ``model``; none where ``part`` is no module."""
    if not isinstance(part, nn.Module):
        return []
    return [
        (name, mod)
        for name, mod in _named_modules_within(model, part)
        if isinstance(mod, _DROPOUTS) and mod.p > 0
    ]


def dropout_off(model: nn.Module) -> None:
    """Put every Dropout module of ``model`` in eval mode (the identity), in place.

    Where its ``torch.fx`` graph still drops units in a functional call
    (``F.dropout(h, p, training=self.training)``), every module but the normalisation
    layers is put in eval mode too (which module's ``training`` such a call reads is not
    recorded), unless that changes which layers normalise with the batch's own
    statistics (a functional ``F.batch_norm(..., training=self.training)``): then the
    modes are left as they were, and the attack refuses the model with what to do.
    """
    for module in model.modules():
        if isinstance(module, _DROPOUTS):
            module.eval()
    if not random_dropout_layers(model):
        return
    statistics = batch_statistics_layers(model)
    modes = {module: module.training for module in model.modules()}
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            module.training = False
    if batch_statistics_layers(model) != statistics:
        for module, mode in modes.items():
            module.training = mode


def check_dropout(model: nn.Module) -> None:
    """Refuse a model whose Dropout layers drop random units (training mode).

    In training mode every forward pass drops other random units, so the model spear
    runs is not the one that computed the update: no reconstruction can be found or
    certified. In eval mode Dropout is the identity and is accepted.

    Raises
    ------
    NotAttackableError
        When :func:`random_dropout_layers` finds any, naming them and what to try.
    """
    layers = random_dropout_layers(model)
    if not layers:
        return
    verb = "drops" if len(layers) == 1 else "drop"
    raise NotAttackableError(
        f"{', '.join(layers)} {verb} random units (training mode): every forward pass "
        "then runs another network, so the update cannot be recomputed and nothing can be "
        "reconstructed or certified. Pass the model in eval mode: model.eval() (for a "
        "torch.export program, export model.eval()); Dropout is then the identity. The "
        "masks of an update the client computed with dropout active are read off the update "
        "where a Dropout (an nn.Dropout, or F.dropout(h, p, training=self.training)) "
        "directly follows the attacked layer's ReLU."
    )


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` computes ``max(h, 0)`` of its first argument ``h``: a ReLU, a
    LeakyReLU of slope 0, or a clamp at 0 from below with no upper bound."""
    if node.op == "call_module":
        return _is_relu_module(modules[str(node.target)])
    if node.op == "call_function":
        if node.target in _CLAMP_FUNCTIONS:
            return _clamps_at_zero(node)
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        if node.target in _CLAMP_METHODS:
            return _clamps_at_zero(node)
        return node.target in ("relu", "relu_")
    return False


def _is_relu_module(module: nn.Module | None) -> bool:
    """Whether ``module`` is a ReLU or a LeakyReLU of slope 0."""
    return isinstance(module, _RELU_MODULES) or (
        isinstance(module, nn.LeakyReLU) and module.negative_slope == 0.0
    )


def _clamps_at_zero(node: fx.Node) -> bool:
    """Whether a ``clamp(h, min, max)`` or ``clamp_min(h, min)`` call ``node`` has
    ``min == 0`` and no ``max``."""
    names = (
        ("min",)
        if str(getattr(node.target, "__name__", node.target)).startswith("clamp_min")
        else ("min", "max")
    )
    given = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
    low = given.get("min")
    return isinstance(low, (int, float)) and low == 0 and given.get("max") is None


def _is_batch_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _BATCH_NORMS)
    return node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _is_reshape(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` passes every element of its tensor on, in order (a view, a cast);
    indexing that selects, drops or reorders entries is no reshape."""
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _RESHAPE_MODULES)
    if node.op == "call_function":
        if node.target is operator.getitem:
            return len(node.args) == 2 and _keeps_every_element(node.args[1])
        if node.target is getattr:
            return len(node.args) == 2 and node.args[1] == "data"
        return node.target in _RESHAPE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS or node.target == "size"
    return False


def _keeps_every_element(index: object) -> bool:
    """Whether ``tensor[index]`` is a view of every element: full slices, ``None`` and
    ``...`` only (``x[:, None]``), not a bounded slice, an integer or an index tensor."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(
        part is None or part is Ellipsis or part == slice(None, None, None) for part in parts
    )


def _reaches_input_by_reshapes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is the model input passed through reshapes only."""
    if node.op == "placeholder":
        return True
    if not _is_reshape(node, modules):
        return False
    tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
    if not tensor_args:
        return False
    # the first argument carries the tensor; the others are sizes (x.size(0), ...)
    return _reaches_input_by_reshapes(tensor_args[0], modules)


def _tail(traced: fx.GraphModule, start: fx.Node) -> fx.GraphModule | None:
    """A GraphModule computing the model output from ``start``'s value (its one input)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("value")}
    for node in traced.graph.nodes:
        if node in env or node.op == "placeholder":
            continue
        deps = node.all_input_nodes
        if not all(d in env for d in deps):
            if node.op == "output":
                return None
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    if not any(n.op == "output" for n in graph.nodes):
        return None
    return fx.GraphModule(traced, graph)


def _head(traced: fx.GraphModule, stop: fx.Node) -> fx.GraphModule | None:
    """A GraphModule computing ``stop``'s value from the model input (the first
    placeholder), or ``None`` when ``stop`` needs anything else."""
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {placeholders[0]: graph.placeholder("x")}
    for node in traced.graph.nodes:
        if node in env or node.op in ("placeholder", "output"):
            continue
        if all(d in env for d in node.all_input_nodes):
            env[node] = graph.node_copy(node, lambda n: env[n])
        if node is stop:
            break
    if stop not in env:
        return None
    graph.output(env[stop])
    head = fx.GraphModule(traced, graph)
    head.graph.eliminate_dead_code()
    head.recompile()
    return head


def find_target(model: nn.Module, layer: str | None = None) -> AttackTarget:
    """The first ``nn.Linear`` followed by a ReLU, in the order the model computes, or the
    one named ``layer``.

    Parameters
    ----------
    model:
        Any ``nn.Module`` that ``torch.fx`` can trace, or an ``nn.Sequential``.
    layer:
        Name of the linear layer to attack (its parameters are ``layer + ".weight"``,
        ``".bias"``), e.g. ``"fc2"`` for a deeper layer; ``None``: the first that
        qualifies.

    Returns
    -------
    AttackTarget

    Raises
    ------
    NotAttackableError
        When no layer qualifies, or ``layer`` is not a linear layer followed by a ReLU;
        the message names every layer examined and why.
    """
    if layer is not None and not isinstance(layer, str):
        raise InputError(
            f"layer must be a layer's name, a str such as 'fc2' or, in an nn.Sequential, "
            f"'1'; found {type(layer).__name__} {layer!r}. Pass layer={str(layer)!r} for "
            "the child of that name, or no layer to attack the first linear layer "
            "followed by a ReLU."
        )
    modules = dict(model.named_modules())
    if isinstance(model, fx.GraphModule):
        traced = model
    else:
        try:
            traced = fx.symbolic_trace(model)
        except Exception as exc:
            if isinstance(model, nn.Sequential):
                return _find_in_sequential(model, layer)
            raise NotAttackableError(
                f"could not trace {type(model).__name__} with torch.fx ({exc}); make "
                "forward() traceable (no data-dependent control flow), export it with "
                "torch.export, or pass an nn.Sequential."
            ) from exc
    examined: list[str] = []
    batch_norm = False
    input_shape = _recorded_input_shape(traced)
    for node in traced.graph.nodes:
        found = _as_linear(node, modules, traced)
        if found is None:
            continue
        name, weight, bias, weight_param, bias_param = found
        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], modules):
            if layer is not None and name != layer:
                examined.append(f"{name}: Linear followed by ReLU, not the layer asked for")
                continue
            feature_node = node.args[0]
            assert isinstance(feature_node, fx.Node)
            first = _reaches_input_by_reshapes(feature_node, modules)
            examined.append(f"{name}: Linear followed by ReLU -> attacked")
            return AttackTarget(
                name=name,
                weight=weight,
                bias=bias,
                first=first,
                after=_tail(traced, node),
                input_shape=input_shape if first else None,
                examined=examined,
                before=_head(traced, feature_node),
                weight_param=weight_param,
                bias_param=bias_param,
            )
        after = ", ".join(_describe(u, modules) for u in users) or "nothing"
        smooth = any(
            u.op == "call_module" and isinstance(modules[str(u.target)], _SMOOTH) for u in users
        )
        if any(_is_batch_norm(u, modules) for u in users):
            reason, batch_norm = "BatchNorm between the layer and its activation", True
        else:
            reason = "an activation with no exact zeros" if smooth else "not a ReLU"
        examined.append(f"{name}: Linear followed by {after}, {reason}")
    listing = "; ".join(examined) if examined else "no linear layer at all"
    if layer is not None:
        raise _not_the_layer(layer, listing)
    raise NotAttackableError(
        f"no linear layer followed by a ReLU in {type(model).__name__} (examined: "
        f"{listing}). The attack needs a linear layer whose output goes straight into a "
        f"ReLU.{_FOLD_HINT if batch_norm else ''}"
    )


def _as_linear(
    node: fx.Node, modules: dict[str, nn.Module], traced: fx.GraphModule
) -> tuple[str, torch.Tensor, torch.Tensor | None, str | None, str | None] | None:
    """``(name, weight, bias, weight_param, bias_param)`` when ``node`` applies a linear
    layer, else ``None`` (the parameters' names for a functional layer, see
    :class:`AttackTarget`)."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, nn.Linear):
            return str(node.target), mod.weight, mod.bias, None, None
        return None
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
            return None
        wname = str(weight_node.target)
        weight = _parameter(traced, wname)
        if weight is None or weight.dim() != 2:
            return None
        bias, bname = None, None
        if isinstance(bias_node, fx.Node) and bias_node.op == "get_attr":
            bname = str(bias_node.target)
            bias = _parameter(traced, bname)
            if bias is None:
                return None
        path, _, attribute = wname.rpartition(".")
        name = path if attribute == "weight" else wname
        return name, weight, bias, wname, bname
    return None


def _parameter(traced: fx.GraphModule, name: str) -> torch.Tensor | None:
    """The parameter ``name`` of ``traced``; ``None`` for a buffer or constant (a layer
    whose weight is no parameter sends no gradient for it)."""
    try:
        return traced.get_parameter(name)
    except AttributeError:
        return None


def _recorded_input_shape(traced: fx.GraphModule) -> tuple[int, ...] | None:
    """Shape of one input as recorded by torch.export (placeholder metadata), if any."""
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and len(shape) >= 2:
                try:
                    return tuple(int(d) for d in shape[1:])
                except TypeError:
                    return None
            return None
    return None


def _not_the_layer(layer: str, listing: str) -> NotAttackableError:
    """The error for a ``layer=`` that names no linear layer followed by a ReLU."""
    return NotAttackableError(
        f"layer {layer!r} is not a linear layer followed by a ReLU (examined: {listing}). "
        "Name one of the layers marked 'followed by ReLU', or pass no layer to attack the "
        "first."
    )


def _find_in_sequential(model: nn.Sequential, layer: str | None = None) -> AttackTarget:
    """Fallback for untraceable Sequential models: scan the children in order."""
    children = list(model.named_children())
    examined: list[str] = []
    batch_norm = False
    for i, (name, child) in enumerate(children):
        if not isinstance(child, nn.Linear):
            continue
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if _is_relu_module(nxt):
            if layer is not None and name != layer:
                examined.append(f"{name}: Linear followed by ReLU, not the layer asked for")
                continue
            first = all(isinstance(c, _RESHAPE_MODULES) for _, c in children[:i])
            rest = nn.Sequential(*[c for _, c in children[i + 1 :]])
            head = nn.Sequential(*[c for _, c in children[:i]])
            examined.append(f"{name}: Linear followed by ReLU -> attacked")
            return AttackTarget(
                name=name,
                weight=child.weight,
                bias=child.bias,
                first=first,
                after=rest,
                examined=examined,
                before=head,
            )
        batch_norm = batch_norm or isinstance(nxt, _BATCH_NORMS)
        examined.append(f"{name}: Linear followed by {type(nxt).__name__}, not a ReLU")
    if layer is not None:
        raise _not_the_layer(layer, "; ".join(examined) or "none")
    raise NotAttackableError(
        f"no linear layer followed by a ReLU (examined: {'; '.join(examined) or 'none'})."
        f"{_FOLD_HINT if batch_norm else ''}"
    )


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float64 when it has none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float64


def guess_input_shape(features: int) -> tuple[int, ...]:
    """A plausible image shape for ``features`` flattened inputs.

    ``s*s`` -> ``(1, s, s)``; ``3*s*s`` -> ``(3, s, s)``; otherwise ``(features,)``.

    Examples
    --------
    >>> guess_input_shape(784), guess_input_shape(3072), guess_input_shape(10)
    ((1, 28, 28), (3, 32, 32), (10,))
    """
    side = math.isqrt(features)
    if side * side == features and side >= 8:
        return (1, side, side)
    if features % 3 == 0:
        side = math.isqrt(features // 3)
        if 3 * side * side == features and side >= 8:
            return (3, side, side)
    return (features,)
