"""What each stage of a round did, as recorded in the run's metrics file.

A reason may quote what a node sent; it is recorded as one line of printable characters of bounded
length. The means combine per-node figures with weights that sum to 1, so that finite figures give
a finite mean however large the counts behind the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from florist.federation.console import show_event
from florist.federation.evaluation_sums import EvaluationSums

if TYPE_CHECKING:
    from collections.abc import Mapping

    from florist.aggregation import GlobalModule
    from florist.federation.validation import ClientUpdate


MAX_REASON = 500
"""Characters of a recorded reason, beyond which it is cut."""


def one_line(text: str) -> str:
    """`text` as one line of printable characters (the others escaped), cut at MAX_REASON."""
    line = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: MAX_REASON + 1])
    return line if len(line) <= MAX_REASON else f"{line[:MAX_REASON]}... ({len(text)} characters)"


def weighted_mean(values: list[float], counts: list[int | float]) -> float:
    """The mean of `values` weighted by `counts`; every weight is divided by the total first."""
    total = sum(counts)
    return math.fsum(value * (count / total) for value, count in zip(values, counts, strict=True))


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
        reason = one_line(reason)
        self.events.append(Event(node, status, reason, partition))
        show_event(self.round, node, status, reason)


@dataclass
class ClientReport:
    partition: int
    node: int
    rank: int
    examples: int
    """What the node claimed."""
    weight: float
    """What the aggregate weighed it by: its examples, capped (validation.max_weight_share)."""
    clipped: dict[str, float]
    """The factor each of its norms was scaled down by (validation.clip_factor); empty where none was."""
    train_loss: float
    train_seconds: float
    train_tokens: int
    bytes_down: int
    bytes_up: int
    peak_rss_mib: float

    @classmethod
    def from_update(cls, node: int, update: ClientUpdate, bytes_down: int, weight: float, clipped: dict[str, float]) -> ClientReport:
        metrics = update.metrics
        return cls(
            partition=update.partition,
            node=node,
            rank=update.rank,
            examples=update.examples,
            weight=weight,
            clipped=clipped,
            train_loss=float(metrics["train-loss"]),
            train_seconds=float(metrics["train-seconds"]),
            train_tokens=int(metrics["train-tokens"]),
            bytes_down=bytes_down,
            bytes_up=update.bytes_up,
            peak_rss_mib=float(metrics["peak-rss-mib"]),
        )


@dataclass
class SummedClientReport:
    """A site of a secure-sum round (privacy.secure_aggregation): who it is and what it exchanged.
    Its examples, weight, train loss, tokens and clipping are only in the round's `totals`."""

    partition: int
    node: int
    rank: int
    bytes_down: int
    bytes_up: int


@dataclass
class RoundReport(Stage):
    """What one train stage (a round) did, for the run's metrics file."""

    sampled: list[int] = field(default_factory=list)
    quorum: int = 0
    attempts: int = 0
    clients: list[ClientReport | SummedClientReport] = field(default_factory=list)
    aggregation_seconds: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)
    energy: dict[str, float | None] = field(default_factory=dict)
    secure: dict = field(default_factory=dict)
    """florist-secure: the sketch width, the sites summed, the update's norm, and the privacy spent."""
    totals: dict = field(default_factory=dict)
    """A secure-sum round's (federation/training_totals.py): the summed sites' examples, train tokens,
    weighted mean train loss and, under privacy.dp, how many were clipped; empty otherwise."""

    def record_ranks(self, modules: Mapping[str, GlobalModule]) -> None:
        """The rank and spectral energy kept of each module of the round's global update."""
        self.ranks = {name: module.rank for name, module in modules.items()}
        self.energy = {name: module.energy for name, module in modules.items()}

    @property
    def train_loss(self) -> float:
        """The clients' losses as the aggregate weighs them."""
        if self.totals:
            return self.totals["train_loss"]
        return weighted_mean([c.train_loss for c in self.clients], [c.weight for c in self.clients])


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
        """Every node's scores combined: losses per token over all nodes' tokens, the other
        metrics weighted by each node's test examples."""
        combined: dict[str, float] = {}
        for split in ("test", "val"):
            loss, count = f"{split}_loss", f"{split}_tokens"
            counted = [s for s in self.scores if loss in s.metrics and s.metrics.get(count, 0) > 0]
            if counted:
                combined[loss] = weighted_mean([s.metrics[loss] for s in counted], [s.metrics[count] for s in counted])
                combined[count] = sum(s.metrics[count] for s in counted)
                combined[f"{split}_perplexity"] = math.exp(combined[loss])
        tested = [s for s in self.scores if s.examples > 0]
        if tested:
            examples = [s.examples for s in tested]
            shared = set.intersection(*(set(s.metrics) for s in tested)) - set(combined)
            combined |= {key: weighted_mean([s.metrics[key] for s in tested], examples) for key in shared}
            combined["examples"] = sum(examples)
        return dict(sorted(combined.items()))

    def record(self) -> dict:
        return {"combined": self.combined(), "nodes": [vars(score) for score in self.scores], "events": [vars(e) for e in self.events]}


@dataclass
class SecureEvaluationReport(EvaluationReport):
    """florist-secure's federated evaluation stage: the sum of the sites' sums and how many sites
    are in it, and no site's own scores (federation/evaluation_sums.py)."""

    sums: EvaluationSums = field(default_factory=EvaluationSums)
    sites: int = 0
    min_sites: int = 1
    """federation.min_sites: a sum of fewer sites is not combined."""

    def combined(self) -> dict[str, float]:
        return self.sums.combined() if self.sites >= self.min_sites else {}

    def record(self) -> dict:
        return {"combined": self.combined(), "sites_summed": self.sites, "events": [vars(e) for e in self.events]}


@dataclass
class TauSelection(Stage):
    """Automatic tau: each node's validation loss for every candidate cut, and the choice."""

    candidates: list[float] = field(default_factory=list)
    ranks: dict[float, dict[str, int]] = field(default_factory=dict)
    scores: dict[int, tuple[int, int, list[float]]] = field(default_factory=dict)
    """node -> (partition, validation tokens, loss per candidate)."""
    loss: list[float] = field(default_factory=list)
    chosen: float | None = None

    def combined(self) -> list[float]:
        """Each candidate's validation loss per token over every node that scored."""
        tokens = [t for _, t, _ in self.scores.values()]
        if not sum(tokens):
            return []
        return [weighted_mean([losses[i] for _, _, losses in self.scores.values()], tokens) for i in range(len(self.candidates))]

    def record(self) -> dict:
        return {
            "candidates": self.candidates,
            "validation_loss": self.loss,
            "chosen": self.chosen,
            "total_rank": {str(tau): sum(ranks.values()) for tau, ranks in self.ranks.items()},
            "nodes": [{"node": n, "partition": p, "tokens": t, "loss": losses} for n, (p, t, losses) in sorted(self.scores.items())],
            "events": [vars(e) for e in self.events],
        }
