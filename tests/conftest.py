"""Shared fixtures and helpers for the core tests: real images, float64 MLPs, true gradients.

Everything that knows the truth lives here (the attack never sees it): FedSGD gradients
computed with ``torch.autograd``, the true gradient at a layer's pre-activations
(:func:`spear.client.layer_truth`), and an order-free matcher that compares a
reconstruction with the truth.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from spear.client import layer_truth
from spear.downstream import Downstream
from spear.inversion.problem import STRICT_COMPLETE_SOLVES, MaskedModel, Problem, Request
from spear.linalg import Factorisation, Tolerances, factorise, orthonormal_basis
from spear.update import UpdateKind
from spear.verify import LayerView

# two CPU cores are shared with other workers: keep every test single-threaded
torch.set_num_threads(1)

#: Exact means: max abs error below this fraction of the data's scale (max abs of the truth).
EXACT = 1e-8


@functools.lru_cache(maxsize=1)
def _fashion() -> tuple[torch.Tensor, torch.Tensor]:
    path = resources.files("spear") / "_data" / "fashion_mnist_test_1000.npz"
    with resources.as_file(path) as p, np.load(p) as data:
        images = torch.from_numpy(data["images"].astype(np.float64) / 255.0)
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    return images.reshape(-1, 1, 28, 28), labels


def fashion(count: int, *, seed: int = 0, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` Fashion-MNIST test images ``(count, 1, 28, 28)`` in [0, 1] and labels."""
    images, labels = _fashion()
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    pick = order[offset : offset + count]
    return images[pick].clone(), labels[pick].clone()


