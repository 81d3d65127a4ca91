"""Clients that train with Dropout active: masks read off the update, checked end to end.

A Dropout right after the attacked layer's ReLU zeroes random units of each example's
gradient column; the masks that matter are those zeros on units the example turns on, so
``spear.attack`` reads them off the recovered columns and recomputes the whole update with
them. Every case is checked against the truth (the masks included).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import assert_exact, fashion, match_rows, problem_from
from torch import nn

import spear
from spear.auditor import AuditOptions, UpdateAuditor
from spear.candidates import certified_by
from spear.certificate import certify, verified_threshold
from spear.client import fedavg_update
from spear.data import rgb_patches, sample_batch
from spear.downstream import Downstream
from spear.dropout import direct_dropout, dropout_scales, masks_applied, refined_scales
from spear.files import load_model
from spear.inversion.problem import MaskedModel
from spear.inversion.steps import cone
from spear.labels import label_fit_tol, recover_labels
from spear.model import dropout_layers_after, dropout_layers_before, find_target
from spear.results import LayerReconstruction

#: Largest error of a float32 reconstruction that counts as exact ([0, 1] pixels).
EXACT32 = 1e-4


def dropout_mlp(
    p: float, dtype: torch.dtype, *, seed: int = 0, deep: bool = False
) -> nn.Sequential:
    """``784 -> 256 -> 128 -> 10`` with ``Dropout(p)`` after the first ReLU (``deep``:
    after the second)."""
    torch.manual_seed(seed)
    first: list[nn.Module] = [nn.Linear(784, 256), nn.ReLU()]
    second: list[nn.Module] = [nn.Linear(256, 128), nn.ReLU()]
    (second if deep else first).append(nn.Dropout(p))
    return nn.Sequential(nn.Flatten(), *first, *second, nn.Linear(128, 10)).to(dtype)


def client_update(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, *, train: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The FedSGD update (mean cross-entropy) with the model in training mode, and the
    Dropout right after the first ReLU's keep mask ``(b, m)`` (``None`` if there is none)."""
    model.train(train)
    seen: list[torch.Tensor] = []
    direct = isinstance(model[3], nn.Dropout)
    handle = model[3].register_forward_hook(
        lambda _m, args, out: seen.append((out != 0) | (args[0] == 0)) if direct else None
    )
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    handle.remove()
    model.eval()
    keep = seen[0] if direct else None
    return {n: g.detach().clone() for n, g in zip(params, grads, strict=True)}, keep


@pytest.mark.parametrize(
    ("dtype", "p", "b"),
    [(torch.float64, 0.5, 8), (torch.float64, 0.2, 16), (torch.float32, 0.5, 16)],
)
def test_attack_reads_the_masks_and_verifies(dtype: torch.dtype, p: float, b: int) -> None:
    model = dropout_mlp(p, dtype)
    x, y = fashion(b, seed=1)
    update, _ = client_update(model, x.to(dtype), y)
    rec = spear.attack(model, update, time_budget=60)
    assert rec.complete and rec.verified
    assert rec.certificate is not None and rec.certificate <= verified_threshold(dtype)
    matching = assert_exact(rec.inputs, x, rel=1e-8 if dtype == torch.float64 else EXACT32)
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])
    assert rec.layer_result is not None and rec.layer_result.dropout
    assert any("active: each example's mask is read off" in n for n in rec.notes)


def layer_solved_for_dropout(
    b: int, seed: int
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, LayerReconstruction]:
    """A float64 client with ``Dropout(0.5)`` active, its inputs ``(b, 1, 28, 28)``, its
    keep mask ``(b, 256)`` and the first layer solved with ``dropout=True``."""
    model = dropout_mlp(0.5, torch.float64)
    x, y = fashion(b, seed=seed)
    update, keep = client_update(model, x, y)
    assert keep is not None
    layer = model[1]
    res = spear.invert_layer(
        update["1.weight"],
        update["1.bias"],
        weight=layer.weight.detach(),
        bias=layer.bias.detach(),
        dropout=True,
    )
    return model, x, keep, res


