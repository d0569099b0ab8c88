"""The secure sum's later stages over the grid (privacy.secure_aggregation), for a round's training
sum and for an evaluation's sums alike.

The stage before them is the protocol's setup: the train instruction, where each site trains,
sketches, keeps its upload and answers with its public keys (federation/secure_site.py), its sum
held by the round's `SecureSumTrainRound` (secure.py); or the evaluate instruction, where each site
evaluates, keeps its vector of sums and answers with its keys, its sum held by the
`MaskedFederatedEvaluation` (federated_evaluation.py). Once that stage is over, `secure_sum_stages`
runs, each as one `exchange` with the round's deadline:

  share    the key directory to every site that sent keys   -> its Shamir shares, encrypted per recipient
  collect  the shares addressed to each site                -> its masked, encoded input
  unmask   who survived and who dropped, to the survivors   -> the shares that remove the masks

and hands the survivors' unmasked SUM to its holder (`SecureSum.add_sum`): a training sum joins the
round's accumulator (the round then finishes as without the protocol: secure.py's reconstruction,
SumNormCheck, the DP ledger); an evaluation's sums are combined. A site that drops out after
masking is left out of the sum by the dropped sites' shares; one silent at unmasking is still in
it. A stage that closes with fewer sites than the threshold and federation.min_sites ends the sum
(`SecureSum.sum_failed`): a round is then not aggregated, an evaluation not combined. Every message
both ways is counted in the stage's bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from florist.federation.exchange import exchange
from florist.federation.intake import guarded
from florist.federation.messages import SECURE_SUM, SECURE_SUM_TYPE, error_reason, node_unavailable
from florist.federation.reports import Stage
from florist.federation.secure_sum import EncryptedShares, MaskedInput, ProtocolRefused, SecureSumFailed, SecureSumServer, UnmaskShares
from florist.federation.strategy import MAX_RESENDS


class SecureSum(Protocol):
    """What holds one secure sum: its server's state machine, the stage its events and bytes go to,
    and what becomes of the sum."""

    server: SecureSumServer
    report: Stage

    def add_sum(self, total: Mapping[str, torch.Tensor], survivors: list[int]) -> None:
        """The survivors' unmasked sum."""

    def sum_failed(self, reason: str) -> None:
        """The sum cannot be formed (`reason`, one line)."""


def secure_sum_stages(grid: Grid, summing: SecureSum, timeout: float) -> None:
    """Share, collect and unmask for the sum `summing` holds, once its setup stage is over."""
    server, report = summing.server, summing.report
    try:
        directory = server.directory().record()
        _stage(grid, report, "share", dict.fromkeys(server.keys, directory), timeout, lambda n, r: server.receive_shares(n, EncryptedShares.read(r)))
        forwarded = {node: shares.record() for node, shares in server.forwarded().items()}
        _stage(grid, report, "collect", forwarded, timeout, lambda n, r: server.receive_masked(n, MaskedInput.read(r)))
        request = server.unmask_request()
        asked = dict.fromkeys(request.survivors, request.record())
        _stage(grid, report, "unmask", asked, timeout, lambda n, r: server.receive_unmask(n, UnmaskShares.read(r)))
        total, survivors = server.result()
    except SecureSumFailed as failure:
        reason = str(failure)
    else:
        summing.add_sum(total, survivors)
        return
    summing.sum_failed(reason)  # outside the handler: a RoundFailed it raises stands alone


def _stage(
    grid: Grid, report: Stage, name: str, records: Mapping[int, ConfigRecord], timeout: float, take: Callable[[int, ConfigRecord], None]
) -> None:
    """One stage: each node its record, each reply's record taken (`take` checks it whole before the
    server's state changes; a refusal rejects that reply), until every node answered or the deadline."""
    resends: dict[int, int] = {}

    def message(node: int) -> Message:
        record = records[node]
        report.bytes_down[node] = report.bytes_down.get(node, 0) + record.count_bytes()
        return Message(RecordDict({SECURE_SUM: record}), dst_node_id=node, message_type=SECURE_SUM_TYPE, ttl=timeout)

    def handle(node: int, reply: Message) -> list[Message]:
        if node_unavailable(reply) and resends.get(node, 0) < MAX_RESENDS:
            resends[node] = resends.get(node, 0) + 1
            report.event(node, "resent", f"secure sum's {name} stage: {error_reason(reply)}")
            return [message(node)]
        return guarded(report, node, lambda: _take(node, reply))

    def _take(node: int, reply: Message) -> list[Message]:
        if reply.has_error():
            report.event(node, "failed", f"secure sum's {name} stage: {error_reason(reply)}")
            return []
        record = reply.content.get(SECURE_SUM)
        if not isinstance(record, ConfigRecord):
            raise ProtocolRefused(f"the {name} reply holds no secure-sum record")
        report.bytes_up[node] = report.bytes_up.get(node, 0) + record.count_bytes()
        take(node, record)
        return []

    for node in exchange(grid, [message(node) for node in records], timeout, handle):
        report.event(node, "late", f"no reply to the secure sum's {name} stage within federation.round_timeout = {timeout:g} s")
