"""The ClientApp: trains the MLP on this node's partition and returns the new weights.

Rounds of the Message API (``FedAvg.start``) arrive as ``{"arrays", "config"}`` messages;
with client-side DP the config carries a clipping norm and ``fixedclipping_mod`` clips
the reply. SecAgg+ runs Flower's legacy workflow, whose messages are answered by a
legacy ``NumPyClient`` behind ``secaggplus_mod`` (and ``fixedclipping_mod`` with DP).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod as legacy_clipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from flower_audit.task import local_batch, make_net, partition, settings, train

KEY_CLIPPING_NORM = "clipping_norm"


def _fit(weights: dict[str, Any], config: dict[str, Any], context: Context) -> tuple[Any, int]:
    """Train on this round's local examples; the new state dict and the example count."""
    run = settings(context)
    net = make_net(int(run["hidden"]))
    net.load_state_dict(weights)
    part = int(context.node_config["partition-id"])
    images, labels = partition(part, int(context.node_config["num-partitions"]))
    server_round = int(config.get("server-round", 0))
    x, y = local_batch(images, labels, int(run["local-examples"]), (part, server_round))
    train(
        net,
        x,
        y,
        epochs=int(run["local-epochs"]),
        batch_size=int(run["batch-size"]),
        lr=float(run["learning-rate"]),
        seed=1000 * part + server_round,
    )
    return net.state_dict(), len(x)


# ---- Message API ----------------------------------------------------------------------

app = ClientApp()


def _train_message(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_torch_state_dict()
    state, count = _fit(weights, dict(msg.content["config"]), context)
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": count})}
    )
    return Message(content=content, reply_to=msg)


# ---- legacy API (SecAgg+) -------------------------------------------------------------


class _Client(NumPyClient):  # type: ignore[misc]
    def __init__(self, context: Context) -> None:
        self.context = context
        self.names = list(make_net(int(settings(context)["hidden"])).state_dict())

    def fit(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[list[Any], int, dict[str, Any]]:
        import torch

        weights = {n: torch.from_numpy(p) for n, p in zip(self.names, parameters, strict=True)}
        state, count = _fit(weights, config, self.context)
        return [v.numpy() for v in state.values()], count, {}


def _client_fn(context: Context) -> Any:
    return _Client(context).to_client()


_secagg = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
_secagg_dp = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod, legacy_clipping_mod])


def _is_legacy(msg: Message) -> bool:
    keys = set(msg.content.keys())
    return RECORD_KEY_CONFIGS in keys or any(k.startswith(("fitins", "evaluateins")) for k in keys)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One round of local training, whichever protocol the server runs."""
    if _is_legacy(msg):
        legacy = _secagg_dp if bool(settings(context)["dp"]) else _secagg
        return legacy(msg, context)
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, _train_message)
    return _train_message(msg, context)