def test_masks_read_off_the_columns_are_the_clients() -> None:
    model, x, keep, res = layer_solved_for_dropout(16, 2)
    layer = model[1]
    assert res.complete and res.dropout and not res.verified
    matching = match_rows(res.inputs, x)
    pre = layer(res.inputs.to(torch.float64)).detach()
    scales = dropout_scales(pre, res.output_grads, 0.5, float(torch.finfo(torch.float64).eps))
    on = pre > 0
    truth = keep[matching.truth_index].to(torch.float64) / 0.5
    rows = torch.as_tensor(matching.rec_index)
    assert torch.equal(scales[rows][on[rows]], truth[on[rows]])
    assert bool((scales == 0).any())


def test_an_ambiguous_entry_is_read_by_the_label_fit() -> None:
    model, x, keep, res = layer_solved_for_dropout(8, 6)
    layer = model[1]
    matching = match_rows(res.inputs, x)
    i = int(matching.rec_index[0])
    pre = layer(res.inputs).detach()
    truth = keep[int(matching.truth_index[0])]
    unit = int(torch.nonzero((pre[i] > 0) & ~truth)[0])
    columns = res.output_grads.clone()
    # a dropped unit's entry raised to 100 times the column's noise floor: read as kept
    floor = float(columns[:, i].abs()[pre[i] < 0].max())
    columns[unit, i] = 100 * floor
    eps = float(torch.finfo(torch.float64).eps)
    first = dropout_scales(pre, columns, 0.5, eps)
    assert float(first[i, unit]) == 2.0

    def misfit(k: int, row: torch.Tensor) -> float:
        fitted = recover_labels(
            model[2:],
            layer.weight.detach(),
            layer.bias.detach(),
            res.inputs[k : k + 1],
            res.output_grads[:, k : k + 1],
            unit_scales=row[None],
        )
        return float(fitted.fit_error[0])

    assert misfit(i, first[i]) > label_fit_tol(torch.float64)
    mended = refined_scales(first, pre, columns, eps, misfit, label_fit_tol(torch.float64))
    assert float(mended[i, unit]) == 0.0
    assert misfit(i, mended[i]) <= label_fit_tol(torch.float64)


def test_a_wrong_mask_fails_the_certificate() -> None:
    model = dropout_mlp(0.5, torch.float64)
    x, y = fashion(8, seed=3)
    update, keep = client_update(model, x, y)
    assert keep is not None
    target = find_target(model, None)
    found = direct_dropout(model, target)
    assert found is not None and found.name == "3" and found.p == 0.5
    scales = keep.to(torch.float64) / 0.5
    activations = torch.relu(model[1](x.flatten(1))).detach()
    with masks_applied(found, activations, scales):
        right = certify(model, update, x, y)
    flipped = scales.clone()
    unit = int(torch.nonzero((activations[0] > 0) & (scales[0] > 0))[0])
    flipped[0, unit] = 0.0  # one kept unit of one example read as dropped
    with masks_applied(found, activations, flipped):
        wrong = certify(model, update, x, y)
    plain = certify(model, update, x, y)
    assert right <= verified_threshold(torch.float64)
    assert wrong > 1e3 * verified_threshold(torch.float64)
    assert plain > 1e3 * verified_threshold(torch.float64)


def test_a_client_with_dropout_off_is_read_as_such() -> None:
    model = dropout_mlp(0.5, torch.float64)
    x, y = fashion(16, seed=4)
    update, _ = client_update(model, x, y, train=False)
    rec = spear.attack(model, update, time_budget=60)
    assert rec.verified
    assert_exact(rec.inputs, x)
    assert not any("active: each example's mask" in n for n in rec.notes)


def test_a_deeper_dropout_is_never_verified() -> None:
    model = dropout_mlp(0.5, torch.float64, deep=True)
    x, y = fashion(8, seed=5)
    update, _ = client_update(model, x, y)
    target = find_target(model, None)
    assert direct_dropout(model, target) is None
    rec = spear.attack(model, update, time_budget=20)
    assert not rec.verified
    assert rec.certificate is not None and rec.certificate > 1e-3
    assert_exact(rec.inputs, x)
    assert rec.inputs.shape[0] == 8
    assert any("without the model after the layer" in n for n in rec.notes)


