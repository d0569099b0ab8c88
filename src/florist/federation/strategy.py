"""The server's coordinator: what each node is sent, what is made of each reply, and the round's result.

It owns the round semantics of every method. FLoRIST and FLoRA: each round's global update is
merged into every client's base, and each node is sent the updates it has not confirmed.
FedIT, FFA-LoRA and FlexLoRA: clients continue from the current global adapter (FlexLoRA:
their own truncation when the server knows their partition; FFA-LoRA: B only, since A is
derived from the shared seed). With `federation.warm_start` FLoRIST's clients start from the last
update's leading components and upload their change since it, from which the server recovers what
each learned before it is aggregated.
Reply checks, delivery, sampling and the exchange of messages live in their own modules; this one
connects them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from flwr.app import ConfigRecord, Message, MessageType
from torch import Tensor

from florist.aggregation import (
    Accumulator,
    Aggregate,
    AggregationError,
    ClientAdapter,
    GlobalModule,
    LoraFactors,
    cut,
    cut_ranks,
    learned_since_start,
    make_aggregator,
    start_of,
)
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.checkpoint import ServerState
from florist.federation.console import show_reply
from florist.federation.delivery import Chain, GlobalUpdate, update_digest
from florist.federation.identity import disagreement
from florist.federation.messages import (
    ADAPTER,
    CANDIDATE,
    CUTS,
    GAP,
    GLOBAL,
    IDENTITY,
    METRICS,
    MISMATCH,
    TRAINED,
    EVALUATED,
    Identity,
    Instruction,
    instruction_content,
    status_of,
    update_key,
)
from florist.federation.reports import ClientReport, EvaluationReport, NodeScore, RoundReport, Stage, TauSelection
from florist.federation.validation import ClientUpdate, Limits, NormScreen, Rejected, check_reply, lora_rank, screened_norms
from florist.lora.model import frozen_lora_A


class RoundFailed(RuntimeError):
    pass


MAX_RESENDS = 2
"""Resends of missing updates to one node within one stage: a node that still has a gap after
that is not converging and is left out of the round."""


class LoraStrategy:
    def __init__(
        self,
        config: RunConfig,
        shapes: Mapping[str, tuple[int, int]],
        identity: Identity,
        dense_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ):
        """`shapes` ((m, n) of each adapted module), `identity` and `dense_shapes` (of each tensor
        trained in full, none by default) come from the server's own model."""
        self.config = config
        self.shapes = dict(shapes)
        self.identity = identity
        self.limits = Limits.for_run(config, self.shapes, dense_shapes)
        options = config.aggregation.options() | self._download_costs(dense_shapes or {})
        self.aggregator = make_aggregator(config.aggregation.method, **options)
        if config.aggregation.download_budget_mb is not None:
            try:
                self.aggregator.check_budget(self.shapes)
            except AggregationError as error:
                raise ValueError(f"aggregation.download_budget_mb {config.aggregation.download_budget_mb:g}: {error}") from None
        self.frozen_a = config.aggregation.method == "ffa"
        self.chain = Chain()
        self.current: GlobalUpdate | None = None
        """The global adapter clients continue from, as they receive it (continuing methods)."""
        self.truncations: dict[int, dict[str, GlobalModule]] = {}
        """FlexLoRA: each partition's own truncation of the global update."""
        self.partition_of: dict[int, int] = {}
        """node id -> partition, from the node's last accepted reply."""
        self.reports: list[RoundReport] = []
        self.received: list[ClientAdapter] = []
        """The last round's client adapters as the server decoded them, in partition order; kept
        only with output.save_client_adapters (otherwise each is dropped once aggregated)."""
        self._round: _RoundState | None = None
        self.exact: GlobalUpdate | None = None
        """Automatic tau: the round's exact update, until the clients' scores choose its cut."""

    @property
    def merges(self) -> bool:
        return not self.aggregator.continues_from_global

    @property
    def wire(self) -> str:
        return self.config.wire.download

    def _download_costs(self, dense_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """What a download budget counts, as the aggregator's options: a merged update's payload on
        this wire, and the instruction's own record around it at its longest (the last round's, which
        lists every update's digest)."""
        if self.config.aggregation.download_budget_mb is None:
            return {}
        cost = payload.update_cost(self.shapes, dense_shapes, self.wire)
        rounds = self.config.federation.rounds
        digests = [update_digest(GlobalUpdate({}))] * rounds
        instruction = Instruction(rounds, digests, self.identity.fingerprint, self.identity.model_digest, self.identity.settings).record().count_bytes()
        return {
            "wire_bytes": cost.value_bytes,
            "component_overhead_bytes": cost.component_overhead_bytes,
            "fixed_download_bytes": cost.fixed_bytes + instruction,
        }

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
        instruction = Instruction(
            server_round, list(self.chain.digests), self.identity.fingerprint, self.identity.model_digest, self.identity.settings
        )
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
        ttl = self.config.federation.round_timeout
        return Message(content=content, message_type=message_type, dst_node_id=node, ttl=ttl), sent

    def begin_round(self, server_round: int, sampled: list[int]) -> None:
        quorum = self.config.federation.quorum(len(sampled))
        report = RoundReport(server_round, sampled=list(sampled), quorum=quorum)
        self._round = _RoundState(report, self.aggregator.accumulator(), NormScreen(self.limits.norm_factor))

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

    def receive_train(self, node: int, reply: Message) -> list[Message]:
        """Check one train reply and keep its update, or record why not; returns a resend for a gap."""
        state = self._active()
        if reply.has_error():
            state.report.event(node, "failed", _error_reason(reply))
            return []
        try:
            identity, status = Identity.from_record(reply.content[IDENTITY]), status_of(reply)
            reply_round = int(reply.content[METRICS]["round"])
        except (KeyError, ValueError, TypeError) as error:
            state.report.event(node, "rejected", f"malformed reply: {type(error).__name__}: {error}")
            return []
        if reply_round != state.report.round:
            state.report.event(node, "rejected", f"reply is for round {reply_round}, not {state.report.round}")
            return []
        refusal = disagreement(self.identity, identity)
        if refusal or status == MISMATCH:
            state.report.event(node, "refused", refusal or "the node reports settings that differ from the server's")
            return []
        if ADAPTER in reply.content:
            state.report.bytes_up[node] = state.report.bytes_up.get(node, 0) + reply.content[ADAPTER].count_bytes()
        if status == GAP:
            return self._resend(node, reply, state.report, MessageType.TRAIN)
        if status != TRAINED:
            state.report.event(node, "rejected", f"unexpected reply status {status!r}")
            return []
        try:
            update = check_reply(reply, self.limits, factors="B" if self.frozen_a else "AB")
            adapter = self._adapter(update)
        except (Rejected, AggregationError) as rejection:
            state.report.event(node, "rejected", str(rejection))
            return []
        if update.partition in state.partitions:
            first = state.partitions[update.partition]
            state.report.event(node, "rejected", f"partition-id {update.partition} was already sent this round by node {first}", update.partition)
            return []
        self._confirm(node, reply)
        state.partitions[update.partition] = node
        # The tensors go to the accumulator; the round keeps what it reports about the client.
        state.accepted[node] = replace(update, modules={}, dense={})
        state.waiting[node] = adapter
        metrics = update.metrics
        show_reply(state.report.round, node, update.partition, update.rank, update.examples, metrics["train-loss"], metrics["train-seconds"])
        admitted, rejected = state.screen.offer(node, screened_norms(adapter, self._dense_start()))
        for outlier, reason in rejected.items():
            self._drop(state, outlier, reason)
        self._aggregate(state, admitted)
        return []

    def _dense_start(self) -> Mapping[str, Tensor]:
        """The tensors trained in full as every node starts this round: the last global values
        (a merged update's replace the model's; none before the first aggregate)."""
        if self.merges:
            return self.chain.updates[-1].dense if len(self.chain) else {}
        return self.current.dense if self.current is not None else {}

    def _aggregate(self, state: _RoundState, nodes: list[int]) -> None:
        """Add the admitted updates to the round's aggregate; an update the aggregator refuses is rejected."""
        for node in nodes:
            adapter, partition = state.waiting.pop(node), state.accepted[node].partition
            start = time.perf_counter()
            try:
                state.accumulator.add(adapter, key=partition)
            except AggregationError as error:
                self._drop(state, node, str(error))
                continue
            finally:
                state.report.aggregation_seconds += time.perf_counter() - start
            if self.config.output.save_client_adapters:
                state.received[partition] = adapter

    def _drop(self, state: _RoundState, node: int, reason: str) -> None:
        """Reject an update that passed the per-reply checks; its partition may deliver again on a retry."""
        update = state.accepted.pop(node)
        state.waiting.pop(node, None)
        del state.partitions[update.partition]
        state.report.event(node, "rejected", reason, update.partition)

    def _resend(self, node: int, reply: Message, stage: Stage, message_type: str) -> list[Message]:
        """The updates a node with a gap in its chain lacks, sent again within the same stage."""
        try:
            start = int(reply.content[METRICS]["needs-update"])
        except (KeyError, ValueError, TypeError):
            stage.event(node, "rejected", "gap reply without a valid needs-update")
            return []
        resends = stage.resends.get(node, 0)
        if resends >= MAX_RESENDS or not 1 <= start <= len(self.chain):
            stage.event(node, "failed", f"chain gap at update {start} not closed after {resends} resends")
            return []
        stage.resends[node] = resends + 1
        stage.event(node, "resent", f"node lacked updates {start}..{len(self.chain)}")
        message, sent = self._instruction(stage.round, node, message_type, start)
        stage.bytes_down[node] = stage.bytes_down.get(node, 0) + sent
        return [message]

    def _confirm(self, node: int, reply: Message) -> None:
        if self.merges:
            self.chain.confirm(node, int(reply.content[METRICS]["chain-length"]))

    def note_late(self, nodes: list[int]) -> None:
        state = self._active()
        for node in nodes:
            state.report.event(node, "late", f"no reply within federation.round_timeout = {self.config.federation.round_timeout:g} s")

    def pending(self) -> list[int]:
        """Sampled nodes that have not delivered an accepted update yet (a retry asks them again)."""
        state = self._active()
        return [node for node in state.report.sampled if node not in state.accepted]

    def has_quorum(self) -> bool:
        state = self._active()
        return len(state.accepted) >= state.report.quorum

    def quorum_failure(self) -> RoundFailed:
        """Why the round in progress failed, naming every node that did not deliver and why."""
        report = self._active().report
        accepted = len(self._active().accepted)
        reasons = {event.node: f"{event.status}: {event.reason}" for event in report.events if event.status != "accepted"}
        missing = "; ".join(f"node {node} {reasons.get(node, 'no reply')}" for node in self.pending())
        return RoundFailed(
            f"round {report.round}: {accepted} of {len(report.sampled)} sampled clients delivered an update, below the "
            f"quorum of {report.quorum}, after {report.attempts} attempts ({missing})"
        )

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

    def restore(self, state: ServerState) -> None:
        """Continue from a checkpoint. Flower keeps a node's state per run, so a resumed run's
        nodes hold no updates yet: none counts as delivered, and each is sent the chain."""
        for modules in state.chain:
            self.chain.append(modules)
        self.current = state.current
        self.truncations = dict(state.truncations)
        self.partition_of = dict(state.partition_of)

    # -- aggregation -------------------------------------------------------------------------

    def finish_round(self) -> RoundReport:
        """Aggregate the updates admitted this round and advance the global state."""
        state = self._active()
        report = state.report
        self._aggregate(state, state.screen.flush())
        if len(state.accepted) < report.quorum:
            raise RoundFailed(f"round {report.round}: {len(state.accepted)} updates aggregated, below the quorum of {report.quorum}")
        updates = dict(sorted(state.accepted.items(), key=lambda item: item[1].partition))
        start = time.perf_counter()
        aggregate = state.accumulator.result()
        report.aggregation_seconds += time.perf_counter() - start
        if self.config.aggregation.automatic_tau:
            # The exact update waits for the clients to score its truncations (select_tau).
            self.exact = self._as_received(aggregate)
        else:
            self._advance(aggregate, [update.partition for update in updates.values()])
            self._record_ranks(report, aggregate.modules)
        for node, update in updates.items():
            self.partition_of[node] = update.partition
            state.report.event(node, "accepted", partition=update.partition)
            report.clients.append(_client_report(node, update, state.report.bytes_down.get(node, 0)))
        self.received = [state.received[partition] for partition in sorted(state.received)]
        self.reports.append(report)
        self._round = None
        return report

    @staticmethod
    def _record_ranks(report: RoundReport, modules: Mapping[str, GlobalModule]) -> None:
        report.ranks = {name: module.rank for name, module in modules.items()}
        report.energy = {name: module.energy for name, module in modules.items()}

    # -- automatic tau ---------------------------------------------------------------------------

    def configure_select(self, server_round: int, nodes: list[int]) -> list[Message]:
        """Ask `nodes` to score every candidate truncation of the exact update on their own
        validation examples: each gets the largest cut once (every smaller one is its leading
        components), and the ranks of every cut."""
        candidates = sorted(set(self.config.aggregation.tau_candidates))
        max_rank = self.config.aggregation.max_rank
        self._selection = TauSelection(server_round, candidates=candidates)
        self._candidate_holders: set[int] = set()
        self._selection.ranks = {tau: cut_ranks(self.exact.modules, tau, max_rank) for tau in candidates}
        largest = cut(self.exact.modules, self._selection.ranks[candidates[-1]])
        messages = []
        for node in nodes:
            message, sent = self._instruction(server_round, node, MessageType.QUERY)
            sent += payload.put(message.content, CANDIDATE, largest, self.wire, dense=self.exact.dense)
            message.content[CUTS] = ConfigRecord({"ranks": json.dumps([self._selection.ranks[tau] for tau in candidates])})
            self._selection.bytes_down[node] = sent
            messages.append(message)
        return messages

    def receive_select(self, node: int, reply: Message) -> list[Message]:
        selection = self._selection
        if reply.has_error():
            selection.event(node, "failed", _error_reason(reply))
            return []
        try:
            identity = Identity.from_record(reply.content[IDENTITY])
            metrics = reply.content[METRICS]
            losses = [float(metrics[f"loss-{index}"]) for index in range(len(selection.candidates))]
            tokens, held = int(metrics["tokens"]), int(metrics["chain-length"])
            reply_round, partition = int(metrics["round"]), int(metrics["partition-id"])
        except (KeyError, ValueError, TypeError) as error:
            selection.event(node, "rejected", f"malformed reply: {type(error).__name__}: {error}")
            return []
        refusal = disagreement(self.identity, identity)
        if refusal or reply_round != selection.round or tokens < 0 or not all(math.isfinite(x) for x in losses):
            selection.event(node, "rejected", refusal or f"scores for round {reply_round}: {tokens} tokens, losses {losses}", partition)
            return []
        if tokens:
            selection.scores[node] = (partition, tokens, losses)
        if held == len(self.chain):
            self._candidate_holders.add(node)
        return []

    def finish_select(self, late: list[int]) -> TauSelection:
        """Keep the smallest candidate within tau_tolerance of the best validation loss; without
        any score, the largest candidate (the closest to exact)."""
        selection, report = self._selection, self.reports[-1]
        for node in late:
            selection.event(node, "late", "no scores within federation.round_timeout")
        selection.loss = selection.combined()
        if selection.loss:
            best = min(selection.loss)
            tolerance = self.config.aggregation.tau_tolerance
            selection.chosen = next(tau for tau, loss in zip(selection.candidates, selection.loss) if loss <= best + tolerance)
        else:
            selection.chosen = selection.candidates[-1]
            selection.event(0, "failed", f"no node scored the candidates: tau {selection.chosen} kept")
        modules = cut(self.exact.modules, selection.ranks[selection.chosen])
        self.chain.append(GlobalUpdate(modules, self.exact.dense))
        # A node that scored holds the largest cut, whose leading components the kept one is: it
        # takes the update from its copy (client_app.held_chain), and is sent it only if it reports a gap.
        for node in self._candidate_holders:
            self.chain.confirm(node, len(self.chain))
        self._record_ranks(report, modules)
        self.exact = None
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

    def _adapter(self, update: ClientUpdate) -> ClientAdapter:
        """The client's update as the aggregator takes it; a warm-started client's upload is its change
        since the start, to which the start, as the node received it, is added back."""
        modules = {name: self._factors(name, m) for name, m in update.modules.items()}
        if self.config.federation.warm_start and len(self.chain):
            modules = learned_since_start(modules, start_of(self.chain.updates[-1].modules, lora_rank(update, self.limits)))
        return ClientAdapter(modules, float(update.examples), update.dense)

    def _factors(self, name: str, module: dict) -> LoraFactors:
        if self.frozen_a:
            a = frozen_lora_A(name, module["B"].shape[1], self.shapes[name][1], self.config.federation.ffa_seed)
            return LoraFactors(A=a, B=module["B"], scale=module["scale"])
        return LoraFactors(A=module["A"], B=module["B"], scale=module["scale"])

    # -- federated evaluation -----------------------------------------------------------------

    def configure_evaluate(self, server_round: int, nodes: list[int]) -> list[Message]:
        self._evaluation = EvaluationReport(server_round)
        messages = []
        for node in nodes:
            message, sent = self._instruction(server_round, node, MessageType.EVALUATE)
            self._evaluation.bytes_down[node] = sent
            messages.append(message)
        return messages

    def receive_evaluate(self, node: int, reply: Message) -> list[Message]:
        report = self._evaluation
        if reply.has_error():
            report.event(node, "failed", _error_reason(reply))
            return []
        try:
            identity, status = Identity.from_record(reply.content[IDENTITY]), status_of(reply)
            metrics = dict(reply.content[METRICS])
            examples, partition = int(metrics.pop("num-examples")), int(metrics.pop("partition-id"))
            reply_round = int(metrics.pop("round"))
        except (KeyError, ValueError, TypeError) as error:
            report.event(node, "rejected", f"malformed reply: {type(error).__name__}: {error}")
            return []
        refusal = disagreement(self.identity, identity)
        if refusal or status == MISMATCH:
            report.event(node, "refused", refusal or "the node reports settings that differ from the server's", partition)
            return []
        if status == GAP:
            return self._resend(node, reply, report, MessageType.EVALUATE)
        if status != EVALUATED or reply_round != report.round or not 0 <= examples <= self.limits.max_examples:
            report.event(node, "rejected", f"evaluation reply: status {status!r}, round {reply_round}, {examples} examples", partition)
            return []
        self._confirm(node, reply)
        metrics.pop("chain-length", None)
        report.scores.append(NodeScore(node, partition, examples, {k: float(v) for k, v in metrics.items()}))
        return []

    def finish_evaluate(self, late: list[int]) -> EvaluationReport:
        report = self._evaluation
        timeout = self.config.federation.round_timeout
        for node in late:
            report.event(node, "late", f"no evaluation reply within federation.round_timeout = {timeout:g} s")
        report.scores.sort(key=lambda score: score.partition)
        return report

    # -- helpers -----------------------------------------------------------------------------

    def _active(self, server_round: int | None = None) -> _RoundState:
        if self._round is None or (server_round is not None and self._round.report.round != server_round):
            raise RuntimeError("begin_round must come before a round's instructions and replies")
        return self._round


@dataclass
class _RoundState:
    """A train stage in progress: the updates accepted so far, the partitions they claim, and the
    aggregate they are added to as they pass the norm screen."""

    report: RoundReport
    accumulator: Accumulator
    screen: NormScreen
    accepted: dict[int, ClientUpdate] = field(default_factory=dict)
    """Per node, its update's report (the tensors are in the accumulator or waiting)."""
    partitions: dict[int, int] = field(default_factory=dict)
    waiting: dict[int, ClientAdapter] = field(default_factory=dict)
    """Updates the norm screen holds until it can judge them."""
    received: dict[int, ClientAdapter] = field(default_factory=dict)
    """Per partition, the adapter aggregated (output.save_client_adapters only)."""


def _error_reason(reply: Message) -> str:
    reason = (reply.error.reason or "").strip()
    return reason.splitlines()[-1] if reason else f"error code {reply.error.code}"


def _client_report(node: int, update: ClientUpdate, bytes_down: int) -> ClientReport:
    metrics = update.metrics
    return ClientReport(
        partition=update.partition,
        node=node,
        rank=update.rank,
        examples=update.examples,
        train_loss=float(metrics["train-loss"]),
        train_seconds=float(metrics["train-seconds"]),
        train_tokens=int(metrics["train-tokens"]),
        bytes_down=bytes_down,
        bytes_up=update.bytes_up,
        peak_rss_mib=float(metrics["peak-rss-mib"]),
    )
