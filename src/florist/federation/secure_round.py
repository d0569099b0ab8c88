"""The secure sum's later stages in a florist-secure round (privacy.secure_aggregation), over the grid.

The round's train stage is the protocol's setup: each site trains, sketches, keeps its upload and
answers with its public keys (federation/secure_site.py), and the round's `SecureSumTrainRound`
holds the server's state machine (secure_sum/server.py). Once the train stage has its quorum,
`secure_sum_stages` runs, each as one `exchange` with the round's deadline:

  share    the key directory to every site that sent keys   -> its Shamir shares, encrypted per recipient
  collect  the shares addressed to each site                -> its masked, quantised sketches
  unmask   who survived and who dropped, to the survivors   -> the shares that remove the masks

and the server adds the survivors' unmasked SUM (sketches and weight) to the round's accumulator;
the round then finishes as without the protocol (secure.py's reconstruction, SumNormCheck, the DP
ledger). A site that drops out after masking is left out of the sum by the dropped sites' shares;
one silent at unmasking is still in it. A stage that closes with fewer sites than the threshold and
federation.min_sites fails the round, not aggregated. Every message both ways is counted in the
round's bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from florist.federation.exchange import exchange
from florist.federation.intake import guarded
from florist.federation.messages import SECURE_SUM, SECURE_SUM_TYPE, error_reason, node_unavailable
from florist.federation.reports import RoundReport
from florist.federation.secure import SecureRounds, SecureSumTrainRound
from florist.federation.secure_sum import EncryptedShares, MaskedInput, ProtocolRefused, SecureSumFailed, UnmaskShares
from florist.federation.strategy import MAX_RESENDS
from florist.federation.train_round import RoundFailed


def secure_sum_stages(grid: Grid, secure: SecureRounds, timeout: float) -> None:
    """Share, collect and unmask for the round in progress; its accumulator then holds the survivors' sum.
    Raises RoundFailed (not aggregated) when a stage closes below the sites the sum needs."""
    state = secure.round
    if not isinstance(state, SecureSumTrainRound):
        raise RuntimeError("the secure sum's stages follow a secure round's train stage")
    server, report = state.server, state.report
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
        raise RoundFailed(f"round {report.round}: {failure}") from None
    state.add_sum(total, survivors)


def _stage(
    grid: Grid, report: RoundReport, name: str, records: Mapping[int, ConfigRecord], timeout: float, take: Callable[[int, ConfigRecord], None]
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