def test_direct_dropout_needs_the_relu_output() -> None:
    torch.manual_seed(0)
    alpha = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.AlphaDropout(0.5), nn.Linear(30, 4))
    assert direct_dropout(alpha.eval(), find_target(alpha, None)) is None
    plain = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Dropout(0.3), nn.Linear(30, 4))
    found = direct_dropout(plain.eval(), find_target(plain, None))
    assert found is not None and found.p == 0.3


class DropoutCnn(nn.Module):
    """Flower's tutorial CNN with ``Dropout(0.5)`` after ``fc1``'s ReLU (float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.double()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, 400)``: what enters ``fc1``."""
        x = self.pool(torch.relu(self.conv1(x)))
        return torch.flatten(self.pool(torch.relu(self.conv2(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.fc1(self.features(x))))
        return self.fc3(torch.relu(self.fc2(h)))


def test_conv_net_features_come_back_with_their_labels() -> None:
    net = DropoutCnn()
    x, y = sample_batch(rgb_patches(200), 4, 0)
    x = x.to(torch.float64)
    net.train()
    params = dict(net.named_parameters())
    loss = nn.functional.cross_entropy(net(x), y)
    update = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    net.eval()
    rec = spear.attack(net, update, time_budget=60, image_budget=0)
    assert rec.feature_space and rec.complete
    assert not rec.verified  # features: no end-to-end certificate
    matching = assert_exact(rec.inputs, net.features(x).detach())
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])
    assert rec.layer_result is not None and rec.layer_result.dropout
    assert any("'drop' (p = 0.5) active" in n for n in rec.notes)


def audit_in_training_mode(
    model: nn.Module, update: dict[str, torch.Tensor], folder: Path
) -> dict[str, object]:
    """The audit record of ``update`` for ``model`` left in training mode, as a training
    loop leaves it (the auditor runs Dropout as the identity on its copy)."""
    model.train()
    sent = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    returned = {name: g.numpy() for name, g in update.items()}
    auditor = UpdateAuditor(model, folder, AuditOptions(update_kind="gradient"))
    return auditor.attack_update(1, "client-0", sent, returned)


def test_an_audit_of_a_model_in_training_mode_reads_the_masks(tmp_path: Path) -> None:
    model = dropout_mlp(0.5, torch.float64)
    x, y = fashion(8, seed=7)
    update, _ = client_update(model, x, y)
    record = audit_in_training_mode(model, update, tmp_path)
    assert record["error"] is None
    assert record["recovered"] == 8 and record["verified"]
    assert model.training  # the user's model is left as it was


def test_fedavg_deltas_come_back_exact_and_unverified() -> None:
    # one epoch in mini-batches: each example is used once, with its own mask
    model = dropout_mlp(0.5, torch.float64)
    x, y = fashion(16, seed=8)
    model.train()
    delta = fedavg_update(model, x, y, epochs=1, batch_size=8, lr=0.1, seed=0)
    model.eval()
    rec = spear.attack(model, delta, update_kind="delta", time_budget=60)
    assert rec.complete
    assert_exact(rec.inputs, x, rel=1e-8)
    # a delta's certificate checks a span, which mixtures of the examples share: the
    # one-sided pattern check does not verify them
    assert not rec.examples_verified and not rec.verified


