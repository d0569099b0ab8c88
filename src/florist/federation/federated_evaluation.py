"""Federated evaluation: every connected node scores the global model on its own held-out
examples, and the server records each node's scores.

Scores are whatever metrics a node sends beside those about the reply itself, each a finite number
(`Reply.read`); the ones the server combines by tokens are checked further: a split's loss is a
mean negative log-likelihood whose perplexity exp(loss) is a float, and its token count an integer.

Under florist-secure (`SecureFederatedEvaluation`) a node sends sums only, and the server adds
them and records no node's own (federation/evaluation_sums.py). With privacy.secure_aggregation
(`MaskedFederatedEvaluation`) those sums are masked by the secure-sum protocol: the evaluate
instruction carries its setup, each site answers with its public keys, and the server reads only
the sum of the sites' sums that the protocol's later stages (federation/secure_round.py) unmask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from florist.config import RunConfig
from florist.federation.evaluation_sums import (
    ABOUT_THE_REPLY,
    EVALUATION_SESSIONS,
    MAX_LOSS,
    SPLITS,
    EvaluationSums,
    masked_layout,
    run_categories,
)
from florist.federation.messages import EVALUATED, SECURE_SUM, Malformed, Reply
from florist.federation.reports import EvaluationReport, NodeScore, SecureEvaluationReport
from florist.federation.secure_sum import PublicKeys, Quantizer, SecureSumServer
from florist.federation.secure_sum.server import threshold_for

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

    def instruct(self, content: RecordDict) -> int:
        """What the stage adds to each of its instructions (`content`): nothing; the bytes it adds."""
        return 0

    def receive(self, node: int, reply: Reply, message: Message) -> bool:
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

    def receive(self, node: int, reply: Reply, message: Message) -> bool:
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


class MaskedFederatedEvaluation(SecureFederatedEvaluation):
    """florist-secure's evaluation stage with privacy.secure_aggregation: the evaluate instruction is
    the secure sum's setup (session EVALUATION_SESSIONS + the round, the layout of the run's
    categories), every node answers with its public keys, and the server adds only the sum the
    protocol unmasks (secure_round.secure_sum_stages), combined if at least federation.min_sites
    sites are in it."""

    def __init__(self, config: RunConfig, server_round: int, max_examples: int):
        federation = config.federation
        super().__init__(server_round, max_examples, federation.round_timeout, federation.min_sites)
        self.config, self.categories = config, run_categories(config)
        self.server: SecureSumServer | None = None
        self.taking_keys = False
        """The stage's instructions carry the sum's setup: from `configure` to `finish` (a resend included)."""

    def configure(self, nodes: list[int], instruct) -> list[Message]:
        privacy, min_sites = self.config.privacy, self.config.federation.min_sites
        threshold = threshold_for(len(nodes), privacy.secure_threshold, min_sites)
        quantizer = Quantizer(privacy.secure_clip_range, privacy.secure_bits)
        session = EVALUATION_SESSIONS + self.report.round
        self.server = SecureSumServer(session, list(nodes), threshold, min_sites, quantizer, masked_layout(self.categories))
        self.taking_keys = True
        return super().configure(nodes, instruct)

    def instruct(self, content: RecordDict) -> int:
        """The sum's setup in the instruction, while the stage takes the sites' keys."""
        if not self.taking_keys:
            return 0
        record = self.server.setup.record()
        content[SECURE_SUM] = record
        return record.count_bytes()

    def receive(self, node: int, reply: Reply, message: Message) -> bool:
        """Take the node's public keys for the sum (`ProtocolRefused`/`Malformed` if the reply holds
        anything else); whether they were taken."""
        report = self.report
        if reply.status != EVALUATED:
            report.event(node, "rejected", f"evaluation reply: status {reply.status!r}", reply.partition)
            return False
        clear = sorted(set(reply.metrics) - {"round", "partition-id", "chain-length"})
        if clear:
            raise Malformed(f"metric {clear[0]} travels masked in the secure sum, not in the clear")
        record = message.content.get(SECURE_SUM)
        if not isinstance(record, ConfigRecord):
            raise Malformed(f"the secure-sum keys are {type(record).__name__}, not a ConfigRecord")
        self.server.receive_keys(node, PublicKeys.read(record))
        report.bytes_up[node] = report.bytes_up.get(node, 0) + record.count_bytes()
        return True

    def add_sum(self, total: dict[str, torch.Tensor], survivors: list[int]) -> None:
        report = self.report
        for node in sorted(set(self.server.keys) - set(survivors)):
            report.event(node, "failed", "its masked evaluation sums are not in the secure sum (it dropped out before unmasking)")
        report.sums, report.sites = EvaluationSums.of_total(total, self.categories), len(survivors)

    def sum_failed(self, reason: str) -> None:
        self.report.event(0, "failed", f"evaluation {reason}")

    def finish(self, late: list[int]) -> EvaluationReport:
        self.taking_keys = False
        return super().finish(late)


def evaluation_stage(config: RunConfig, server_round: int, max_examples: int) -> FederatedEvaluation:
    """The run's federated evaluation stage for `server_round`: sums only under florist-secure,
    masked by the secure-sum protocol with privacy.secure_aggregation."""
    federation = config.federation
    if config.aggregation.secure and config.privacy.secure_aggregation:
        return MaskedFederatedEvaluation(config, server_round, max_examples)
    if config.aggregation.secure:
        return SecureFederatedEvaluation(server_round, max_examples, federation.round_timeout, federation.min_sites)
    return FederatedEvaluation(server_round, max_examples, federation.round_timeout)
