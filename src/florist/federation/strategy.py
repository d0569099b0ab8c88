"""One Flower strategy for every aggregation method: it wraps the engine and owns the round semantics."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from florist.aggregation import Aggregate, ClientAdapter, GlobalModule, LoraFactors, make_aggregator
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.client_app import UPDATE_PREFIX
from florist.lora.model import frozen_lora_A


@dataclass
class ClientReport:
    partition: int
    node: int
    rank: int
    examples: int
    train_loss: float
    train_seconds: float
    train_tokens: int
    bytes_down: int
    bytes_up: int
    peak_rss_mib: float


@dataclass
class RoundReport:
    """What one round did, for the run's metrics file."""

    round: int
    clients: list[ClientReport] = field(default_factory=list)
    aggregation_seconds: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)
    energy: dict[str, float | None] = field(default_factory=dict)


class LoraStrategy(Strategy):
    """FLoRIST and FLoRA: each round's global update is merged into every client's base, and
    each node receives every update it has not seen (once). FedIT, FFA-LoRA and FlexLoRA:
    clients continue from the current global adapter (FlexLoRA: their own truncation;
    FFA-LoRA: B only, since A is derived from the shared seed)."""

    def __init__(self, config: RunConfig, in_features: Mapping[str, int]):
        """`in_features` of each adapted module lets FFA-LoRA's frozen A be re-derived here."""
        self.config = config
        self.in_features = dict(in_features)
        self.aggregator = make_aggregator(config.aggregation.method, **config.aggregation.options())
        self.frozen_a = config.aggregation.method == "ffa"
        self.updates: list[dict[str, GlobalModule]] = []
        self.current: Aggregate | None = None
        self.delivered: dict[int, int] = {}
        self.position: dict[int, int] = {}
        self.bytes_down: dict[int, int] = {}
        self.reports: list[RoundReport] = []
        self.received: list[ClientAdapter] = []
        """The last round's client adapters as the server decoded them, in partition order."""

    @property
    def merges(self) -> bool:
        return not self.aggregator.continues_from_global

    def summary(self) -> None:
        log(INFO, "\t├── florist %s %s", self.aggregator.name, self.config.aggregation.options())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        clients = self.config.federation.num_clients
        nodes, _ = sample_nodes(grid, clients, clients)
        messages = []
        for node in nodes:
            content = RecordDict({"config": ConfigRecord({"round": server_round})})
            sent = 0
            if self.merges:
                for index in range(self.delivered.get(node, 0), len(self.updates)):
                    sent += payload.put(content, f"{UPDATE_PREFIX}{index + 1}", self.updates[index], self.wire)
                self.delivered[node] = len(self.updates)
            elif self.current is not None:
                modules = self.current.modules
                if self.current.per_client is not None and node in self.position:
                    modules = self.current.per_client[self.position[node]]
                sent = payload.put(content, "global", modules, self.wire, factors="B" if self.frozen_a else "AB")
            self.bytes_down[node] = sent
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    @property
    def wire(self) -> str:
        return self.config.federation.wire_dtype

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [reply for reply in replies if reply.has_error()]
        if failed:
            reason = failed[0].error.reason.strip().splitlines()[-1] if failed[0].error.reason else "no reason given"
            raise RuntimeError(f"round {server_round}: {len(failed)} of {len(replies)} clients failed: {reason}")
        replies.sort(key=lambda reply: int(reply.content["metrics"]["partition-id"]))
        report = RoundReport(server_round)
        adapters = []
        for reply in replies:
            metrics = reply.content["metrics"]
            modules = payload.take(reply.content, "adapter")
            adapters.append(ClientAdapter({name: self._factors(name, m) for name, m in modules.items()}, float(metrics["num-examples"])))
            node = reply.metadata.src_node_id
            report.clients.append(
                ClientReport(
                    partition=int(metrics["partition-id"]),
                    node=node,
                    rank=int(metrics["rank"]),
                    examples=int(metrics["num-examples"]),
                    train_loss=float(metrics["train-loss"]),
                    train_seconds=float(metrics["train-seconds"]),
                    train_tokens=int(metrics["train-tokens"]),
                    bytes_down=self.bytes_down.get(node, 0),
                    bytes_up=reply.content["adapter"].count_bytes(),
                    peak_rss_mib=float(metrics["peak-rss-mib"]),
                )
            )
        start = time.perf_counter()
        aggregate = self.aggregator.aggregate(adapters)
        report.aggregation_seconds = time.perf_counter() - start
        report.ranks = {name: module.rank for name, module in aggregate.modules.items()}
        report.energy = {name: module.energy for name, module in aggregate.modules.items()}
        self.current = aggregate
        self.received = adapters
        self.position = {reply.metadata.src_node_id: k for k, reply in enumerate(replies)}
        if self.merges:
            self.updates.append(aggregate.modules)
        self.reports.append(report)
        mean_loss = sum(c.train_loss * c.examples for c in report.clients) / sum(c.examples for c in report.clients)
        return None, MetricRecord({"train-loss": mean_loss, "aggregation-seconds": report.aggregation_seconds})

    def _factors(self, name: str, module: dict) -> LoraFactors:
        if self.frozen_a:
            if name not in self.in_features:
                raise ValueError(f"a client sent module {name}, which the server's model does not adapt")
            a = frozen_lora_A(name, module["B"].shape[1], self.in_features[name], self.config.federation.ffa_seed)
            return LoraFactors(A=a, B=module["B"], scale=module["scale"])
        return LoraFactors(A=module["A"], B=module["B"], scale=module["scale"])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global model itself (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