class FunctionalDropoutMlp(nn.Module):
    """``784 -> 256 -> 128 -> 10`` with ``F.dropout(h, p, training=self.training)`` after
    the first ReLU (``deep``: after the second), as many models write it."""

    def __init__(
        self, p: float, dtype: torch.dtype, *, deep: bool = False, form: str = "F.dropout"
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p, self.deep, self.form = p, deep, form
        self.register_buffer("p_tensor", torch.tensor(p))
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)
        self.to(dtype)

    def drop(self, h: torch.Tensor) -> torch.Tensor:
        """The dropout call in the form ``form`` names."""
        if self.form == "torch.dropout":
            return torch.dropout(h, self.p, self.training)
        if self.form == "tensor p":
            return nn.functional.dropout(h, self.p_tensor, training=self.training)
        if self.form == "aten.native_dropout":
            return torch.ops.aten.native_dropout.default(h, self.p, self.training)[0]
        return nn.functional.dropout(h, self.p, training=self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        if not self.deep:
            h = self.drop(h)
        h = torch.relu(self.fc2(h))
        if self.deep:
            h = self.drop(h)
        return self.fc3(h)


def functional_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The FedSGD update (mean cross-entropy) computed in training mode; the model is left
    in eval mode."""
    model.train()
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    model.eval()
    return {n: g.detach().clone() for n, g in zip(params, grads, strict=True)}


@pytest.mark.parametrize(("dtype", "b"), [(torch.float64, 16), (torch.float32, 8)])
def test_a_functional_dropout_call_is_read_and_verified(dtype: torch.dtype, b: int) -> None:
    model = FunctionalDropoutMlp(0.5, dtype)
    x, y = fashion(b, seed=9)
    x = x.to(dtype)
    update = functional_update(model, x, y)
    found = direct_dropout(model, find_target(model, None))
    assert found is not None and found.module is None and found.p == 0.5
    rec = spear.attack(model, update, time_budget=60)
    assert rec.complete and rec.verified
    matching = assert_exact(rec.inputs, x, rel=1e-8 if dtype == torch.float64 else EXACT32)
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])
    assert any("the dropout call 'dropout' (p = 0.5) active" in n for n in rec.notes)


@pytest.mark.parametrize("form", ["torch.dropout", "tensor p", "aten.native_dropout"])
def test_other_forms_of_the_dropout_call_are_read_and_verified(form: str) -> None:
    model = FunctionalDropoutMlp(0.5, torch.float32, form=form)
    x, y = fashion(8, seed=9)
    x = x.float()
    update = functional_update(model, x, y)
    model.train()
    assert spear.model.random_dropout_layers(model)  # the graph shows the call
    model.eval()
    found = direct_dropout(model, find_target(model, None))
    assert found is not None and found.module is None and found.p == 0.5
    rec = spear.attack(model, update, time_budget=60)
    assert rec.complete and rec.verified
    matching = assert_exact(rec.inputs, x, rel=EXACT32)
    assert rec.labels is not None
    assert torch.equal(rec.labels[matching.rec_index], y[matching.truth_index])


def test_an_exported_program_with_dropout_is_read_and_verified(tmp_path: Path) -> None:
    # torch.export in eval mode keeps the call as aten.dropout(h, p, train=False); the
    # program is exported for a fixed batch and read back as a user's file is
    model = FunctionalDropoutMlp(0.2, torch.float64)
    x, y = fashion(12, seed=10)
    update = functional_update(model, x, y)
    torch.export.save(torch.export.export(model, (x[:4],)), tmp_path / "model.pt2")
    exported = load_model(tmp_path / "model.pt2")
    rec = spear.attack(exported, update, time_budget=60)
    assert rec.complete and rec.verified
    assert_exact(rec.inputs, x, rel=1e-8)


def test_a_wrong_functional_mask_fails_the_certificate() -> None:
    model = FunctionalDropoutMlp(0.5, torch.float64)
    x, y = fashion(6, seed=11)
    model.train()
    torch.manual_seed(3)
    h = torch.relu(model.fc1(x.flatten(1)))
    keep = (nn.functional.dropout(torch.ones_like(h), 0.5) > 0).to(torch.float64)
    params = dict(model.named_parameters())
    logits = model.fc3(torch.relu(model.fc2(h * keep / 0.5)))
    grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y), list(params.values()))
    update = {n: g.detach() for n, g in zip(params, grads, strict=True)}
    model.eval()
    found = direct_dropout(model, find_target(model, None))
    assert found is not None
    activations = h.detach()
    scales = keep / 0.5
    with masks_applied(found, activations, scales):
        right = certify(model, update, x, y)
    flipped = scales.clone()
    unit = int(torch.nonzero((activations[0] > 0) & (scales[0] > 0))[0])
    flipped[0, unit] = 0.0
    with masks_applied(found, activations, flipped):
        wrong = certify(model, update, x, y)
    assert right <= verified_threshold(torch.float64)
    assert wrong > 1e3 * verified_threshold(torch.float64)


def test_a_deeper_functional_dropout_is_searched_again_and_never_verified() -> None:
    model = FunctionalDropoutMlp(0.5, torch.float64, deep=True)
    x, y = fashion(8, seed=12)
    update = functional_update(model, x, y)
    target = find_target(model, None)
    assert direct_dropout(model, target) is None
    assert dropout_layers_after(model, target) == ["dropout call 'dropout'"]
    rec = spear.attack(model, update, time_budget=20)
    assert not rec.verified
    assert_exact(rec.inputs, x)
    assert rec.inputs.shape[0] == 8
    assert any("without the model after the layer" in n for n in rec.notes)


def test_an_audit_turns_functional_dropout_off(tmp_path: Path) -> None:
    model = FunctionalDropoutMlp(0.5, torch.float64)
    x, y = fashion(8, seed=13)
    update = functional_update(model, x, y)
    record = audit_in_training_mode(model, update, tmp_path)
    assert record["error"] is None
    assert record["recovered"] == 8 and record["verified"]
    assert model.training


def test_a_dropout_before_the_layer_returns_what_the_layer_saw() -> None:
    # input dropout: the layer sees each image with a random share of its pixels zeroed
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)
    ).double()
    x, y = fashion(8, seed=14)
    seen: list[torch.Tensor] = []
    handle = model[1].register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    model.train()
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    handle.remove()
    model.eval()
    update = {n: g.detach() for n, g in zip(params, grads, strict=True)}
    target = find_target(model, None)
    assert dropout_layers_before(model, target) == ["Dropout '1'"]
    rec = spear.attack(model, update, time_budget=30, image_budget=0)
    assert rec.feature_space and rec.complete and not rec.verified
    assert_exact(rec.inputs, seen[0])
    assert bool((seen[0] == 0).sum() > (x == 0).sum())  # the masks are in what it saw
    assert any("Dropout '1' comes before the attacked layer" in n for n in rec.notes)


def test_the_input_side_checks_a_vertex_with_the_mask_its_column_shows() -> None:
    # With a Dropout active after fc1, the model after the layer in eval mode does not
    # reproduce the client's pass, so a true example fails its checks there; run with
    # the mask its own column shows (units on with a zero entry dropped, the others
    # scaled by 1 / (1 - p)) it passes, and the same example at 1.5 times its scale
    # (the same peel, column divided by 1.5) does not
    net = DropoutCnn()
    x, y = sample_batch(rgb_patches(200), 8, 1)
    x = x.to(torch.float64)
    net.train()
    torch.manual_seed(3)
    params = dict(net.named_parameters())
    loss = nn.functional.cross_entropy(net(x), y)
    update = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    net.eval()
    target = find_target(net)
    assert target.after is not None and target.bias is not None
    weight, bias = target.weight.detach(), target.bias.detach()
    model = Downstream(target.after, weight, bias, torch.float64)
    problem = problem_from(
        update["fc1.weight"], update["fc1.bias"], weight, bias, masked=MaskedModel(model, 0.5)
    )
    assert problem.layer is not None and problem.rank == 8
    assert problem.downstream is None and cone.has_input_side(problem)
    truth = net.features(x).detach()
    coords = torch.linalg.lstsq(problem.layer.right.T, truth.T).solution.T  # (b, b)
    columns = torch.linalg.lstsq(coords.T, problem.fac.left.T).solution.T  # (m, b)
    certify = cone._masked_certify(problem)
    assert certify is not None
    in_eval_mode = 0
    for i in range(8):
        assert certify(coords[i], columns[:, i], True, False)
        assert not certify(1.5 * coords[i], columns[:, i] / 1.5, True, False)
        in_eval_mode += certified_by(problem, model, coords[i], columns[:, i], True, False)
    assert in_eval_mode < 8
    # without p nothing checks a vertex beyond the layer: the input side does not run
    bare = problem_from(update["fc1.weight"], update["fc1.bias"], weight, bias)
    assert not cone.has_input_side(bare)
