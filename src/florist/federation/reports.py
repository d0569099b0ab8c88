"""What each stage of a round did, as recorded in the run's metrics file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from florist.federation.console import show_event


@dataclass
class Event:
    """Something that happened to one node in a stage: accepted, failed, late, refused, rejected, resent."""

    node: int
    status: str
    reason: str = ""
    partition: int | None = None


@dataclass
class Stage:
    """One train or evaluate stage: its events, bytes sent per node, resends per node."""

    round: int
    events: list[Event] = field(default_factory=list)
    bytes_down: dict[int, int] = field(default_factory=dict)
    """Payload bytes sent to each node (resends included)."""
    bytes_up: dict[int, int] = field(default_factory=dict)
    """Payload bytes received from each node, its rejected replies included."""
    resends: dict[int, int] = field(default_factory=dict)

    def event(self, node: int, status: str, reason: str = "", partition: int | None = None) -> None:
        self.events.append(Event(node, status, reason, partition))
        show_event(self.round, node, status, reason)


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
class RoundReport(Stage):
    """What one train stage (a round) did, for the run's metrics file."""

    sampled: list[int] = field(default_factory=list)
    quorum: int = 0
    attempts: int = 0
    clients: list[ClientReport] = field(default_factory=list)
    aggregation_seconds: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)
    energy: dict[str, float | None] = field(default_factory=dict)

    @property
    def train_loss(self) -> float:
        return sum(c.train_loss * c.examples for c in self.clients) / sum(c.examples for c in self.clients)


@dataclass
class NodeScore:
    node: int
    partition: int
    examples: int
    metrics: dict[str, float]


@dataclass
class EvaluationReport(Stage):
    """A federated evaluation stage: each node's scores and their example-weighted means."""

    scores: list[NodeScore] = field(default_factory=list)

    def combined(self) -> dict[str, float]:
        """Every node's scores combined: the loss per token over all nodes' tokens, the rest
        weighted by examples."""
        scored = [s for s in self.scores if s.examples > 0]
        if not scored:
            return {}
        keys = set.intersection(*(set(s.metrics) for s in scored))
        examples = sum(s.examples for s in scored)
        combined = {key: sum(s.metrics[key] * s.examples for s in scored) / examples for key in keys}
        if {"test_loss", "test_tokens"} <= keys:
            tokens = sum(s.metrics["test_tokens"] for s in scored)
            combined["test_loss"] = sum(s.metrics["test_loss"] * s.metrics["test_tokens"] for s in scored) / tokens
            combined["test_tokens"] = tokens
            combined["test_perplexity"] = math.exp(combined["test_loss"])
        combined["examples"] = examples
        return dict(sorted(combined.items()))
