"""Tests for spear.baselines.breaching_ig: breaching's Inverting Gradients on spear's updates.

The tests that run breaching skip when the optional extra is not installed
(``pip install "spear[breaching]"``); the error that names the extra is tested either way.
"""

from __future__ import annotations

import importlib.util
import itertools
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import spear.bench as bench
from spear import metrics
from spear.baselines import ATTACKS, get_attack
from spear.baselines.breaching_ig import breaching_ig_attack, load_breaching
from spear.bench import BenchConfig, plan_cases, run_bench
from spear.cli import main
from spear.data import builtin_images
from spear.errors import InputError, NotAttackableError

torch.set_num_threads(1)

HAS_BREACHING = importlib.util.find_spec("breaching") is not None
needs_breaching = pytest.mark.skipif(
    not HAS_BREACHING, reason='breaching is not installed (pip install "spear[breaching]")'
)


@pytest.fixture(scope="module", autouse=True)
def _imported() -> None:
    """Import breaching once (when installed), so that time budgets do not pay for it.

    ``pytest.importorskip("breaching")`` is not enough on its own: with a CPU-only torch,
    PyPI's torchvision fails at import with a RuntimeError, which ``load_breaching``
    works around (and a broken install must fail the tests, not skip them).
    """
    if HAS_BREACHING:
        load_breaching()
        pytest.importorskip("breaching")


def _mlp(sizes: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype)


def _update(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    names, params = zip(*model.named_parameters(), strict=True)
    loss = nn.functional.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, params)
    return {name: grad.detach() for name, grad in zip(names, grads, strict=True)}


