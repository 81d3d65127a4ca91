"""spear.flower: audited Flower strategies attack every reply and leave training unchanged.

Most tests call the strategy's methods with messages built here (no simulation); the
last ones run Flower's Ray-based simulation of the example app (3 clients, 2 rounds).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import strategy as legacy  # noqa: E402
from flwr.serverapp.strategy import FedAvg, Strategy  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from spear.auditor import RECORD_KEYS  # noqa: E402
from spear.data import builtin_images  # noqa: E402
from spear.flower import AGGREGATE_NODE, AuditedStrategy, audited, read_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONTRACT = ("round", "node", "batch_size", "recovered", "verified", "certificate", "seconds")


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Messages need a run and task id; a simulation sets them, here they are faked."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class _Grid:
    """What FedAvg asks of a Grid when it configures a round: the node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _mlp(width: int = 64, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))
    return net.to(dtype)


def _batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = builtin_images()
    return [
        (data.images[i * size : (i + 1) * size], data.labels[i * size : (i + 1) * size])
        for i in range(count)
    ]


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1) -> None:
    """``steps`` full-batch SGD steps (lr 0.05)."""
    optimiser = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(x.to(next(net.parameters()).dtype)), y).backward()
        optimiser.step()


def _state_record(net: nn.Module) -> ArrayRecord:
    return ArrayRecord(net.state_dict())


def _play_round(
    strategy: Any,
    net: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    server_round: int = 1,
    pack: Callable[[nn.Module], ArrayRecord] = _state_record,
    reply: Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor], ArrayRecord] | None = None,
) -> tuple[Any, list[Message]]:
    """Configure a round, let every node train on its batch, aggregate; (result, replies)."""
    grid = _Grid(list(range(101, 101 + len(batches))))
    messages = list(strategy.configure_train(server_round, pack(net), ConfigRecord(), grid))
    replies = []
    for message, (x, y) in zip(messages, batches, strict=True):
        local = copy.deepcopy(net)
        if reply is None:
            _train(local, x, y)
            arrays = pack(local)
        else:
            arrays = reply(net, local, x, y)
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(x)})})
        replies.append(Message(content, reply_to=message))
    return strategy.aggregate_train(server_round, replies), replies


def test_audited_strategy_attacks_every_reply_and_aggregates_the_same(tmp_path: Path) -> None:
    net = _mlp()
    batches = _batches(3, 4)
    plain = FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3),
        model=net,
        out=tmp_path,
    )
    assert isinstance(strategy, Strategy) and isinstance(strategy, AuditedStrategy)
    assert strategy.weighted_by_key == "num-examples"  # the wrapped strategy's attribute
    (arrays, metrics), replies = _play_round(strategy, net, batches)
    expected, expected_metrics = plain.aggregate_train(1, replies)  # the same, not audited
    assert dict(metrics) == dict(expected_metrics)
    for name in expected:
        np.testing.assert_array_equal(arrays[name].numpy(), expected[name].numpy())

    report = read_report(tmp_path)
    records = report["records"]
    assert len(records) == 3
    assert {r["node"] for r in records} == {m.metadata.src_node_id for m in replies}
    for record in records:
        assert set(CONTRACT) <= set(record) and list(record) == list(RECORD_KEYS)
        assert record["round"] == 1 and record["error"] is None
        assert record["batch_size"] == 4 and record["recovered"] == 4
        assert record["examples_verified"] and not record["verified"]  # a delta's labels
        assert record["certificate"] < 1e-8 and record["seconds"] > 0
        assert record["dtype"] == "float64" and record["update_kind"] == "delta"
        assert (tmp_path / record["grid"]).stat().st_size > 500
        saved = tmp_path / record["reconstruction"]
        assert saved.stat().st_size > 4 * 784 * 8
    assert report["rounds"] == [
        {
            "round": 1,
            "updates": 3,
            "attacked": 3,
            "recovered": 12,
            "attack_seconds": pytest.approx(sum(r["seconds"] for r in records)),
        }
    ]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("<img ") == 3
    assert "12 example(s) recovered from 3 certified update(s)" in page
    assert (tmp_path / "report.png").stat().st_size > 5000
    assert "| 1 |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_recovered_images_are_the_clients_images(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    net = _mlp()
    batches = _batches(2, 4)
    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        model=net,
        out=tmp_path,
    )
    _play_round(strategy, net, batches)
    truth = torch.cat([x for x, _ in batches]).reshape(8, -1)
    for record in read_report(tmp_path)["records"]:
        inputs = load_file(str(tmp_path / record["reconstruction"]))["inputs"].reshape(4, -1)
        distance = torch.cdist(inputs, truth, p=float("inf")).min(dim=1).values
        assert float(distance.max()) < 1e-8


