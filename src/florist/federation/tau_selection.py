"""Automatic tau: the round's exact update waits while its clients score every candidate cut of it
on their own validation examples; the smallest cut within tolerance of the best joins the chain."""

from __future__ import annotations

import json
from collections.abc import Callable

from flwr.app import ConfigRecord, Message

from florist.aggregation import GlobalModule, cut, cut_ranks
from florist.config import AggregationConfig
from florist.federation import payload
from florist.federation.delivery import GlobalUpdate
from florist.federation.messages import CANDIDATE, CUTS, SCORED, Reply
from florist.federation.reports import TauSelection

Instruct = Callable[[int], tuple[Message, int]]
"""node -> its instruction and the payload bytes it carries."""


class AutomaticTau:
    def __init__(self, settings: AggregationConfig, wire: str):
        self.settings = settings
        self.wire = wire
        self.exact: GlobalUpdate | None = None
        """The round's exact update, until the clients' scores choose its cut."""
        self.selection: TauSelection | None = None
        self.holders: set[int] = set()
        """Nodes that hold the largest cut, and with it the leading components of any kept one."""
        self.largest: dict[str, GlobalModule] = {}
        """The largest candidate cut, which the scoring nodes are sent."""

    def configure(self, server_round: int, nodes: list[int], instruct: Instruct) -> list[Message]:
        """Ask `nodes` to score every candidate truncation of the exact update on their own
        validation examples: each gets the largest cut once (every smaller one is its leading
        components), and the ranks of every cut."""
        candidates = sorted(set(self.settings.tau_candidates))
        self.selection = TauSelection(server_round, candidates=candidates)
        self.holders = set()
        self.selection.ranks = {tau: cut_ranks(self.exact.modules, tau, self.settings.max_rank) for tau in candidates}
        self.largest = cut(self.exact.modules, self.selection.ranks[candidates[-1]])
        return [self.ask(node, instruct) for node in nodes]

    def ask(self, node: int, instruct: Instruct) -> Message:
        """The node's instruction to score the candidates: the largest cut and the ranks of every cut."""
        candidates = self.selection.candidates
        message, sent = instruct(node)
        sent += payload.put(message.content, CANDIDATE, self.largest, self.wire, dense=self.exact.dense)
        message.content[CUTS] = ConfigRecord({"ranks": json.dumps([self.selection.ranks[tau] for tau in candidates])})
        self.selection.bytes_down[node] = self.selection.bytes_down.get(node, 0) + sent
        return message

    def receive(self, node: int, reply: Reply, chain_length: int) -> None:
        """Record the node's scores, or why they are rejected (a reply that cannot be read raises
        `Malformed`); `chain_length`: the server's chain."""
        selection = self.selection
        if reply.status != SCORED:
            selection.event(node, "rejected", f"unexpected reply status {reply.status!r}", reply.partition)
            return
        losses = [reply.number(f"loss-{index}") for index in range(len(selection.candidates))]
        tokens, held = reply.integer("tokens"), reply.integer("chain-length", high=chain_length)
        if tokens:
            selection.scores[node] = (reply.partition, tokens, losses)
        if held == chain_length:
            self.holders.add(node)

    def finish(self, late: list[int]) -> tuple[TauSelection, GlobalUpdate]:
        """Keep the smallest candidate within tau_tolerance of the best validation loss; without
        any score, the largest candidate (the closest to exact). Returns the kept cut as an update."""
        selection = self.selection
        for node in late:
            selection.event(node, "late", "no scores within federation.round_timeout")
        selection.loss = selection.combined()
        if selection.loss:
            best = min(selection.loss)
            tolerance = self.settings.tau_tolerance
            selection.chosen = next(tau for tau, loss in zip(selection.candidates, selection.loss) if loss <= best + tolerance)
        else:
            selection.chosen = selection.candidates[-1]
            selection.event(0, "failed", f"no node scored the candidates: tau {selection.chosen} kept")
        kept = GlobalUpdate(cut(self.exact.modules, selection.ranks[selection.chosen]), self.exact.dense)
        self.exact = None
        return selection, kept