def fashion_by_class(cls: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct images of one class."""
    images, labels = _fashion()
    idx = torch.nonzero(labels == cls).flatten()[:count]
    assert idx.numel() == count
    return images[idx].clone(), labels[idx].clone()


@pytest.fixture(scope="session")
def fashion_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1000 images ``(1000, 1, 28, 28)`` float64 in [0, 1] and their labels."""
    return _fashion()


def mlp(sizes: tuple[int, ...], *, seed: int = 0, flatten: bool = True) -> nn.Sequential:
    """A float64 ``Linear -> ReLU -> ... -> Linear`` MLP (optionally flattening first)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def fedsgd_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
) -> dict[str, torch.Tensor]:
    """The FedSGD update: gradient of softmax cross-entropy, keyed like named_parameters."""
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y, reduction=reduction)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {name: g.detach().clone() for name, g in zip(params, grads, strict=True)}


def layer_io(
    model: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The TRUE inputs ``(b, n)`` of ``layer`` and the gradient ``(m, b)`` at its outputs
    (:func:`spear.client.layer_truth`)."""
    name = next(n for n, module in model.named_modules() if module is layer)
    return layer_truth(model, name, x, y, reduction=reduction)  # type: ignore[arg-type]


@dataclass
class LayerCase:
    """One linear+ReLU layer problem with its truth."""

    weight_grad: torch.Tensor  # (m, n)
    bias_grad: torch.Tensor  # (m,)
    weight: torch.Tensor  # (m, n)
    bias: torch.Tensor  # (m,)
    inputs: torch.Tensor  # (b, n) the truth
    output_grads: torch.Tensor  # (m, b) true gradient at the pre-activations


def layer_case(
    m: int,
    n: int,
    b: int,
    *,
    seed: int = 0,
    real: bool = False,
    classes: int = 5,
    activation: type[nn.Module] = nn.ReLU,
    dtype: torch.dtype = torch.float64,
) -> LayerCase:
    """A random ``n -> m -> activation -> classes`` net and a batch of ``b`` inputs.

    ``real``: the inputs are ``n`` random pixels of ``b`` Fashion-MNIST images (correlated,
    non-negative, non-centred); otherwise standard Gaussian.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    first = nn.Linear(n, m).to(dtype)
    net = nn.Sequential(first, activation(), nn.Linear(m, classes)).to(dtype)
    if real:
        images, _ = fashion(b, seed=seed)
        pixels = torch.randperm(784, generator=gen)[:n]
        x = images.reshape(b, -1)[:, pixels].to(dtype)
    else:
        x = torch.randn(b, n, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (b,), generator=gen)
    z = first(x)
    z.retain_grad()
    out = net[2](net[1](z))
    nn.functional.cross_entropy(out, y).backward()
    assert first.weight.grad is not None and first.bias.grad is not None and z.grad is not None
    return LayerCase(
        weight_grad=first.weight.grad.detach().clone(),
        bias_grad=first.bias.grad.detach().clone(),
        weight=first.weight.detach().clone(),
        bias=first.bias.detach().clone(),
        inputs=x.detach().to(torch.float64),
        output_grads=z.grad.detach().T.to(torch.float64).clone(),
    )


def server_view(case: LayerCase) -> tuple[Factorisation, LayerView, Tolerances]:
    """What the server computes from a float64 case: ``dW = L R``, the layer in row-space
    coordinates, and the derived tolerances."""
    fac = factorise(case.weight_grad, float(torch.finfo(torch.float64).eps))
    layer = LayerView(
        weight_coords=case.weight @ fac.right.T,
        weight_abs_coords=case.weight.abs(),
        bias=case.bias,
        right=fac.right,
    )
    return fac, layer, Tolerances.derive(torch.float64, fac.condition)


def problem_for(
    case: LayerCase, time_budget: float = 60.0, seed: int = 0, *, strict_solves: bool = True
) -> Problem:
    """The inversion problem of a case as :func:`spear.invert_layer` builds it (weights
    given, batch size from the rank), its deadline ``time_budget`` seconds from now;
    ``strict_solves`` as :data:`spear.inversion.problem.STRICT_COMPLETE_SOLVES`."""
    return problem_from(
        case.weight_grad,
        case.bias_grad,
        case.weight,
        case.bias,
        time_budget=time_budget,
        seed=seed,
        strict_solves=strict_solves,
    )


def problem_from(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    time_budget: float = 60.0,
    seed: int = 0,
    strict_solves: bool = STRICT_COMPLETE_SOLVES,
    downstream: Downstream | None = None,
    update_kind: UpdateKind = "gradient",
    masked: MaskedModel | None = None,
) -> Problem:
    """The inversion problem of a layer's update ``(m, n)``, ``(m,)`` with its weights, as
    :func:`spear.invert_layer` builds it (batch size from the rank); ``downstream``: the
    model after the layer, as :func:`spear.attack` passes it; ``update_kind``: "delta"
    for a FedAvg delta; ``masked``: read as computed with an active Dropout right after
    the layer's ReLU (``dropout=True``), with the model and its ``p``."""
    request = Request(
        weight_grad=weight_grad,
        bias_grad=bias_grad,
        weight=weight,
        bias=bias,
        batch_size=None,
        seed=seed,
        solver="auto",
        update_kind=update_kind,
        time_budget=time_budget,
        max_samples=None,
        zero_tol=None,
        min_zero_fraction=0.1,
        device=None,
        progress=False,
        search_with_weights=True,
        strict_solves=strict_solves,
        downstream=downstream,
        dropout=masked is not None,
        masked=masked,
    )
    return Problem.build(request, time.perf_counter())


@dataclass
class Matching:
    """An order-free pairing of reconstructed rows with true rows."""

    rec_index: np.ndarray
    truth_index: np.ndarray
    max_abs_error: torch.Tensor  # per pair
    scale: float  # max abs of the truth

    @property
    def worst_relative(self) -> float:
        """Largest per-example max abs error relative to the truth's scale."""
        if self.max_abs_error.numel() == 0:
            return 0.0
        return float(self.max_abs_error.max()) / self.scale


def match_rows(rec: torch.Tensor, truth: torch.Tensor) -> Matching:
    """Pair rows of ``rec`` (k, ...) with rows of ``truth`` (b, ...) minimising distance.

    Uses the exact (not matrix-multiply) Euclidean distance: the default mm mode of
    ``torch.cdist`` has roundoff near 1e-7, far above what an exact attack achieves.
    """
    t = truth.detach().reshape(truth.shape[0], -1).to(torch.float64)
    r = rec.detach().reshape(rec.shape[0], t.shape[1]).to(torch.float64)
    dist = torch.cdist(r, t, compute_mode="donot_use_mm_for_euclid_dist")
    rows, cols = linear_sum_assignment(dist.numpy())
    err = (r[rows] - t[cols]).abs().amax(dim=1) if len(rows) else torch.zeros(0)
    return Matching(rows, cols, err, float(t.abs().max()))


def assert_exact(rec: torch.Tensor, truth: torch.Tensor, *, rel: float = EXACT) -> Matching:
    """Every row of ``rec`` equals a distinct row of ``truth`` to ``rel`` of its scale."""
    assert rec.shape[0] <= truth.shape[0], (rec.shape, truth.shape)
    matching = match_rows(rec, truth)
    assert matching.worst_relative < rel, (
        f"worst example off by {matching.worst_relative:.3e} of the data's scale"
    )
    return matching


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of parameters and buffers, for checking the model is never modified."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    for p in model.parameters():
        assert p.grad is None, "the attack left gradients on the model's parameters"


def reference_directions(
    weight_grad: torch.Tensor, b: int, *, live_only: bool = False
) -> torch.Tensor:
    """All sparse kernel directions of (b-1)-row subsets, by enumeration (unit, sign-fixed).

    ``live_only``: count only zeros on live rows (units on for some example). A dead row is
    zero for every direction, so it is no evidence: a direction zero on just ``b - 1``
    live rows is the kernel of any ``b - 1`` rows, whatever it is.
    """
    fac = factorise(weight_grad, float(torch.finfo(torch.float64).eps), rank=b)
    basis = orthonormal_basis(fac.left, b)
    m = basis.shape[0]
    counted = basis.norm(dim=1) > 1e-9 if live_only else torch.ones(m, dtype=torch.bool)
    found: list[torch.Tensor] = []
    for rows in itertools.combinations(range(m), b - 1):
        sub = basis[list(rows)]
        _, s, vh = torch.linalg.svd(sub, full_matrices=True)
        full = torch.zeros(b, dtype=torch.float64)
        full[: s.numel()] = s
        if b > 1 and float(full[-2]) < 1e-9:  # multi-dimensional kernel: skip
            continue
        q = vh[-1]
        v = basis @ q
        zeros = int(((v.abs() <= 1e-9 * v.abs().max()) & counted).sum())
        # sparse: zero on more rows than the b-1 sampled ones (a generous filter: with
        # m <= 12 some mixtures pass it too, so the reference is a superset of the truth)
        if zeros >= b:
            col = v / v.norm()
            col = col * torch.sign(col[col.abs().argmax()])
            if not any(float(col @ f) > 1 - 1e-9 for f in found):
                found.append(col)
    return torch.stack(found, dim=1) if found else torch.zeros(m, 0, dtype=torch.float64)
