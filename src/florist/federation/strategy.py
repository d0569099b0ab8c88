"""The server's coordinator: what each node is sent, what is made of each reply, and the round's result.

It owns the round semantics of every method. FLoRIST and FLoRA: each round's global update is
merged into every client's base, and each node is sent the updates it has not confirmed.
FedIT, FFA-LoRA and FlexLoRA: clients continue from the current global adapter (FlexLoRA:
their own truncation when the server knows their partition; FFA-LoRA: B only, since A is
derived from the shared seed). With `federation.warm_start` FLoRIST's clients start from the last
update's leading components and upload their change since it, from which the server recovers what
each learned before it is aggregated.
Reply checks (intake, validation), a train stage's state (train_round), the partition each node
may deliver (binding), automatic tau (tau_selection), florist-secure's sketches and sums (secure),
federated evaluation, delivery, sampling and the exchange of messages live in their own modules.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from flwr.app import Message, MessageType
from torch import Tensor

from florist.aggregation import Aggregate, AggregationError, ClientAdapter, GlobalModule, make_aggregator
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.binding import PartitionBinding
from florist.federation.checkpoint import ServerState
from florist.federation.console import show_reply
from florist.federation.delivery import Chain, GlobalUpdate, update_digest
from florist.federation.federated_evaluation import FederatedEvaluation, evaluation_stage
from florist.federation.influence import screened_norms
from florist.federation.intake import guarded, identified
from florist.federation.messages import (
    ADAPTER, GAP, GLOBAL, TRAINED, Identity, Instruction, Reply, error_reason, instruction_content, node_unavailable, update_key,
)
from florist.federation.reports import EvaluationReport, RoundReport, Stage, TauSelection
from florist.federation.secure import SecureRounds
from florist.federation.tau_selection import AutomaticTau
from florist.federation.train_round import RoundFailed, TrainRound
from florist.federation.validation import Limits, checked_adapter

__all__ = ["LoraStrategy", "RoundFailed"]

MAX_RESENDS = 2
"""Resends of missing updates to one node within one stage: a node that still has a gap after
that is not converging and is left out of the round."""


class LoraStrategy:
    def __init__(
        self,
        config: RunConfig,
        shapes: Mapping[str, tuple[int, int]],
        base_norms: Mapping[str, float],
        identity: Identity,
        dense_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ):
        """From the server's own model: `shapes` ((m, n) per adapted module), `base_norms` (||W||_F of
        each base weight), `identity`, `dense_shapes` (per tensor trained in full, none by default)."""
        self.config = config
        self.shapes = dict(shapes)
        self.identity = identity
        self.limits = Limits.for_run(config, self.shapes, base_norms, dense_shapes)
        options = config.aggregation.options() | self._download_costs(dense_shapes or {})
        self.aggregator = make_aggregator(config.aggregation.method, **options)
        if config.aggregation.download_budget_mb is not None:
            try:
                self.aggregator.check_budget(self.shapes)
            except AggregationError as error:
                raise ValueError(f"aggregation.download_budget_mb {config.aggregation.download_budget_mb:g}: {error}") from None
        self.frozen_a = config.aggregation.method == "ffa"
        self.secure = SecureRounds(config, self.aggregator, self.shapes) if config.aggregation.secure else None
        self.chain = Chain()
        self.current: GlobalUpdate | None = None
        """The global adapter clients continue from, as they receive it (continuing methods)."""
        self.truncations: dict[int, dict[str, GlobalModule]] = {}
        """FlexLoRA: each partition's own truncation of the global update."""
        self.partition_of = PartitionBinding()
        self.reports: list[RoundReport] = []
        self.received: list[ClientAdapter] = []
        """The last round's decoded client adapters in partition order (only with output.save_client_adapters)."""
        self._round: TrainRound | None = None
        self.tau = AutomaticTau(config.aggregation, self.wire)
        self.evaluation: FederatedEvaluation | None = None

    @property
    def merges(self) -> bool:
        return not self.aggregator.continues_from_global

    @property
    def wire(self) -> str:
        return self.config.wire.download

    def _download_costs(self, dense_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """What a download budget counts: a merged update on this wire, and its instruction's record at its longest (the last round's)."""
        if self.config.aggregation.download_budget_mb is None:
            return {}
        digests = [update_digest(GlobalUpdate({}))] * self.config.federation.rounds
        instruction = Instruction.of(self.config.federation.rounds, digests, self.identity)
        return payload.update_cost(self.shapes, dense_shapes, self.wire).budget_options(instruction.record().count_bytes())

    @property
    def _split_used(self) -> int | None:
        """How many leading components of a global update the nodes use as separate B and A
        (payload.round_trip): all of an adapter clients continue from; of a merged update, those a
        warm start may begin from (up to the largest client rank), none without one."""
        if not self.merges:
            return None
        return self.limits.max_rank if self.config.federation.warm_start else 0

    def global_modules(self) -> tuple[list[GlobalUpdate], GlobalUpdate | None]:
        """The global model as (updates merged into the base, adapter on top), as the nodes see it."""
        if self.merges:
            return list(self.chain.updates), None
        return [], self.current

    # -- instructions ------------------------------------------------------------------------

    def _instruction(self, server_round: int, node: int, message_type: str, start: int | None = None) -> tuple[Message, int]:
        """A message carrying the global state the node lacks, and its payload bytes."""
        instruction = Instruction.of(server_round, list(self.chain.digests), self.identity)
        content = instruction_content(instruction)
        sent = 0
        if self.merges:
            for index in self.chain.missing(node, start):
                update = self.chain.updates[index - 1]
                sent += payload.put(content, update_key(index), update.modules, self.wire, dense=update.dense)
        elif self.current is not None:
            # A node whose partition the server does not know yet gets the shared adapter; its
            # first rank-r components are the same truncation, at more bytes.
            modules = self.truncations.get(self.partition_of.get(node, -1), self.current.modules)
            factors = "B" if self.frozen_a else "AB"
            sent = payload.put(content, GLOBAL, modules, self.wire, factors=factors, dense=self.current.dense)
        if self.secure is not None and message_type == MessageType.TRAIN:
            sent += self.secure.instruct(content)
        elif message_type == MessageType.EVALUATE and self.evaluation is not None:  # the evaluation sums' secure-sum setup
            sent += self.evaluation.instruct(content)
        ttl = self.config.federation.round_timeout
        return Message(content=content, message_type=message_type, dst_node_id=node, ttl=ttl), sent

    def begin_round(self, server_round: int, sampled: list[int]) -> None:
        quorum = self.config.federation.quorum(len(sampled))
        report = RoundReport(server_round, sampled=list(sampled), quorum=quorum)
        if self.secure is not None:
            self._round = self.secure.train_round(server_round, report)
        else:
            keep = self.config.output.save_client_adapters
            self._round = TrainRound.screened(report, self.aggregator.accumulator(), self.config.validation, self._dense_start(), keep)

    def configure_train(self, server_round: int, nodes: list[int]) -> list[Message]:
        """Train instructions for `nodes` (the sample, or on a retry those that have not delivered)."""
        state = self._active(server_round)
        state.report.attempts += 1
        messages = []
        for node in nodes:
            message, sent = self._instruction(server_round, node, MessageType.TRAIN)
            state.report.bytes_down[node] = state.report.bytes_down.get(node, 0) + sent
            messages.append(message)
        return messages

    # -- replies -----------------------------------------------------------------------------

    def receive_train(self, node: int, message: Message) -> list[Message]:
        """Check one train reply and keep its update, or record why not; returns a resend for a gap."""
        state = self._active()
        return guarded(state.report, node, lambda: self._take_update(state, node, message))

    def _take_update(self, state: TrainRound, node: int, message: Message) -> list[Message]:
        """The train reply read and checked whole, then kept: the round changes only once nothing can fail."""
        if node_unavailable(message):
            return self._send_again(node, state.report, MessageType.TRAIN, f"asked again: {error_reason(message)}")
        reply = identified(state.report, node, message, self.identity)
        if reply is None:
            return []
        if ADAPTER in message.content:
            state.report.bytes_up[node] = state.report.bytes_up.get(node, 0) + message.content[ADAPTER].count_bytes()
        if reply.status == GAP:
            return self._resend(node, reply, state.report, MessageType.TRAIN)
        if reply.status != TRAINED:
            state.report.event(node, "rejected", f"unexpected reply status {reply.status!r}", reply.partition)
            return []
        refusal = self.partition_of.refusal(node, reply.partition)
        if refusal is not None:
            state.report.event(node, "refused", refusal, reply.partition)
            return []
        held = reply.integer("chain-length", high=len(self.chain))
        update, adapter = self._checked(message, reply)
        if update.partition in state.partitions:
            first = state.partitions[update.partition]
            state.report.event(node, "rejected", f"partition-id {update.partition} was already sent this round by node {first}", update.partition)
            return []
        self._confirm(node, held)
        show_reply(state.report.round, node, update)
        state.admit(node, update, adapter, {} if self.secure else screened_norms(adapter, state.dense_start))
        return []

    def _checked(self, message: Message, reply: Reply):
        """The reply's update and its sketch upload (florist-secure: no per-reply screen, see secure.py) or adapter."""
        if self.secure is not None:
            return self.secure.check_reply(message, reply, self.limits)
        start = self.chain.updates[-1].modules if self.config.federation.warm_start and len(self.chain) else None
        return checked_adapter(message, reply, self.limits, self.config.federation.ffa_seed if self.frozen_a else None, start)

    def _dense_start(self) -> Mapping[str, Tensor]:
        """The tensors trained in full as every node starts this round: the last global values
        (a merged update's replace the model's; none before the first aggregate)."""
        if self.merges:
            return self.chain.updates[-1].dense if len(self.chain) else {}
        return self.current.dense if self.current is not None else {}

    def _resend(self, node: int, reply: Reply, stage: Stage, message_type: str) -> list[Message]:
        """The updates a node with a gap in its chain lacks, sent again within the same stage."""
        start = reply.integer("needs-update")
        if not 1 <= start <= len(self.chain):
            stage.event(node, "failed", f"chain gap at update {start}, outside the chain of {len(self.chain)} updates")
            return []
        return self._send_again(node, stage, message_type, f"node lacked updates {start}..{len(self.chain)}", start)

    def _send_again(self, node: int, stage: Stage, message_type: str, why: str, start: int | None = None) -> list[Message]:
        """The stage's instruction for `node` once more (from update `start` of the chain if given),
        its bytes counted; a node still missing after MAX_RESENDS is left out of the stage. A node the
        SuperLink reported unavailable dropped the instruction, but on a busy machine a live node that
        missed its heartbeats reports again and is then asked for the reply (exchange.exchange)."""
        resends = stage.resends.get(node, 0)
        if resends >= MAX_RESENDS:
            stage.event(node, "failed", f"not sent again after {resends} resends ({why})")
            return []
        stage.resends[node] = resends + 1
        stage.event(node, "resent", why)
        if message_type == MessageType.QUERY:
            return [self.tau.ask(node, lambda n: self._instruction(stage.round, n, MessageType.QUERY))]
        message, sent = self._instruction(stage.round, node, message_type, start)
        stage.bytes_down[node] = stage.bytes_down.get(node, 0) + sent
        return [message]

    def _confirm(self, node: int, held: int) -> None:
        """The node's reply says it holds the first `held` updates of the chain."""
        if self.merges:
            self.chain.confirm(node, held)

    def note_late(self, nodes: list[int]) -> None:
        self._active().note_late(nodes, self.config.federation.round_timeout)

    def pending(self) -> list[int]:
        """Sampled nodes that have not delivered an accepted update yet (a retry asks them again)."""
        return self._active().pending()

    def has_quorum(self) -> bool:
        return self._active().has_quorum()

    def quorum_failure(self) -> RoundFailed:
        """Why the round in progress failed, naming every node that did not deliver and why."""
        return self._active().quorum_failure()

    def final_download_bytes(self) -> int:
        """What delivering the final global model to every node that took part would still cost:
        the updates each has not confirmed, or the current adapter (the last round's download)."""
        total = 0
        for node in self.partition_of:
            if self.merges and len(self.chain.missing(node)) == 0:
                continue
            _, sent = self._instruction(len(self.chain), node, MessageType.EVALUATE)
            total += sent
        return total

    def server_state(self, server_round: int, metrics: list[dict]) -> ServerState:
        return ServerState(
            round=server_round,
            chain=list(self.chain.updates),
            current=self.current,
            truncations=dict(self.truncations),
            partition_of=dict(self.partition_of),
            confirmed=dict(self.chain.confirmed),
            metrics=list(metrics),
            sampling_seed=self.config.training.seed,
        )

    def restore(self, state: ServerState, fresh_node_ids: bool = False) -> None:
        """Continue from a checkpoint. Flower keeps a node's state per run, so a resumed run's
        nodes hold no updates yet: none counts as delivered, and each is sent the chain. The
        partitions stay bound to their nodes, unless `fresh_node_ids`: the engine gave its nodes
        new ids (Flower's simulation engine draws them at every start), and they bind afresh."""
        for modules in state.chain:
            self.chain.append(modules)
        self.current = state.current
        self.truncations = dict(state.truncations)
        self.partition_of = PartitionBinding({} if fresh_node_ids else state.partition_of)
        if self.secure is not None:
            self.secure.restore(state.metrics)

    # -- aggregation -------------------------------------------------------------------------

    def finish_round(self) -> RoundReport:
        """Aggregate the updates admitted this round and advance the global state."""
        state = self._active()
        report = state.report
        updates = state.close()
        start = time.perf_counter()
        aggregate = state.accumulator.result()
        report.aggregation_seconds += time.perf_counter() - start
        if self.secure is not None:  # the sum's own norm check, the privacy spent, the next sketch's width
            self.secure.finish(report, aggregate, len(updates))
        if self.config.aggregation.automatic_tau:
            # The exact update waits for the clients to score its truncations (select_stage).
            self.tau.exact = self._as_received(aggregate)
        else:
            self._advance(aggregate, [update.partition for update in updates.values()])
            report.record_ranks(aggregate.modules)
        for node, update in updates.items():
            self.partition_of[node] = update.partition
        state.record_clients(updates)
        self.received = [state.received[partition] for partition in sorted(state.received)]
        self.reports.append(report)
        self._round = None
        return report

    # -- automatic tau ---------------------------------------------------------------------------

    def configure_select(self, server_round: int, nodes: list[int]) -> list[Message]:
        return self.tau.configure(server_round, nodes, lambda node: self._instruction(server_round, node, MessageType.QUERY))

    def receive_select(self, node: int, message: Message) -> list[Message]:
        return guarded(self.tau.selection, node, lambda: self._take_scores(node, message))

    def _take_scores(self, node: int, message: Message) -> list[Message]:
        if node_unavailable(message):
            return self._send_again(node, self.tau.selection, MessageType.QUERY, f"asked again: {error_reason(message)}")
        reply = identified(self.tau.selection, node, message, self.identity)
        if reply is not None:
            self.tau.receive(node, reply, len(self.chain))
        return []

    def finish_select(self, late: list[int]) -> TauSelection:
        selection, kept = self.tau.finish(late)
        self.chain.append(kept)
        # A node that scored holds the largest cut, whose leading components the kept one is: it
        # takes the update from its copy (client_app.held_chain), and is sent it only if it reports a gap.
        for node in self.tau.holders:
            self.chain.confirm(node, len(self.chain))
        self.reports[-1].record_ranks(kept.modules)
        return selection

    def _as_received(self, aggregate: Aggregate) -> GlobalUpdate:
        """The aggregate's shared modules and tensors trained in full as the nodes receive them."""
        modules = payload.round_trip(aggregate.modules, self.wire, self._split_used)
        return GlobalUpdate(modules, payload.round_trip_dense(aggregate.dense, self.wire))

    def _advance(self, aggregate: Aggregate, partitions: list[int]) -> None:
        """The new global state, round-tripped through the wire dtype: what the nodes will hold."""
        update = self._as_received(aggregate)
        if self.merges:
            self.chain.append(update)
            return
        self.current = update
        if aggregate.per_client is not None:
            self.truncations = {
                p: payload.round_trip(m, self.wire) for p, m in zip(partitions, aggregate.per_client, strict=True)
            }

    # -- federated evaluation -----------------------------------------------------------------

    def configure_evaluate(self, server_round: int, nodes: list[int]) -> list[Message]:
        self.evaluation = evaluation_stage(self.config, server_round, self.limits.max_examples)
        return self.evaluation.configure(nodes, lambda node: self._instruction(server_round, node, MessageType.EVALUATE))

    def receive_evaluate(self, node: int, message: Message) -> list[Message]:
        return guarded(self.evaluation.report, node, lambda: self._take_evaluation(node, message))

    def _take_evaluation(self, node: int, message: Message) -> list[Message]:
        if node_unavailable(message):
            return self._send_again(node, self.evaluation.report, MessageType.EVALUATE, f"asked again: {error_reason(message)}")
        reply = identified(self.evaluation.report, node, message, self.identity)
        if reply is None:
            return []
        if reply.status == GAP:
            return self._resend(node, reply, self.evaluation.report, MessageType.EVALUATE)
        held = reply.integer("chain-length", high=len(self.chain))
        if self.evaluation.receive(node, reply, message):
            self._confirm(node, held)
        return []

    def finish_evaluate(self, late: list[int]) -> EvaluationReport:
        return self.evaluation.finish(late)

    # -- helpers -----------------------------------------------------------------------------

    def _active(self, server_round: int | None = None) -> TrainRound:
        if self._round is None or (server_round is not None and self._round.report.round != server_round):
            raise RuntimeError("begin_round must come before a round's instructions and replies")
        return self._round
