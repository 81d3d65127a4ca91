"""The ServerApp: FedAvg, audited by spear, with SecAgg+ or client-side DP on request."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server import strategy as legacy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from flower_audit.task import accuracy, make_net, settings, test_set
from spear.flower import audited

app = ServerApp()
INFO = 20


def _audit_options(run: Any) -> dict[str, Any]:
    sample = float(run["audit-sample"])
    return {
        "out": Path(str(run["audit-dir"])).expanduser(),
        "time_budget": float(run["audit-time-budget"]),
        "every": int(run["audit-every"]),
        "sample": None if sample >= 1.0 else sample,
        "input_shape": (1, 28, 28),
    }


def _evaluate(hidden: int) -> Any:
    images, labels = test_set()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net = make_net(hidden)
        net.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(net, images, labels)})

    return evaluate


def _message_api(grid: Grid, run: dict[str, Any], nodes: int) -> None:
    """FedAvg through ``Strategy.start``, optionally with client-side DP."""
    hidden = int(run["hidden"])
    strategy: Any = FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    if bool(run["dp"]):
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=float(run["dp-noise-multiplier"]),
            clipping_norm=float(run["dp-clipping-norm"]),
            num_sampled_clients=nodes,
        )
    if bool(run["audit"]):
        strategy = audited(strategy, model=make_net(hidden), **_audit_options(run))
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_net(hidden).state_dict()),
        num_rounds=int(run["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(run["learning-rate"])}),
        evaluate_fn=_evaluate(hidden),
    )


def _secure_aggregation(grid: Grid, context: Context, run: dict[str, Any], nodes: int) -> None:
    """FedAvg under SecAgg+ (Flower runs it with legacy strategies only)."""
    hidden = int(run["hidden"])
    weights = [v.numpy() for v in make_net(hidden).state_dict().values()]
    strategy: Any = legacy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters(weights),
        on_fit_config_fn=lambda server_round: {"server-round": server_round},
    )
    if bool(run["dp"]):
        strategy = legacy.DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=float(run["dp-noise-multiplier"]),
            clipping_norm=float(run["dp-clipping-norm"]),
            num_sampled_clients=nodes,
        )
    if bool(run["audit"]):
        strategy = audited(strategy, model=make_net(hidden), **_audit_options(run))
    legacy_context = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=int(run["num-server-rounds"])),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=int(run["num-shares"]),
            reconstruction_threshold=int(run["reconstruction-threshold"]),
            max_weight=float(run["local-examples"]),
        )
    )
    workflow(grid, legacy_context)


#: Seconds the number of connected nodes must hold still before the rounds start: nodes
#: register one by one, and a count taken at the first one misses the others.
SETTLE_SECONDS = 2.0


def _connected_nodes(grid: Grid, poll: float = 0.5) -> int:
    """The number of nodes connected to ``grid`` once at least one is and the count has not
    changed for :data:`SETTLE_SECONDS`."""
    count, since = 0, time.perf_counter()
    while True:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.perf_counter()
        elif count and time.perf_counter() - since >= SETTLE_SECONDS:
            return count
        time.sleep(poll)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds; log and save the wall time (with or without the audit)."""
    run = settings(context)
    nodes = _connected_nodes(grid)
    start = time.perf_counter()
    if bool(run["secure-aggregation"]):
        _secure_aggregation(grid, context, run, nodes)
    else:
        _message_api(grid, run, nodes)
    seconds = time.perf_counter() - start
    log(
        INFO,
        "flower-audit: %s round(s), %s clients, audit %s: %.1f s",
        run["num-server-rounds"],
        nodes,
        run["audit"],
        seconds,
    )
    timing = {
        "rounds": int(run["num-server-rounds"]),
        "clients": nodes,
        "audit": bool(run["audit"]),
        "secure_aggregation": bool(run["secure-aggregation"]),
        "dp": bool(run["dp"]),
        "wall_seconds": seconds,
    }
    out = Path(str(run["audit-dir"])).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    name = "run_audited.json" if timing["audit"] else "run_plain.json"
    (out / name).write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")