def test_float32_arrays_sent_by_position(tmp_path: Path) -> None:
    """Clients of Flower's NumPy style send unnamed float32 arrays ("0", "1", ...)."""
    net = _mlp(256, dtype=torch.float32)

    def pack(model: nn.Module) -> ArrayRecord:
        return ArrayRecord([p.detach().numpy().copy() for p in model.state_dict().values()])

    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        model=net.double(),  # the auditor follows the dtype of what is sent
        out=tmp_path,
    )
    _play_round(strategy, _mlp(256, dtype=torch.float32), _batches(2, 8), pack=pack)
    records = read_report(tmp_path)["records"]
    assert [r["dtype"] for r in records] == ["float32", "float32"]
    assert [r["error"] for r in records] == [None, None]
    assert [r["recovered"] for r in records] == [8, 8]


def test_prefixed_names_and_buffers(tmp_path: Path) -> None:
    """State-dict names with a wrapper prefix; BatchNorm buffers (one of them int64)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 10)
    ).double()
    net.eval()

    def pack(model: nn.Module) -> ArrayRecord:
        return ArrayRecord({f"module.{k}": v for k, v in model.state_dict().items()})

    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        model=net,
        out=tmp_path,
    )
    _play_round(strategy, net, _batches(2, 4), pack=pack)
    records = read_report(tmp_path)["records"]
    assert [(r["error"], r["recovered"]) for r in records] == [(None, 4), (None, 4)]


def test_clients_training_a_cnn_with_batch_norm_in_training_mode(tmp_path: Path) -> None:
    """Clients train as usual, BatchNorm normalising with each batch's statistics; the
    state dict they return holds the running statistics too."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).double()
    assert net.training
    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        model=net,
        out=tmp_path,
    )
    _play_round(strategy, net, _batches(2, 4))
    records = read_report(tmp_path)["records"]
    assert [(r["error"], r["recovered"], r["layer"]) for r in records] == [(None, 4, "5")] * 2
    assert all(any("BatchNorm2d '1'" in n for n in r["notes"]) for r in records)


def test_gradients_sent_by_clients(tmp_path: Path) -> None:
    net = _mlp()

    def gradient(
        sent: nn.Module, local: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> ArrayRecord:
        loss = nn.functional.cross_entropy(local(x), y)
        grads = torch.autograd.grad(loss, list(local.parameters()))
        names = [name for name, _ in local.named_parameters()]
        return ArrayRecord(dict(zip(names, grads, strict=True)))

    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        model=net,
        out=tmp_path,
        update_kind="gradient",
    )
    _play_round(strategy, net, _batches(2, 4), reply=gradient)
    records = read_report(tmp_path)["records"]
    assert all(r["verified"] and r["recovered"] == 4 for r in records), records
    labels = sorted(sorted(r["labels"]) for r in records)
    assert labels == sorted(sorted(y.tolist()) for _, y in _batches(2, 4))


def test_failing_attacks_are_recorded_and_training_goes_on(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double()  # nothing to attack
    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        model=net,
        out=tmp_path,
    )
    (arrays, _), _ = _play_round(strategy, net, _batches(2, 4))
    assert arrays is not None and set(arrays) == set(net.state_dict())
    records = read_report(tmp_path)["records"]
    assert [r["error"].split(":")[0] for r in records] == ["NotAttackableError"] * 2
    assert [r["recovered"] for r in records] == [0, 0]

    wrong = audited(  # a model the arrays do not fit
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        model=_mlp(32),
        out=tmp_path / "wrong",
    )
    (arrays, _), _ = _play_round(wrong, _mlp(), _batches(2, 4))
    assert arrays is not None
    errors = [r["error"] for r in read_report(tmp_path / "wrong")["records"]]
    assert all(e.startswith("InputError: cannot match the 4 arrays") for e in errors), errors


def test_every_and_sample_choose_what_is_attacked(tmp_path: Path) -> None:
    net = _mlp(32)
    strategy = audited(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3),
        model=net,
        out=tmp_path,
        every=2,
        sample=1,
        save_images=False,
    )
    for server_round in (1, 2, 3):
        _play_round(strategy, net, _batches(3, 2), server_round=server_round)
    report = read_report(tmp_path)
    assert [r["round"] for r in report["records"]] == [1, 3]
    assert [(r["round"], r["updates"], r["attacked"]) for r in report["rounds"]] == [
        (1, 3, 1),
        (2, 3, 0),
        (3, 3, 1),
    ]
    assert all(r["grid"] is None for r in report["records"])
    assert not list(tmp_path.glob("round_*"))


def test_options_and_strategy_are_checked(tmp_path: Path) -> None:
    from spear.errors import InputError

    with pytest.raises(InputError, match="sample as a float"):
        audited(FedAvg(), model=_mlp(), out=tmp_path, sample=1.5)
    with pytest.raises(InputError, match="every must be a positive integer"):
        audited(FedAvg(), model=_mlp(), out=tmp_path, every=0)
    with pytest.raises(InputError, match="wraps a Flower strategy"):
        audited(object(), model=_mlp(), out=tmp_path)  # type: ignore[call-overload]
    with pytest.raises(InputError, match="legacy strategy"):
        audited(FedAvg(), model=_mlp(), out=tmp_path, secure_aggregation=True)


