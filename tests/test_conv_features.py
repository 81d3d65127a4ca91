"""Exact features of small conv nets whose first linear layer sees bias-dominated inputs.

Conv features (norm 1 to 2 over 400 or 1024 entries) leave ``|W x|`` about the size of
the bias: most units of ``fc1`` are on, or off, for the whole batch, so an example's zero
set often leaves a kernel of several dimensions and the layer's own update holds a
continuum of batches that pass every pattern check. ``spear.attack`` passes the model
after the layer, whose Jacobians single out the true batch (:mod:`spear.downstream`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tests.conftest import assert_same_state, problem_from, state_snapshot

import spear
import spear.baselines.gradient_matching
import spear.images
from spear.client import fedsgd_update
from spear.data import rgb_patches, sample_batch
from spear.downstream import Downstream
from spear.inversion.checks import verified_indices
from spear.inversion.driver import unverify_merged, unverify_unshared_divisor
from spear.inversion.problem import Problem
from spear.inversion.solve import solve_complete
from spear.linalg import kernel
from spear.model import find_target
from spear.networks import FlowerCnn, build_cnn, pretrain
from spear.results import LayerReconstruction


def _batch(
    name: str, b: int, dtype: torch.dtype, seed: int = 0, *, trained: bool = False
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The network (``trained``: after :func:`spear.networks.pretrain` on the pool's second
    half), a FedSGD update on ``b`` RGB patches, the true features and labels.

    A trained float32 network is trained in float64 and rounded, and its update computed
    in float64 and rounded: float32 training and convolutions round differently on
    different CPUs, and the last bits of a trained network and of its update decide
    which examples of a hard batch merge or single out."""
    pool = rgb_patches(1000, seed=0)
    images, labels = sample_batch(pool.subset(500), b, seed=seed + 1)
    if trained:
        net = build_cnn(name, seed, dtype=torch.float64)
        pretrain(net, pool.images[500:], pool.labels[500:], seed=seed)
        update = {k: v.to(dtype) for k, v in fedsgd_update(net, images, labels).items()}
        net = net.to(dtype)
    else:
        net = build_cnn(name, seed, dtype=dtype)
        update = fedsgd_update(net, images.to(dtype), labels)
    images = images.to(dtype)
    with torch.no_grad():
        truth = net.features(images).to(torch.float64)  # type: ignore[operator]
    return net, update, truth, labels


def _assert_exact(
    rec: spear.Reconstruction, truth: torch.Tensor, labels: torch.Tensor, rel: float
) -> None:
    b = truth.shape[0]
    assert rec.feature_space
    assert rec.inputs.shape[0] == b
    found = rec.inputs.reshape(b, -1).to(torch.float64)
    match = spear.metrics.match(found, truth)
    assert spear.metrics.exact_rate(found, truth, rel_tol=rel, matching=match) == 1.0
    assert rec.labels is not None
    assert torch.equal(rec.labels[match.rec_index], labels[match.truth_index])
    # feature space: no end-to-end certificate; the layer's own verification holds
    assert rec.layer_result is not None
    assert rec.layer_result.verified


def test_flower_cnn_features_exact_at_b4() -> None:
    # features of norm 1-2 over 400 entries: |W x| is the size of the bias, 103 of the
    # 120 units are on (or off) for the whole batch, true columns have 6 to 11 zeros
    # among the 72 live units
    torch.manual_seed(0)
    net = FlowerCnn().to(torch.float64)
    images, labels = sample_batch(rgb_patches(1000, seed=0), 4, seed=1)
    images = images.to(torch.float64)
    update = fedsgd_update(net, images, labels)
    rec = spear.attack(net, update, time_budget=30, progress=False, image_budget=0)
    truth = net.features(images).detach()
    _assert_exact(rec, truth, labels, 1e-8)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_flower_cnn_features_exact_at_b8(dtype: torch.dtype, rel: float) -> None:
    # two of the eight zero sets leave a two-dimensional kernel: the layer alone cannot
    # single those examples out, their Jacobians can
    net, update, truth, labels = _batch("flower-cnn", 8, dtype)
    rec = spear.attack(net, update, time_budget=15, progress=False, image_budget=0)
    _assert_exact(rec, truth, labels, rel)


