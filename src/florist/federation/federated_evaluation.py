"""Federated evaluation: every connected node scores the global model on its own held-out
examples, and the server records each node's scores.

Scores are whatever metrics a node sends beside those about the reply itself, each a finite number
(`Reply.read`); the ones the server combines by tokens are checked further: a split's loss is a
mean negative log-likelihood whose perplexity exp(loss) is a float, and its token count an integer.

Under florist-secure (`SecureFederatedEvaluation`) a node sends sums only, and the server adds
them and records no node's own (federation/evaluation_sums.py).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Message

from florist.config import RunConfig
from florist.federation.evaluation_sums import ABOUT_THE_REPLY, MAX_LOSS, SPLITS, EvaluationSums
from florist.federation.messages import EVALUATED, Reply
from florist.federation.reports import EvaluationReport, NodeScore, SecureEvaluationReport

Instruct = Callable[[int], tuple[Message, int]]
"""node -> its instruction and the payload bytes it carries."""


class FederatedEvaluation:
    """One evaluation stage, from its instructions to the report of every node's scores."""

    def __init__(self, server_round: int, max_examples: int, round_timeout: float):
        self.report = EvaluationReport(server_round)
        self.max_examples = max_examples
        self.round_timeout = round_timeout

    def configure(self, nodes: list[int], instruct: Instruct) -> list[Message]:
        messages = []
        for node in nodes:
            message, sent = instruct(node)
            self.report.bytes_down[node] = sent
            messages.append(message)
        return messages

    def receive(self, node: int, reply: Reply) -> bool:
        """Record the node's scores, or why they are rejected (a reply that cannot be read raises
        `Malformed`); whether they were recorded. Everything is read before anything is recorded."""
        report = self.report
        examples = reply.integer("num-examples")
        if reply.status != EVALUATED or not 0 <= examples <= self.max_examples:
            report.event(node, "rejected", f"evaluation reply: status {reply.status!r}, {examples} examples", reply.partition)
            return False
        for split in SPLITS:
            if f"{split}_tokens" in reply.metrics:
                reply.integer(f"{split}_tokens")  # a count: Malformed unless an integer >= 0
            if f"{split}_loss" in reply.metrics and not 0 <= reply.number(f"{split}_loss") <= MAX_LOSS:
                report.event(node, "rejected", f"{split}_loss {reply.number(f'{split}_loss')!r} is outside [0, {MAX_LOSS:g}]", reply.partition)
                return False
        scores = {key: float(value) for key, value in reply.metrics.items() if key not in ABOUT_THE_REPLY}
        report.scores.append(NodeScore(node, reply.partition, examples, scores))
        return True

    def finish(self, late: list[int]) -> EvaluationReport:
        report = self.report
        for node in late:
            report.event(node, "late", f"no evaluation reply within federation.round_timeout = {self.round_timeout:g} s")
        report.scores.sort(key=lambda score: score.partition)
        return report


class SecureFederatedEvaluation(FederatedEvaluation):
    """florist-secure's evaluation stage: every node's sums go into one total, which is combined
    only if at least federation.min_sites nodes are in it."""

    def __init__(self, server_round: int, max_examples: int, round_timeout: float, min_sites: int):
        super().__init__(server_round, max_examples, round_timeout)
        self.report = SecureEvaluationReport(server_round, min_sites=min_sites)

    def receive(self, node: int, reply: Reply) -> bool:
        """Add the node's sums (`EvaluationSums.read`; `Malformed` if it sends anything else, or
        out of bounds); whether they were added. A rejection quotes none of its values."""
        report = self.report
        if reply.status != EVALUATED:
            report.event(node, "rejected", f"evaluation reply: status {reply.status!r}", reply.partition)
            return False
        report.sums += EvaluationSums.read(reply, self.max_examples)
        report.sites += 1
        return True

    def finish(self, late: list[int]) -> EvaluationReport:
        report = super().finish(late)
        if report.sites < report.min_sites:
            report.event(0, "withheld", f"{report.sites} sites' evaluation sums, below federation.min_sites = {report.min_sites}: not combined")
        return report


def evaluation_stage(config: RunConfig, server_round: int, max_examples: int) -> FederatedEvaluation:
    """The run's federated evaluation stage for `server_round`: sums only under florist-secure."""
    federation = config.federation
    if config.aggregation.secure:
        return SecureFederatedEvaluation(server_round, max_examples, federation.round_timeout, federation.min_sites)
    return FederatedEvaluation(server_round, max_examples, federation.round_timeout)