def _images(b: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` shipped Fashion-MNIST images downsampled to 14x14 (fast MLPs), and labels."""
    data = builtin_images(b)
    images = nn.functional.avg_pool2d(data.images, 2)
    return images.to(dtype), data.labels


# --------------------------------------------------------------------------------------
# without the extra


def test_listed_even_without_the_extra() -> None:
    assert ATTACKS["breaching-ig"] is breaching_ig_attack
    assert get_attack("breaching-ig") is breaching_ig_attack
    assert "breaching-ig" in bench.BENCH_ATTACKS


def test_missing_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "breaching", None)  # `import breaching` now fails
    model = _mlp((16, 8, 4), torch.float32)
    update = _update(model, torch.rand(1, 16), torch.tensor([1]))
    with pytest.raises(InputError) as info:
        breaching_ig_attack(model, update, batch_size=1, input_shape=(16,), iterations=1)
    message = str(info.value)
    assert 'pip install "spear[breaching]"' in message
    assert "torchvision 0.28.0" in message and "torch==2.13.0" in message
    # spear bench stops before any case runs, with the same message
    with pytest.raises(InputError, match=r"spear\[breaching\]"):
        plan_cases(BenchConfig(attacks=("spear", "breaching-ig")))
    out = tmp_path / "x"
    status = main(["bench", "--attacks", "spear,breaching-ig", "--out", str(out)])
    assert status == 2
    assert 'pip install "spear[breaching]"' in capsys.readouterr().err
    assert not out.exists()


def test_arguments_are_checked_before_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "breaching", None)
    model = _mlp((16, 8, 4), torch.float32)
    update = _update(model, torch.rand(1, 16), torch.tensor([1]))
    for bad in ({"batch_size": 0}, {"restarts": 0}, {"iterations": -1}):
        options: dict[str, Any] = {"batch_size": 1, "input_shape": (16,), **bad}
        with pytest.raises(InputError, match="must be"):
            breaching_ig_attack(model, update, **options)
    with pytest.raises(InputError, match="unknown label_strategy 'dlg'"):
        breaching_ig_attack(model, update, batch_size=1, input_shape=(16,), label_strategy="dlg")


# --------------------------------------------------------------------------------------
# with breaching


@needs_breaching
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_range_dtype_labels(dtype: torch.dtype) -> None:
    model = _mlp((196, 32, 10), dtype)
    truth, labels = _images(2, dtype)
    update = _update(model, truth, labels)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rec = breaching_ig_attack(model, update, batch_size=2, input_shape=(1, 14, 14), iterations=20)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert rec.inputs.shape == (2, 1, 14, 14) and rec.inputs.dtype == dtype
    assert float(rec.inputs.min()) >= 0.0 and float(rec.inputs.max()) <= 1.0
    assert rec.labels is not None and rec.labels.dtype == torch.int64
    assert sorted(rec.labels.tolist()) == sorted(labels.tolist())
    assert rec.certificate is None and not rec.verified and not rec.complete
    assert rec.batch_size == 2 and not rec.feature_space
    assert any("20 Adam steps" in note for note in rec.notes)
    assert any("1 channel(s)" in note for note in rec.notes)  # TV fitted to grey images


@needs_breaching
def test_same_seed_same_result_and_global_rng_untouched() -> None:
    model = _mlp((196, 16, 10), torch.float32)
    truth, labels = _images(1, torch.float32)
    update = _update(model, truth, labels)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = breaching_ig_attack(model, update, batch_size=1, input_shape=(1, 14, 14), iterations=5)
    assert torch.equal(torch.rand(3), expected)
    second = breaching_ig_attack(model, update, batch_size=1, input_shape=(1, 14, 14), iterations=5)
    other = breaching_ig_attack(
        model, update, batch_size=1, input_shape=(1, 14, 14), iterations=5, seed=1
    )
    assert torch.equal(first.inputs, second.inputs)
    assert not torch.equal(first.inputs, other.inputs)


@needs_breaching
def test_one_image_beats_random_images() -> None:
    model = _mlp((196, 64, 10), torch.float32)
    truth, labels = _images(1, torch.float32)
    update = _update(model, truth, labels)
    start = time.perf_counter()
    rec = breaching_ig_attack(
        model, update, batch_size=1, input_shape=(1, 14, 14), iterations=400, time_budget=20.0
    )
    assert time.perf_counter() - start < 20.0
    assert rec.labels is not None and rec.labels.tolist() == labels.tolist()
    reconstructed = float(metrics.psnr(rec.inputs.double(), truth.double()))
    generator = np.random.default_rng(0)
    random = [float(metrics.psnr(generator.random(truth.shape), truth.double())) for _ in range(20)]
    assert reconstructed > max(random) + 10.0, (reconstructed, max(random))


@needs_breaching
def test_time_budget_stops_the_optimisation() -> None:
    model = _mlp((196, 32, 10), torch.float32)
    truth, labels = _images(2, torch.float32)
    update = _update(model, truth, labels)
    start = time.perf_counter()
    rec = breaching_ig_attack(
        model, update, batch_size=2, input_shape=(1, 14, 14), iterations=10**6, time_budget=0.5
    )
    assert time.perf_counter() - start < 3.0
    assert any("time budget of 0.5 s ran out" in note for note in rec.notes)
    assert float(rec.inputs.min()) >= 0.0 and float(rec.inputs.max()) <= 1.0
    # a budget spent before the first step returns the (boxed) initialisation
    rec = breaching_ig_attack(
        model, update, batch_size=2, input_shape=(1, 14, 14), iterations=100, time_budget=0.0
    )
    assert any("0 Adam steps" in note for note in rec.notes)
    assert float(rec.inputs.min()) >= 0.0 and float(rec.inputs.max()) <= 1.0


class _TinyCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


@needs_breaching
def test_no_download_and_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    lpips_before = "lpips" in sys.modules
    torch.manual_seed(0)
    model = _TinyCnn()
    truth = torch.rand(2, 3, 8, 8)
    update = _update(model, truth, torch.tensor([1, 6]))
    rec = breaching_ig_attack(model, update, batch_size=2, input_shape=(3, 8, 8), iterations=5)
    assert rec.inputs.shape == (2, 3, 8, 8)
    assert ("lpips" in sys.modules) == lpips_before  # no LPIPS scorer was built
    assert not any("channel(s)" in note for note in rec.notes)  # breaching's own RGB prior


@needs_breaching
def test_partial_update_delta_flat_inputs_and_breaching_labels() -> None:
    model = _mlp((16, 12, 4), torch.float64)
    update = _update(model, torch.rand(2, 16, dtype=torch.float64), torch.tensor([0, 3]))
    delta = {name: -0.1 * value for name, value in update.items() if not name.startswith("1.")}
    rec = breaching_ig_attack(
        model,
        delta,
        batch_size=2,
        input_shape=(16,),
        update_kind="delta",
        iterations=10,
        label_strategy="bias-corrected",
    )
    assert rec.inputs.shape == (2, 16) and rec.inputs.dtype == torch.float64
    assert rec.labels is not None and sorted(rec.labels.tolist()) == [0, 3]
    assert any("held fixed" in note for note in rec.notes)
    assert any("not images: no total-variation prior" in note for note in rec.notes)
    assert any("'bias-corrected' strategy" in note for note in rec.notes)
    # without the head's gradient spear cannot infer the labels
    first = {name: update[name] for name in ("1.weight", "1.bias")}
    with pytest.raises(NotAttackableError, match="label_strategy="):
        breaching_ig_attack(model, first, batch_size=2, input_shape=(16,), iterations=1)


@needs_breaching
def test_bench_runs_it_beside_the_others(tmp_path: Path) -> None:
    config = BenchConfig(
        batch_sizes=(2,),
        widths=(32,),
        attacks=("spear", "breaching-ig", "gradient-matching"),
        dp_sweep=(),
        clients_sweep=(),
        time_budget=10.0,
        gm_iterations=10,
    )
    result = run_bench(config, tmp_path, progress=False)
    rows = {row["attack"]: row for row in result.rows}
    assert set(rows) == {"spear", "breaching-ig", "gradient-matching"}
    row = rows["breaching-ig"]
    assert not row["error"] and row["found"] == 2 and row["psnr_mean"] is not None
    assert row["label_accuracy"] is not None and row["certificate"] is not None
