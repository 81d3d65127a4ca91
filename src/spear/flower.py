"""Audit a Flower federation: every client update the server receives is attacked.

::

    from flwr.serverapp.strategy import FedAvg
    from spear.flower import audited

    strategy = audited(FedAvg(...), model=net, out="audit/")   # still a Flower Strategy
    strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=3)

:func:`audited` wraps a strategy of Flower's Message API (``flwr.serverapp.strategy``,
Flower 1.21 and later) without changing what it sends or aggregates: the wrapper
remembers the arrays each node was sent in ``configure_train``, and in
``aggregate_train`` attacks every reply (returned arrays minus the arrays sent, or the
returned arrays themselves for clients that send gradients) before handing the replies,
untouched, to the wrapped strategy. Every other method and attribute is the wrapped
strategy's. The findings go to ``out/report.json`` (see :mod:`spear.auditor` for the
record keys), ``report.md`` and ``report.html``, rewritten after every round.

Flower's defences, and what the server sees under them:

* client-side DP (``DifferentialPrivacyClientSideFixedClipping`` or ``...AdaptiveClipping``
  with ``fixedclipping_mod`` / ``adaptiveclipping_mod`` on the clients): each reply is the
  client's clipped update, and the noise is added by the server *after* aggregation, so
  the replies are attacked as they come. Wrap the DP strategy
  (``audited(DifferentialPrivacyClientSideFixedClipping(FedAvg(...), ...), ...)``) or the
  inner one; both see the same replies. Server-side clipping wrappers clip the replies in
  place: wrap them from outside to attack what the clients sent.
* ``LocalDpMod`` (clients add noise themselves): the replies are noisy and attacked as
  they come.
* secure aggregation (``SecAggPlusWorkflow``, ``SecAggWorkflow``): these workflows run
  only with Flower's legacy strategies (``flwr.server.strategy``, through
  ``LegacyContext`` and ``DefaultWorkflow``), so :func:`audited` also wraps those. The
  server then sees only the weighted average of the sampled clients' models (after the
  protocol's quantisation); that average minus the model sent is attacked as one batch
  of all their examples, recorded with ``node = "aggregate"`` and ``clients`` the number
  of clients summed, and a note says so.

Attacks never stop training: each one has a time budget (``time_budget`` seconds of
search per update), errors are recorded in the record's ``"error"`` and not raised, and
``every`` / ``sample`` attack only some rounds or some updates. Ctrl-C during an attack
writes the report with what was found and stops the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray
from torch import nn

from spear.auditor import AuditOptions, UpdateAuditor, select_updates
from spear.errors import InputError
from spear.update import UpdateKind

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.common import (
        EvaluateIns,
        EvaluateRes,
        FitIns,
        FitRes,
        Parameters,
        Scalar,
        parameters_to_ndarrays,
    )
    from flwr.common.logger import log
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy as LegacyStrategy
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as _error:  # pragma: no cover - exercised without flwr installed
    raise ImportError(
        "spear.flower needs Flower with its Message API (flwr >= 1.21), which is not "
        f'installed here ({_error}). Install the extra: pip install "spear[flower]".'
    ) from _error

__all__ = ["AGGREGATE_NODE", "AuditedLegacyStrategy", "AuditedStrategy", "audited", "read_report"]

_INFO = 20
NDArrays = dict[str, NDArray[Any]]

#: Node name of a record that attacked a secure-aggregation sum.
AGGREGATE_NODE = "aggregate"


def _record_arrays(record: ArrayRecord) -> NDArrays:
    """An ``ArrayRecord`` as name -> NumPy array (copies, in the record's order)."""
    return {name: np.array(array.numpy(), copy=True) for name, array in record.items()}


def _only_arrays(content: Any, preferred: str) -> ArrayRecord | None:
    """The one ``ArrayRecord`` of a message's content (``preferred`` key when several)."""
    records = content.array_records
    if len(records) == 1:
        return next(iter(records.values()))  # type: ignore[no-any-return]
    if preferred in records:
        return records[preferred]  # type: ignore[no-any-return]
    return None


class _Audit:
    """What both wrappers share: the auditor and the arrays sent per round and node."""

    def __init__(self, auditor: UpdateAuditor, secure_aggregation: bool | None) -> None:
        self.auditor = auditor
        self.secure_aggregation = secure_aggregation
        self.sent: dict[int, dict[Any, tuple[int, NDArrays]]] = {}

    def remember(self, server_round: int, pairs: Iterable[tuple[Any, Any]]) -> None:
        """``pairs`` of (node, record as sent); records are converted once each."""
        converted: dict[int, tuple[int, NDArrays]] = {}
        per_node: dict[Any, tuple[int, NDArrays]] = {}
        for node, record in pairs:
            key = id(record)
            if key not in converted:
                converted[key] = (len(converted), self._to_arrays(record))
            per_node[node] = converted[key]
        self.sent = {r: v for r, v in self.sent.items() if r >= server_round - 1}
        self.sent[server_round] = per_node

    @staticmethod
    def _to_arrays(record: Any) -> NDArrays:
        if isinstance(record, ArrayRecord):
            return _record_arrays(record)
        arrays = parameters_to_ndarrays(record)
        return {str(index): array for index, array in enumerate(arrays)}

    def audit(self, server_round: int, replies: Sequence[tuple[Any, NDArrays | None]]) -> None:
        """Attack the chosen replies of a round, then write the report."""
        sent = self.sent.pop(server_round, {})
        chosen = select_updates([node for node, _ in replies], server_round, self.auditor.options)
        arrays = dict(replies)
        done = []
        for node in chosen:
            returned = arrays[node]
            if node not in sent or returned is None:
                done.append(self._missing(server_round, node, node not in sent))
                continue
            key, sent_arrays = sent[node]
            done.append(
                self.auditor.attack_update(
                    server_round, node, sent_arrays, returned, sent_key=(server_round, key)
                )
            )
        self._finish(server_round, len(replies), done)

    def audit_sum(self, server_round: int, clients: int, returned: NDArrays, note: str) -> None:
        """Attack the aggregate of a secure-aggregation round as one batch."""
        sent = self.sent.pop(server_round, {})
        done = []
        if select_updates([AGGREGATE_NODE], server_round, self.auditor.options):
            if not sent:
                done.append(self._missing(server_round, AGGREGATE_NODE, True))
            else:
                key, sent_arrays = next(iter(sent.values()))
                done.append(
                    self.auditor.attack_update(
                        server_round,
                        AGGREGATE_NODE,
                        sent_arrays,
                        returned,
                        clients=clients,
                        note=note,
                        sent_key=(server_round, key),
                    )
                )
        self._finish(server_round, 1, done)

    def _missing(self, server_round: int, node: Any, unsent: bool) -> dict[str, Any]:
        record = {
            "round": server_round,
            "node": node,
            "clients": 1,
            "update_kind": self.auditor.options.update_kind,
            "batch_size": None,
            "recovered": 0,
            "complete": False,
            "verified": False,
            "examples_verified": False,
            "certificate": None,
            "labels": None,
            "estimate": False,
            "seconds": 0.0,
            "layer": None,
            "dtype": None,
            "grid": None,
            "reconstruction": None,
            "notes": [],
            "error": (
                "InputError: no arrays were sent to this node through the audited strategy "
                "this round"
                if unsent
                else "InputError: the reply holds no single ArrayRecord to attack"
            ),
        }
        self.auditor.records.append(record)
        return record

    def _finish(self, server_round: int, updates: int, done: list[dict[str, Any]]) -> None:
        self.auditor.end_round(server_round, updates, done)
        recovered = sum(int(r["recovered"]) for r in done)
        log(
            _INFO,
            "spear audit: round %s: %s of %s update(s) attacked, %s example(s) recovered (%s)",
            server_round,
            len(done),
            updates,
            recovered,
            self.auditor.out / "report.html",
        )


class AuditedStrategy(Strategy):
    """A Message-API Flower strategy whose every reply is attacked (see :func:`audited`).

    Parameters
    ----------
    strategy:
        The wrapped ``flwr.serverapp.strategy.Strategy``; it decides everything.
    auditor:
        Attacks the updates and writes the report.

    Attributes
    ----------
    strategy:
        The wrapped strategy (its other attributes are also reachable on the wrapper).
    auditor:
        :class:`spear.auditor.UpdateAuditor`; ``auditor.records`` holds the records.
    """

    def __init__(self, strategy: Strategy, auditor: UpdateAuditor) -> None:
        self.strategy = strategy
        self.auditor = auditor
        self._audit = _Audit(auditor, None)

    def __getattr__(self, name: str) -> Any:
        if name in ("strategy", "auditor", "_audit"):
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"audited({self.strategy!r}, out={str(self.auditor.out)!r})"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages, unchanged; the arrays each node gets are noted."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        key = getattr(self.strategy, "arrayrecord_key", "arrays")
        pairs = []
        for message in messages:
            record = _only_arrays(message.content, key)
            pairs.append((message.metadata.dst_node_id, record if record is not None else arrays))
        self._audit.remember(server_round, pairs)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Attack the replies, then aggregate them with the wrapped strategy."""
        replies = list(replies)
        key = getattr(self.strategy, "arrayrecord_key", "arrays")
        seen = []
        for reply in replies:
            if reply.has_error():
                continue
            record = _only_arrays(reply.content, key)
            seen.append(
                (reply.metadata.src_node_id, _record_arrays(record) if record is not None else None)
            )
        self._audit.audit(server_round, seen)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """The wrapped strategy's summary, then where the audit report goes."""
        self.strategy.summary()
        log(_INFO, "\t└──> spear audit: report in %s", self.auditor.out)


class AuditedLegacyStrategy(LegacyStrategy):
    """A legacy Flower strategy (``flwr.server.strategy``) whose fit results are attacked.

    Needed for secure aggregation (``SecAggPlusWorkflow`` runs legacy strategies only).
    Under secure aggregation every result carries the same aggregate; it is attacked once
    as the update of all the sampled clients together (see :func:`audited`).
    """

    def __init__(
        self,
        strategy: LegacyStrategy,
        auditor: UpdateAuditor,
        secure_aggregation: bool | None = None,
    ) -> None:
        self.strategy = strategy
        self.auditor = auditor
        self._audit = _Audit(auditor, secure_aggregation)

    def __getattr__(self, name: str) -> Any:
        if name in ("strategy", "auditor", "_audit"):
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"audited({self.strategy!r}, out={str(self.auditor.out)!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The wrapped strategy's."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The wrapped strategy's instructions, unchanged; the parameters sent are noted."""
        pairs = self.strategy.configure_fit(server_round, parameters, client_manager)
        self._audit.remember(
            server_round, [(proxy.node_id, ins.parameters) for proxy, ins in pairs]
        )
        return pairs

    def _is_sum(self, results: list[tuple[ClientProxy, FitRes]]) -> bool:
        if self._audit.secure_aggregation is not None:
            return self._audit.secure_aggregation
        first = results[0][1].parameters
        return len(results) > 1 and all(res.parameters is first for _, res in results)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Attack the results (or their secure-aggregation sum), then aggregate them."""
        if results and self._is_sum(results):
            note = (
                f"secure aggregation: only the weighted average of {len(results)} clients' "
                "models is visible to the server; it was attacked as one update of all their "
                "examples together (the clients cannot be told apart)."
            )
            self._audit.audit_sum(
                server_round, len(results), self._audit._to_arrays(results[0][1].parameters), note
            )
        else:
            replies = [
                (proxy.node_id, self._audit._to_arrays(res.parameters)) for proxy, res in results
            ]
            self._audit.audit(server_round, replies)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """The wrapped strategy's."""
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """The wrapped strategy's."""
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """The wrapped strategy's."""
        return self.strategy.evaluate(server_round, parameters)


@overload
def audited(
    strategy: Strategy,
    *,
    model: nn.Module,
    out: str | Path = ...,
    update_kind: UpdateKind = ...,
    time_budget: float = ...,
    every: int = ...,
    sample: float | int | None = ...,
    seed: int = ...,
    batch_size: int | None = ...,
    input_shape: tuple[int, ...] | None = ...,
    save_images: bool = ...,
    threads: int | None = ...,
    secure_aggregation: bool | None = ...,
) -> AuditedStrategy: ...


@overload
def audited(
    strategy: LegacyStrategy,
    *,
    model: nn.Module,
    out: str | Path = ...,
    update_kind: UpdateKind = ...,
    time_budget: float = ...,
    every: int = ...,
    sample: float | int | None = ...,
    seed: int = ...,
    batch_size: int | None = ...,
    input_shape: tuple[int, ...] | None = ...,
    save_images: bool = ...,
    threads: int | None = ...,
    secure_aggregation: bool | None = ...,
) -> AuditedLegacyStrategy: ...


def audited(
    strategy: Strategy | LegacyStrategy,
    *,
    model: nn.Module,
    out: str | Path = "audit",
    update_kind: UpdateKind = "delta",
    time_budget: float = 30.0,
    every: int = 1,
    sample: float | int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    save_images: bool = True,
    threads: int | None = 1,
    secure_aggregation: bool | None = None,
) -> AuditedStrategy | AuditedLegacyStrategy:
    """Wrap a Flower strategy so that every client update it receives is attacked.

    Parameters
    ----------
    strategy:
        A Message-API strategy (``flwr.serverapp.strategy``: ``FedAvg``, ``FedProx``,
        the DP wrappers, ...) or a legacy one (``flwr.server.strategy``, for secure
        aggregation workflows).
    model:
        The ``nn.Module`` the federation trains (any model :func:`spear.attack` accepts).
        Only its architecture is used: each round's weights are the arrays the server
        sent, mapped onto ``model.state_dict()`` by name (or by position for unnamed
        arrays), in their own dtype.
    out:
        Folder of ``report.json``, ``report.md``, ``report.html`` and the per-update
        reconstructions (created when missing).
    update_kind:
        ``"delta"`` when clients return trained weights (FedAvg and friends: the update
        is returned minus sent), ``"gradient"`` when they return a gradient.
    time_budget:
        Seconds of search per update; the most one attack holds up its round (plus about
        a second for labels and the certificate).
    every:
        Attack every ``every``-th round only (rounds 1, 1 + every, ...).
    sample:
        Updates attacked per round: ``None`` (all), a fraction in ``(0, 1]`` or a count.
    seed:
        Seed of the sampling and the attacks.
    batch_size:
        The clients' batch size, when known.
    input_shape:
        Shape of one model input, e.g. ``(1, 28, 28)`` (default: guessed).
    save_images:
        Write each update's reconstructions and image grid.
    threads:
        torch threads during each attack (restored afterwards; ``None``: unchanged).
    secure_aggregation:
        Legacy strategies only: ``True`` treats every round's results as one
        secure-aggregation sum, ``False`` as separate client updates, ``None`` decides
        per round (results that all carry the same parameters object are a sum, as
        ``SecAggPlusWorkflow`` delivers them).

    Returns
    -------
    AuditedStrategy or AuditedLegacyStrategy
        A strategy of the same API as ``strategy``, which sends and aggregates exactly
        what ``strategy`` does.

    Raises
    ------
    InputError
        For a ``strategy`` that is not a Flower strategy, a ``model`` that is not an
        ``nn.Module``, or options out of range.
    """
    options = AuditOptions(
        update_kind=update_kind,
        time_budget=time_budget,
        every=every,
        sample=sample,
        seed=seed,
        batch_size=batch_size,
        input_shape=input_shape,
        save_images=save_images,
        threads=threads,
    )
    auditor = UpdateAuditor(model, out, options, title="spear audit of a Flower run")
    if isinstance(strategy, Strategy):
        if secure_aggregation:
            raise InputError(
                "secure_aggregation=True needs a legacy strategy (flwr.server.strategy): "
                "Flower runs SecAgg+ only with those. Message-API strategies see every "
                "client's reply."
            )
        return AuditedStrategy(strategy, auditor)
    if isinstance(strategy, LegacyStrategy):
        return AuditedLegacyStrategy(strategy, auditor, secure_aggregation)
    raise InputError(
        f"audited() wraps a Flower strategy (flwr.serverapp.strategy.Strategy, or a legacy "
        f"flwr.server.strategy.Strategy), found {type(strategy).__name__}. Pass e.g. "
        "audited(FedAvg(), model=net)."
    )


def read_report(out: str | Path) -> Mapping[str, Any]:
    """``out/report.json`` as written by an audited strategy (``{"records": [...], ...}``)."""
    import json

    return dict(json.loads((Path(out) / "report.json").read_text(encoding="utf-8")))
