"""One round's train stage in progress: the updates accepted so far, the partitions they claim, and
the aggregate they join as they pass the norm screen (clipped) and the weight cap."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor

from florist.aggregation import Accumulator, AggregationError, ClientAdapter
from florist.config import ValidationConfig
from florist.federation.influence import Clip, NormScreen, WeightCap, clipped
from florist.federation.reports import ClientReport, RoundReport
from florist.federation.validation import ClientUpdate


class RoundFailed(RuntimeError):
    pass


class TrainRound:
    """The state of the round being trained; the strategy creates one per round."""

    def __init__(
        self,
        report: RoundReport,
        accumulator: Accumulator,
        screen: NormScreen,
        cap: WeightCap,
        dense_start: Mapping[str, Tensor],
        keep_adapters: bool,
    ):
        """`dense_start`: the tensors trained in full as every node began the round, from which a
        clip scales their change; `keep_adapters`: keep each aggregated adapter (output.save_client_adapters)."""
        self.report = report
        self.accumulator = accumulator
        self.screen = screen
        self.cap = cap
        self.dense_start = dense_start
        self.keep_adapters = keep_adapters
        self.accepted: dict[int, ClientUpdate] = {}
        """Per node, its update's report (the tensors are in the accumulator or waiting)."""
        self.partitions: dict[int, int] = {}
        """partition -> the node whose update for it was accepted."""
        self.waiting: dict[int, ClientAdapter] = {}
        """Updates the norm screen or the weight cap holds until it can judge them."""
        self.clips: dict[int, Clip] = {}
        """Per node admitted by the screen, the factor each norm was scaled by."""
        self.weights: dict[int, float] = {}
        """Per node aggregated, the weight it was given: its examples, capped."""
        self.received: dict[int, ClientAdapter] = {}
        """Per partition, the adapter aggregated (keep_adapters only)."""

    @classmethod
    def screened(
        cls, report: RoundReport, accumulator: Accumulator, validation: ValidationConfig, dense_start: Mapping[str, Tensor], keep_adapters: bool
    ) -> TrainRound:
        """A round whose replies pass the norm screen and the weight cap that `validation` sets."""
        screen = NormScreen.for_sample(validation.norm_factor, validation.clip_factor, len(report.sampled))
        return cls(report, accumulator, screen, WeightCap(validation.max_weight_share), dense_start, keep_adapters)

    def admit(self, node: int, update: ClientUpdate, adapter: ClientAdapter, norms: Mapping[str, float]) -> None:
        """Accept an update that passed the per-reply checks and offer it to the norm screen; the
        updates the screen admits are clipped and weighed, those it rejects are dropped."""
        self.partitions[update.partition] = node
        # The tensors go to the accumulator; the round keeps what it reports about the client.
        self.accepted[node] = replace(update, modules={}, dense={})
        self.waiting[node] = adapter
        self._judged(*self.screen.offer(node, norms))

    def _judged(self, admitted: Mapping[int, Clip], rejected: Mapping[int, str]) -> None:
        """Drop what the screen rejected; clip what it admitted and offer its claim to the weight
        cap, aggregating what the cap releases."""
        for outlier, reason in rejected.items():
            self.drop(outlier, reason)
        released: dict[int, float] = {}
        for node, clip in admitted.items():
            self.waiting[node] = clipped(self.waiting[node], clip, self.dense_start)
            self.clips[node] = clip
            released |= self.cap.offer(node, self.accepted[node].examples)
        self.aggregate(released)

    def aggregate(self, weights: Mapping[int, float]) -> None:
        """Add the released updates to the round's aggregate at their weights; an update the
        aggregator cannot take, for whatever reason, is rejected."""
        for node, weight in weights.items():
            adapter, partition = replace(self.waiting.pop(node), weight=weight), self.accepted[node].partition
            start = time.perf_counter()
            try:
                self.accumulator.add(adapter, key=partition)
            except Exception as error:  # part of the reply boundary (intake.guarded): the round goes on
                self.cap.forget(node)
                self.drop(node, str(error) if isinstance(error, AggregationError) else f"{type(error).__name__}: {error}")
                continue
            finally:
                self.report.aggregation_seconds += time.perf_counter() - start
            self.weights[node] = weight
            if self.keep_adapters:
                self.received[partition] = adapter

    def drop(self, node: int, reason: str) -> None:
        """Reject an update that passed the per-reply checks; its partition may deliver again on a retry."""
        update = self.accepted.pop(node)
        self.waiting.pop(node, None)
        del self.partitions[update.partition]
        self.report.event(node, "rejected", reason, update.partition)

    def note_late(self, nodes: list[int], timeout: float) -> None:
        for node in nodes:
            self.report.event(node, "late", f"no reply within federation.round_timeout = {timeout:g} s")

    def pending(self) -> list[int]:
        """Sampled nodes that have not delivered an accepted update yet (a retry asks them again)."""
        return [node for node in self.report.sampled if node not in self.accepted]

    def has_quorum(self) -> bool:
        return len(self.accepted) >= self.report.quorum

    def quorum_failure(self) -> RoundFailed:
        """Why the round failed, naming every node that did not deliver and why."""
        report = self.report
        reasons = {event.node: f"{event.status}: {event.reason}" for event in report.events if event.status != "accepted"}
        missing = "; ".join(f"node {node} {reasons.get(node, 'no reply')}" for node in self.pending())
        return RoundFailed(
            f"round {report.round}: {len(self.accepted)} of {len(report.sampled)} sampled clients delivered an update, below the "
            f"quorum of {report.quorum}, after {report.attempts} attempts ({missing})"
        )

    def close(self) -> dict[int, ClientUpdate]:
        """Judge the updates the screen still holds, weigh those the cap still holds, and check the
        quorum; the accepted updates by node, in partition order."""
        self._judged(*self.screen.flush())
        self.aggregate(self.cap.close())
        if not self.has_quorum():
            raise RoundFailed(f"round {self.report.round}: {len(self.accepted)} updates aggregated, below the quorum of {self.report.quorum}")
        return dict(sorted(self.accepted.items(), key=lambda item: item[1].partition))

    def record_clients(self, updates: Mapping[int, ClientUpdate]) -> None:
        """Each aggregated update's acceptance and client report."""
        for node, update in updates.items():
            self.report.event(node, "accepted", partition=update.partition)
            clipped_by = {name: factor for name, factor in self.clips[node].items() if factor < 1}
            self.report.clients.append(ClientReport.from_update(node, update, self.report.bytes_down.get(node, 0), self.weights[node], clipped_by))