def test_vgg_cnn_features_exact_at_b8() -> None:
    net, update, truth, labels = _batch("vgg", 8, torch.float64)
    rec = spear.attack(net, update, time_budget=15, progress=False, image_budget=0)
    _assert_exact(rec, truth, labels, 1e-6)


def test_unidentifiable_batch_says_why() -> None:
    # untrained VGG-style CNN, b = 32: every gradient column lies in the range of the
    # head on the units every example turns on, plus the few units that separate the
    # batch, so the update has rank 24: the examples are not in it one by one, from
    # either side of the layer. Told b = 32, the attack says so with the numbers
    net, update, truth, labels = _batch("vgg", 32, torch.float64)
    rec = spear.attack(
        net,
        update,
        time_budget=4,
        progress=False,
        image_budget=6,
        input_range=(0.0, 1.0),
        batch_size=32,
    )
    assert rec.layer_result is not None
    assert not rec.complete
    assert any("rank 24 < batch_size=32" in n for n in rec.notes)
    note = next(n for n in rec.notes if "could not be identified" in n)
    missing = 24 - rec.inputs.shape[0]
    assert f"{missing} of the 24 examples" in note
    assert "of the 256 units, 147 are on for some example" in note
    assert "separate the batch" in note and "single-example rows" in note
    assert "23 independent live units" in note
    # whatever is returned is exact (never a wrong example marked verified)
    if rec.inputs.shape[0]:
        found = rec.inputs.reshape(rec.inputs.shape[0], -1).to(torch.float64)
        assert spear.metrics.exact_rate(found, truth, rel_tol=1e-6) * 32 == found.shape[0]
    # an image for every example: the recovered features' images, then gradient-matching
    # estimates of the missing examples, labelled from the head's gradient
    k = rec.inputs.shape[0]
    assert rec.images is not None and rec.images.shape == (32, 3, 32, 32)
    assert rec.images_from_features == k
    assert float(rec.images.min()) >= 0.0 and float(rec.images.max()) <= 1.0
    assert rec.image_labels is not None and rec.image_labels.shape == (32,)
    if rec.labels is not None:
        assert torch.equal(rec.image_labels[:k], rec.labels)
    assert any("gradient matching on the whole update" in n for n in rec.notes)
    # the labels of the batch from the head's gradient: most of the true multiset
    common = sum(
        min(int((rec.image_labels == c).sum()), int((labels == c).sum())) for c in range(10)
    )
    assert common >= 20


def test_a_duplicate_is_found_with_the_batch_size_given() -> None:
    # a duplicated example: the update shows 3 distinct examples of a batch of 4; told
    # b = 4, the attack still searches with its whole budget (a rank below b with a clear
    # gap is repeated examples, not noise) and counts the duplicate as found, not missing
    net = build_cnn("flower-cnn", 0, dtype=torch.float64)
    images, labels = sample_batch(rgb_patches(1000, seed=0).subset(500), 4, seed=1)
    images, labels = images.to(torch.float64), labels.clone()
    images[3], labels[3] = images[0], labels[0]
    update = fedsgd_update(net, images, labels)
    rec = spear.attack(net, update, batch_size=4, time_budget=30, progress=False, image_budget=2)
    _assert_exact(rec, net.features(images[:3]).detach(), labels[:3], 1e-8)
    assert any("example 0 appears 2 times" in n for n in rec.notes)
    assert rec.images is not None and rec.images.shape == (3, 3, 32, 32)
    assert rec.images_from_features == 3
    assert not any("gradient matching" in n for n in rec.notes)


def test_tiny_gradients_of_a_trained_float32_cnn_are_no_duplicates() -> None:
    # trained, b = 64, float32: the examples' directions fall from 1 to 1e-7 of the
    # largest, and the last one sinks into the rounding's band (0.09 eps * s_1, the
    # next value 0.04), so no clear rank gap shows anywhere. The attack keeps the 63
    # directions above the rounding, told the batch size or not, and reads the update as
    # exact float32, neither noisy nor holding duplicates; the mean's divisor counts the
    # missing example. What it returns is exact, and nothing is verified with an example
    # missing.
    net, update, truth, _ = _batch("flower-cnn", 64, torch.float32, trained=True)
    for told, note in ((None, "values after the first 63"), (64, "truncating at the 63")):
        rec = spear.attack(
            net, update, batch_size=told, time_budget=10, progress=False, image_budget=0
        )
        assert any("no clear rank gap" in n and note in n for n in rec.notes)
        assert not any("duplicates" in n or "noisy update" in n for n in rec.notes)
        assert any("a mean over 64 examples and the update shows 63" in n for n in rec.notes)
        assert rec.batch_size == 64
        k = rec.inputs.shape[0]
        assert k >= 1
        found = rec.inputs.reshape(k, -1).to(torch.float64)
        assert spear.metrics.exact_rate(found, truth, rel_tol=1e-3) == k / 64
        assert not rec.verified
        assert rec.layer_result is not None and not rec.layer_result.verified