def test_without_flower_the_import_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flwr.app", None)
    monkeypatch.delitem(sys.modules, "spear.flower")
    with pytest.raises(ImportError, match=r'pip install "spear\[flower\]"'):
        importlib.import_module("spear.flower")


# ---- legacy strategies and secure aggregation -----------------------------------------


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


class _Clients:
    """What legacy FedAvg asks of a ClientManager."""

    def __init__(self, count: int) -> None:
        self.proxies = [_Proxy(201 + i) for i in range(count)]

    def num_available(self) -> int:
        return len(self.proxies)

    def sample(self, num_clients: int, min_num_clients: int | None = None) -> list[_Proxy]:
        return self.proxies[:num_clients]


def _legacy_round(
    strategy: Any, net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], summed: bool
) -> Parameters | None:
    sent = ndarrays_to_parameters([v.numpy() for v in net.state_dict().values()])
    pairs: list[tuple[Any, FitIns]] = strategy.configure_fit(1, sent, _Clients(len(batches)))
    weights = []
    for _, (x, y) in zip(pairs, batches, strict=True):
        local = copy.deepcopy(net)
        _train(local, x, y)
        weights.append([v.detach().numpy().copy() for v in local.state_dict().values()])
    ok = Status(Code.OK, "")
    if summed:  # what SecAggPlusWorkflow hands the strategy: the average, in every result
        mean = [np.mean(arrays, axis=0) for arrays in zip(*weights, strict=True)]
        shared = ndarrays_to_parameters(mean)
        results = [
            (proxy, FitRes(ok, shared, len(x), {}))
            for (proxy, _), (x, _) in zip(pairs, batches, strict=True)
        ]
    else:
        results = [
            (proxy, FitRes(ok, ndarrays_to_parameters(w), len(x), {}))
            for (proxy, _), w, (x, _) in zip(pairs, weights, batches, strict=True)
        ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    return parameters  # type: ignore[no-any-return]


def test_secure_aggregation_sum_is_attacked_as_one_batch(tmp_path: Path) -> None:
    net = _mlp()
    strategy = audited(
        legacy.FedAvg(fraction_fit=1.0, min_fit_clients=2, min_available_clients=2),
        model=net,
        out=tmp_path,
    )
    assert isinstance(strategy, legacy.Strategy)
    parameters = _legacy_round(strategy, net, _batches(2, 4), summed=True)
    assert parameters is not None and len(parameters_to_ndarrays(parameters)) == 4
    records = read_report(tmp_path)["records"]
    assert len(records) == 1
    (record,) = records
    assert record["node"] == AGGREGATE_NODE and record["clients"] == 2
    assert record["batch_size"] == 8 and record["recovered"] == 8 and record["error"] is None
    assert "secure aggregation" in record["notes"][0]


def test_legacy_strategy_without_secure_aggregation(tmp_path: Path) -> None:
    net = _mlp()
    strategy = audited(
        legacy.FedAvg(fraction_fit=1.0, min_fit_clients=2, min_available_clients=2),
        model=net,
        out=tmp_path,
    )
    _legacy_round(strategy, net, _batches(2, 4), summed=False)
    records = read_report(tmp_path)["records"]
    assert [(r["node"], r["recovered"]) for r in records] == [(201, 4), (202, 4)]


# ---- Flower's simulation ---------------------------------------------------------------


def _load_example() -> tuple[Any, Any]:
    path = str(REPO / "examples" / "flower-audit")
    if path not in sys.path:
        sys.path.insert(0, path)
    server = importlib.import_module("flower_audit.server_app")
    client = importlib.import_module("flower_audit.client_app")
    return server, client


@pytest.mark.slow
def test_example_app_in_flowers_simulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example app, small: 3 simulated clients (Ray), 2 rounds, audited FedAvg."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    example_server, example_client = _load_example()
    pythonpath = os.pathsep.join(
        [str(REPO / "examples" / "flower-audit"), os.environ.get("PYTHONPATH", "")]
    )
    monkeypatch.setenv("PYTHONPATH", pythonpath)  # the Ray workers import the app too
    overrides = {"num-server-rounds": 2, "audit-dir": str(tmp_path)}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Any) -> None:
        context.run_config.update(overrides)
        example_server.main(grid, context)

    run_simulation(
        server_app=server,
        client_app=example_client.app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    records = report["records"]
    assert sorted(r["round"] for r in records) == [1, 1, 1, 2, 2, 2]
    assert len({r["node"] for r in records}) == 3
    assert all(r["error"] is None and r["batch_size"] == 32 for r in records), records
    # the clients send float32 deltas of several local steps: their examples come back
    # (exact in practice) but unverified, since a float32 delta is verified only where
    # every pattern holds as for a single step; an unverified record says why
    assert any(r["recovered"] == 32 for r in records), records
    for r in records:
        if r["recovered"] and not r["examples_verified"]:
            assert r["notes"], r
    timing = json.loads((tmp_path / "run_audited.json").read_text(encoding="utf-8"))
    assert timing["rounds"] == 2 and timing["clients"] == 3 and timing["wall_seconds"] > 0