def test_layer_checks_miss_a_shifted_batch_the_jacobians_catch() -> None:
    # a zero set whose kernel has two dimensions: its direction moved by a small
    # multiple of the other kernel vector, the batch solved with it passes every ReLU
    # pattern check (fact 12); the range of the Jacobians rejects it
    net, update, truth, _ = _batch("flower-cnn", 8, torch.float64)
    fc1 = net.fc1  # type: ignore[attr-defined]
    weight, bias = fc1.weight.detach(), fc1.bias.detach()

    def tail(z: torch.Tensor) -> torch.Tensor:
        return net.fc3(torch.relu(net.fc2(torch.relu(z))))  # type: ignore[operator]

    def problem(downstream: Downstream | None) -> Problem:
        return problem_from(
            update["fc1.weight"],
            update["fc1.bias"],
            weight,
            bias,
            time_budget=10.0,
            downstream=downstream,
        )

    plain, checked = problem(None), problem(Downstream(tail, weight, bias))
    basis, live = plain.original
    pre = truth @ weight.T.to(torch.float64) + bias.to(torch.float64)  # (b, m)
    coords = torch.linalg.lstsq(plain.fac.right.T, truth.T).solution.T  # truth = coords R
    true_cols = torch.linalg.lstsq(coords.T, plain.fac.left.T).solution.T  # L = G coords
    grads = true_cols / true_cols.norm(dim=0)
    q = basis.T @ grads
    shifted = None
    for i in range(8):
        zeros = (pre[i] <= 0) & live
        kern, _ = kernel(basis[zeros], plain.tol.degeneracy_tol)
        if kern.shape[1] < 2:
            continue
        other = kern - q[:, i : i + 1] @ (q[:, i : i + 1].T @ kern)
        move = torch.linalg.svd(other).U[:, 0]
        cols = q.clone()
        cols[:, i] = q[:, i] + 1e-3 * move
        shifted = basis @ (cols / cols.norm(dim=0))
        break
    assert shifted is not None, "this batch has a zero set with a two-dimensional kernel"
    solved = solve_complete(plain.fac.left, plain.bias_grad, shifted)
    assert solved is not None
    found, cols = solved
    off = ((found @ plain.fac.right)[:, None, :] - truth[None]).abs().amax(dim=2).min(dim=1)
    assert float(off.values.max()) > 1e-5  # the shifted batch is wrong ...
    assert len(verified_indices(plain, found.clone(), cols.clone(), live)) == 8  # ... passes
    assert len(verified_indices(checked, found.clone(), cols.clone(), live)) < 8  # ... caught


def test_examples_merged_by_float32_are_not_taken_for_a_duplicate() -> None:
    # untrained Flower CNN (seed 2), float32: examples 0 and 1 of this batch have the
    # same label and the same patterns after fc1, and logits that barely depend on the
    # input, so their gradient columns agree to about 3e-6; the update shows their mean
    # once with twice the column, which fits cross-entropy as an example counted twice
    net = build_cnn("flower-cnn", 2, dtype=torch.float32)
    images, labels = sample_batch(rgb_patches(1000, seed=0).subset(500), 16, seed=3)
    images, labels = images[[8, 10, 0, 1]].to(torch.float32), labels[[8, 10, 0, 1]]
    fc1 = net.fc1  # type: ignore[attr-defined]
    weight, bias = fc1.weight.detach(), fc1.bias.detach()

    def tail(z: torch.Tensor) -> torch.Tensor:
        return net.fc3(torch.relu(net.fc2(torch.relu(z))))  # type: ignore[operator]

    feats = net.features(images).detach()  # type: ignore[operator]
    pre = (feats @ weight.T + bias).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(tail(pre), labels)
    (cols,) = torch.autograd.grad(loss, pre)  # (4, m): each example's column
    feats, cols = feats.to(torch.float64), cols.to(torch.float64).T
    assert labels[0] == labels[1]
    gap = (cols[:, 0] / cols[:, 0].norm() - cols[:, 1] / cols[:, 1].norm()).norm()
    assert float(gap) < 1e-4
    downstream = Downstream(tail, weight, bias)
    assert not bool(downstream.repeated(feats, cols).any())
    merged = torch.stack([(feats[0] + feats[1]) / 2, feats[2], feats[3]])
    merged_cols = torch.stack([cols[:, 0] + cols[:, 1], cols[:, 2], cols[:, 3]], dim=1)
    assert downstream.repeated(merged, merged_cols).tolist() == [True, False, False]
    # the pair alone looks like a batch of one, unless the batch size (4) is known
    assert downstream.repeated(merged[:1], merged_cols[:, :1]).tolist() == [False]
    assert downstream.repeated(merged[:1], merged_cols[:, :1], 4).tolist() == [True]
    # divisors of no plain mean or sum (per-example clipping) flag nothing
    clipped = merged_cols * torch.tensor([1.0, 0.37, 1.0], dtype=torch.float64)
    assert not bool(downstream.repeated(merged, clipped).any())
    # the whole attack: whatever it returns, the merged example is not verified
    update = fedsgd_update(net, images, labels)
    rec = spear.attack(net, update, time_budget=20, progress=False, image_budget=0)
    assert rec.layer_result is not None
    if rec.layer_result.found:
        truth = net.features(images).detach().to(torch.float64)  # type: ignore[operator]
        found = rec.inputs.reshape(rec.inputs.shape[0], -1).to(torch.float64)
        wrong = spear.metrics.exact_rate(found, truth, rel_tol=1e-3) * 4 < found.shape[0]
        assert not (wrong and rec.layer_result.verified)


@pytest.mark.parametrize(("reduction", "copies_allowed"), [("mean", False), ("sum", True)])
def test_a_mean_over_the_distinct_examples_holds_no_copies(
    reduction: str, copies_allowed: bool
) -> None:
    # a column that fits cross-entropy with half the plain divisor is an example counted
    # twice in a sum; in a mean over as many examples as the update shows distinct ones
    # it cannot be (a copy would add to the count). Measured on the untrained VGG-style
    # CNN (seed 2, float64, b = 4): a mixture fitted the divisor 4 / 2 and came back as
    # "example 2 appears 2 times" in place of a missing example
    net = build_cnn("flower-cnn", 0, dtype=torch.float64)
    images, labels = sample_batch(rgb_patches(1000, seed=0).subset(500), 4, seed=1)
    fc1 = net.fc1  # type: ignore[attr-defined]
    weight, bias = fc1.weight.detach(), fc1.bias.detach()

    def tail(z: torch.Tensor) -> torch.Tensor:
        return net.fc3(torch.relu(net.fc2(torch.relu(z))))  # type: ignore[operator]

    feats = net.features(images.to(torch.float64)).detach()  # type: ignore[operator]
    pre = (feats @ weight.T + bias).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(tail(pre), labels, reduction=reduction)
    (cols,) = torch.autograd.grad(loss, pre)
    cols = cols.T  # (m, 4)
    downstream = Downstream(tail, weight, bias)
    assert downstream.plain_fit(feats, cols, 4).all()
    doubled = 2.0 * cols
    assert not downstream.plain_fit(feats, doubled, 4).any()
    copies = downstream.plain_fit(feats, doubled, 4, duplicates=True)
    assert copies.tolist() == [copies_allowed] * 4


def test_no_sparse_direction_behind_a_relu_is_a_partial_result_not_an_error() -> None:
    # trained VGG-style CNN, float32, b = 8: the update shows rank 4 (confident
    # examples' gradients sink under float32 rounding) and sampling finds no sparse
    # direction; a ReLU follows the layer, so the answer is an empty partial result
    # with the reason, not NoReluSparsityError
    from spear.networks import pretrain

    net = build_cnn("vgg", 2, dtype=torch.float32)
    pool = rgb_patches(1000, seed=0)
    pretrain(net, pool.images[500:], pool.labels[500:], seed=2)
    images, labels = sample_batch(pool.subset(500), 8, seed=3)
    update = fedsgd_update(net, images.to(torch.float32), labels)
    rec = spear.attack(net, update, seed=2, time_budget=20, progress=False, image_budget=0)
    assert not rec.complete and not rec.verified
    assert any("no sparse direction" in n and "ReLU follows" in n for n in rec.notes)
    assert any("could not be identified" in n for n in rec.notes)


@dataclass
class _Seed1:
    """The features entering ``fc1`` of the trained VGG-style CNN of seed 1 for its float32
    batch of 16 (or those of its examples ``keep``), with the problem their ``fc1`` update
    makes, the truth of ``fc1`` and the labels."""

    problem: Problem
    truth: torch.Tensor  # (k, 1024) float64 features
    cols: torch.Tensor  # (256, k) float64 gradient columns
    labels: torch.Tensor


def _seed1_batch(
    keep: list[int], class_weight: float | None = None, *, shared: bool = False
) -> _Seed1:
    """:class:`_Seed1` of the examples ``keep``; ``class_weight``: the weight of the
    class of example 3 in a class-weighted mean cross-entropy (the others 1).

    The update is that of ``fc1`` for the batch's features (a float32 computation from
    them, as the client's). ``shared``: example 14 a copy of example 9 (one label: the
    update shows 15 examples while its mean counts 16) and example 5 moved next to
    example 2 (another label) by a step that keeps every unit of ``fc1`` on the side
    example 2 puts it, so the two have the same zero sets at ``fc1``. Built from the
    features at test time, both hold whatever CPU trained the network (its float32
    weights, and so the batch's own ties, differ between CPUs in their last bits).
    """
    net = build_cnn("vgg", 1, dtype=torch.float32)
    pool = rgb_patches(1000, seed=0)
    pretrain(net, pool.images[500:], pool.labels[500:], seed=1)
    images, labels = sample_batch(pool.subset(500), 16, seed=2)
    target = find_target(net)
    assert target.after is not None and target.bias is not None
    weight, bias = target.weight.detach(), target.bias.detach()
    with torch.no_grad():
        features = net.features(images.to(torch.float32))  # type: ignore[operator]
    if shared:
        assert labels[9] == labels[14] and labels[2] != labels[5]
        features[14] = features[9]
        margins = (features[2] @ weight.T + bias).abs()
        step = torch.rand(features.shape[1], generator=torch.Generator().manual_seed(0))
        step = step * (features[2] > 0)
        size = 0.5 * float((margins / (weight @ step).abs()).min())
        features[5] = features[2] + size * step
    features, labels = features[keep], labels[keep]
    weights = torch.ones(10, dtype=torch.float32)
    if class_weight is not None:
        weights[labels[3]] = class_weight

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, labels, weight=weights)

    layer_weight = weight.clone().requires_grad_(True)
    layer_bias = bias.clone().requires_grad_(True)
    pre = torch.nn.functional.linear(features, layer_weight, layer_bias)
    weight_grad, bias_grad = torch.autograd.grad(
        loss_fn(target.after(pre)), [layer_weight, layer_bias]
    )
    downstream = Downstream(target.after, weight, bias, torch.float32)
    problem = problem_from(weight_grad, bias_grad, weight, bias, downstream=downstream)
    pre = (features @ weight.T + bias).requires_grad_(True)
    (cols,) = torch.autograd.grad(loss_fn(target.after(pre)), pre)
    return _Seed1(problem, features.to(torch.float64), cols.to(torch.float64).T, labels)


def _accepted(problem: Problem, inputs: torch.Tensor, grads: torch.Tensor) -> list[int]:
    """The examples ``inputs`` ``(k, n)`` with columns ``grads`` ``(m, k)`` that pass
    :func:`verified_indices` as one solve."""
    assert problem.layer is not None
    coords = inputs @ problem.layer.right.T
    live = torch.ones(grads.shape[0], dtype=torch.bool)
    return verified_indices(problem, coords, grads.clone(), live)


def _result(problem: Problem, inputs: torch.Tensor, grads: torch.Tensor) -> LayerReconstruction:
    """A complete result marked verified, holding ``inputs`` ``(k, n)`` and ``grads``."""
    k = inputs.shape[0]
    return LayerReconstruction(
        inputs=inputs,
        batch_size=k,
        complete=True,
        verified=True,
        output_grads=grads,
        singular_values=problem.fac.singular_values,
        rank_gap=problem.fac.gap,
        sparsity=torch.zeros(k, dtype=torch.float64),
        consistency=None,
        residual=0.0,
        precision=problem.eps,
    )


def _mixed(batch: _Seed1, weight: float, singles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples ``singles`` and two mixtures of examples 2 and 5 with weights
    ``(weight, 1 - weight)``, inputs ``(k, n)`` and columns ``(m, k)`` (the same update)."""
    truth, cols = batch.truth, batch.cols
    mix = torch.tensor([[weight, 1 - weight], [1 - weight, weight]], dtype=torch.float64)
    inputs = torch.cat([truth[singles], mix @ truth[[2, 5]]])
    grads = torch.cat([cols[:, singles], cols[:, [2, 5]] @ mix.inverse()], dim=1)
    return inputs, grads


def test_mixtures_of_examples_with_one_zero_set_fail_the_divisor_of_a_merged_batch() -> None:
    # trained VGG-style CNN (seed 1), float32, b = 16, the batch made to hold what a
    # merged batch holds: examples 9 and 14 (one label) have one column, so the update
    # shows 15 examples while its mean counts 16 (as where two columns agree to float32's
    # precision); examples 2 and 5 have the same zero sets at fc1 and different labels,
    # so every convex mixture of the two passes every ReLU-pattern check. Only the
    # cross-entropy divisor tells them apart, and the update's divisor is 16, not its rank
    batch = _seed1_batch(list(range(16)), shared=True)
    problem, truth, cols, labels = batch.problem, batch.truth, batch.cols, batch.labels
    assert problem.rank == 15
    zeros = cols == 0
    assert torch.equal(zeros[:, 2], zeros[:, 5]) and labels[2] != labels[5]
    assert torch.equal(zeros[:, 9], zeros[:, 14]) and labels[9] == labels[14]
    # the batch the update shows, with 2 and 5 replaced by two convex mixtures of them
    singles = [i for i in range(16) if i not in (2, 5, 9, 14)]
    inputs, grads = _mixed(batch, 0.7, singles)
    merged = ((truth[9] + truth[14]) / 2)[None]
    inputs = torch.cat([inputs[:12], merged, inputs[12:]])
    grads = torch.cat([grads[:, :12], (cols[:, 9] + cols[:, 14])[:, None], grads[:, 12:]], 1)
    assert _accepted(problem, inputs, grads) == list(range(13))  # not the mixtures
    assert problem.evidence.whole == 16.0
    # the result's own last check holds a batch to one divisor whatever the search did
    result = _result(problem, inputs, grads)
    unverify_unshared_divisor(problem, result)
    assert not result.verified
    assert "examples [13, 14] do not fit" in result.notes[-1]


@pytest.mark.parametrize(("weight", "accepted"), [(0.99, 13), (0.995, 13), (1.0, 15)])
def test_a_mixture_a_hundredth_off_an_example_fails_its_divisor(
    weight: float, accepted: int
) -> None:
    # the batch above without example 14: 15 distinct examples, a mean over 15. A mixture
    # with weight w on example 2 has the divisor 15 w and misses the fit by about
    # 80 (1 - w): the tolerance that examples peeled in float32 need (5e-4) must not
    # pass it
    batch = _seed1_batch([i for i in range(16) if i != 14])
    assert batch.problem.rank == 15
    singles = [i for i in range(15) if i not in (2, 5)]
    inputs, grads = _mixed(batch, weight, singles)
    assert len(_accepted(batch.problem, inputs, grads)) == accepted
    result = _result(batch.problem, inputs, grads)
    unverify_unshared_divisor(batch.problem, result)
    assert result.verified == (accepted == 15)


def test_a_class_weighted_mean_keeps_its_examples_verified() -> None:
    # class weights 1 and 1.5 (the class of example 3, two examples of this batch): the
    # weight-1 examples show the divisor 16 = the weights' sum, an integer in [15, 30],
    # and the others 16 / 1.5; two examples that share a divisor of no plain form say
    # the loss weighs examples, and no count is held against them
    batch = _seed1_batch([i for i in range(16) if i != 14], class_weight=1.5)
    problem, truth, cols = batch.problem, batch.truth, batch.cols
    assert int((batch.labels == batch.labels[3]).sum()) == 2
    assert _accepted(problem, truth, cols) == list(range(15))
    assert problem.evidence.whole is None
    result = _result(problem, truth, cols)
    unverify_unshared_divisor(problem, result)
    assert result.verified


def test_a_merged_pair_too_rough_to_show_its_copies_still_unverifies_a_float32_batch() -> None:
    # the trained seed-1 batch as the update shows it: 13 examples, the merged pair 9 and
    # 14 as their mean (its column bent by 1%, so that it no longer fits cross-entropy
    # as an example counted twice) and example 2 in place of the pair 2, 5 (a batch of
    # 15 that passes every check). The others show a mean over 16, one more than the
    # update shows: some example is counted twice, and float32 cannot tell copies from
    # a merge
    batch = _seed1_batch(list(range(16)), shared=True)
    truth, cols = batch.truth, batch.cols
    keep = [i for i in range(16) if i not in (9, 14, 5)]
    bent = (cols[:, 9] + cols[:, 14]) * (1 + 0.01 * torch.linspace(-1, 1, cols.shape[0]))
    inputs = torch.cat([truth[keep], ((truth[9] + truth[14]) / 2)[None]])
    grads = torch.cat([cols[:, keep], bent[:, None]], dim=1)
    result = _result(batch.problem, inputs, grads)
    unverify_merged(batch.problem, result)
    assert not result.verified
    assert "a mean over 16 while the update shows 15" in result.notes[-1]


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_vgg_cnn_with_batch_norm_in_training_mode_gives_features_exact(
    dtype: torch.dtype, rel: float
) -> None:
    # a client trains with BatchNorm in training mode: the features entering fc1 are
    # normalised with the batch's statistics, but each is still one example's, and the
    # model after fc1 is per example
    net, update, truth, labels = _batch("vgg-bn", 16, dtype)
    assert net.training
    rec = spear.attack(net, update, time_budget=30, progress=False, image_budget=0)
    _assert_exact(rec, truth, labels, rel)
    assert any(
        "BatchNorm2d 'conv.1'" in n and "before the attacked layer 'fc1'" in n for n in rec.notes
    )


def test_images_behind_batch_norm_in_training_mode_are_fitted_together() -> None:
    # every forward pass in training mode moves a BatchNorm's running statistics: the
    # attack runs them on its own copy, and the model it was given stays as it was
    net, update, _, _ = _batch("vgg-bn", 4, torch.float64)
    state = state_snapshot(net)
    rec = spear.attack(
        net, update, time_budget=30, progress=False, image_budget=3, input_range=(0.0, 1.0)
    )
    assert_same_state(net, state)
    assert rec.images is not None and rec.images.shape == (4, 3, 32, 32)
    assert float(rec.images.min()) >= 0.0 and float(rec.images.max()) <= 1.0
    assert not rec.images_determined
    assert any("fitted to the whole update by gradient matching" in n for n in rec.notes)


def _centred_correlation(found: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``(k,)`` correlation of each image ``(k, C, H, W)`` with its truth, each image and
    channel centred (a BatchNorm after the first layer hides the offsets)."""
    a = found - found.mean(dim=(2, 3), keepdim=True)
    t = truth - truth.mean(dim=(2, 3), keepdim=True)
    return (a * t).flatten(1).sum(dim=1) / (a.flatten(1).norm(dim=1) * t.flatten(1).norm(dim=1))


def test_images_behind_batch_norm_carry_the_images_structure_in_the_features_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gradient matching of the whole batch, a fixed number of steps (the budget does not
    # bind): the images correlate with the truth (a search on the features alone gives a
    # median of about 0.03 here), and each is paired with its own example's features
    monkeypatch.setattr(spear.images, "MISSING_IMAGE_STEPS", 300)
    net, update, truth, labels = _batch("vgg-bn", 4, torch.float32)
    pool = rgb_patches(1000, seed=0)
    images, _ = sample_batch(pool.subset(500), 4, seed=1)
    rec = spear.attack(
        net, update, time_budget=30, progress=False, image_budget=600, input_range=(0.0, 1.0)
    )
    assert rec.images is not None and rec.image_labels is not None
    features = spear.metrics.match(rec.inputs.reshape(4, -1).to(torch.float64), truth)
    # the truth of each returned example, in the order of .inputs (and of .images)
    order = torch.as_tensor(features.truth_index[features.rec_index.argsort()])
    correlation = _centred_correlation(rec.images.to(torch.float64), images[order].double())
    assert float(correlation.median()) > 0.15, correlation
    assert torch.equal(rec.image_labels, labels[order])


def test_images_behind_batch_norm_give_the_missing_examples_their_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # three of four examples recovered: the fit of the whole batch holds the fourth's
    # label, and its image comes back as a missing example's estimate
    monkeypatch.setattr(spear.images, "MISSING_IMAGE_STEPS", 20)
    net, update, truth, labels = _batch("vgg-bn", 4, torch.float32)
    target = find_target(net)
    assert target.before is not None
    state = state_snapshot(net)
    rebuilt, filled = spear.images.images_behind_batch_statistics(
        net,
        target.before,
        update,
        truth[:3].to(torch.float32),
        labels[:3],
        torch.ones(3, dtype=torch.int64),
        (3, 32, 32),
        missing_labels=labels[3:],
        update_kind="gradient",
        input_range=(0.0, 1.0),
        time_budget=60,
        seed=0,
    )
    assert_same_state(net, state)
    assert rebuilt.images.shape == (3, 3, 32, 32) and rebuilt.feature_residual.shape == (3,)
    assert not bool(rebuilt.determined.any())
    assert filled is not None and torch.equal(filled.labels, labels[3:])
    assert filled.images.shape == (1, 3, 32, 32)
    assert float(filled.images.min()) >= 0.0 and float(filled.images.max()) <= 1.0


def test_ctrl_c_in_the_images_behind_batch_norm_keeps_the_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(spear.baselines.gradient_matching, "gradient_matching_attack", interrupted)
    net, update, truth, labels = _batch("vgg-bn", 4, torch.float32)
    rec = spear.attack(net, update, time_budget=30, progress=False, image_budget=60)
    _assert_exact(rec, truth, labels, 1e-3)
    assert rec.images is None
    assert any("interrupted (Ctrl-C) while gradient matching" in n for n in rec.notes)


def test_a_bfloat16_update_of_a_cnn_gives_approximate_features() -> None:
    # a mixed-precision client: the rounding is the update's noise, and the approximate
    # path estimates the features entering fc1 (a layer behind others, like a first one)
    net, update, truth, labels = _batch("vgg-bn", 8, torch.float32)
    half = {k: v.to(torch.bfloat16) for k, v in update.items()}
    rec = spear.attack(net, half, time_budget=30, progress=False, image_budget=0)
    assert rec.estimate == "approximate" and not rec.verified and rec.feature_space
    assert rec.inputs.shape[0] == 8
    found = rec.inputs.reshape(8, -1).to(torch.float64)
    match = spear.metrics.match(found, truth)
    worst = float(torch.as_tensor(match.max_abs_error).max()) / float(truth.abs().max())
    assert worst < 1e-2
    assert rec.labels is not None
    assert torch.equal(rec.labels[match.rec_index], labels[match.truth_index])
    assert any("arrived as torch.bfloat16" in n for n in rec.notes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_noisy_update_of_a_cnn_gives_features_with_error_bars(dtype: torch.dtype) -> None:
    # Gaussian noise of 1e-3 of the largest entry: no exact zeros are left, and the
    # approximate path estimates the features entering fc1 with an error bar each
    net, update, truth, labels = _batch("vgg-bn", 8, dtype)
    generator = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 1e-3 * float(v.abs().max()) * torch.randn(v.shape, generator=generator, dtype=dtype)
        for k, v in update.items()
    }
    rec = spear.attack(net, noisy, time_budget=30, progress=False, image_budget=0)
    assert rec.estimate == "approximate" and not rec.verified and rec.feature_space
    assert rec.inputs.shape[0] == 8 and rec.error_rms is not None
    found = rec.inputs.reshape(8, -1).to(torch.float64)
    match = spear.metrics.match(found, truth)
    rms = (found[match.rec_index] - truth[match.truth_index]).pow(2).mean(dim=1).sqrt()
    predicted = rec.error_rms[match.rec_index].to(torch.float64)
    assert bool(torch.isfinite(predicted).all())
    # the error bars are the errors' size: within a factor of 2 either way
    assert bool(((predicted / rms) > 0.5).all() and ((predicted / rms) < 2.0).all())
    assert rec.labels is not None
    assert torch.equal(rec.labels[match.rec_index], labels[match.truth_index])
