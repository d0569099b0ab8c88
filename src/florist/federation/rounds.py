"""A round's stages over the grid: train (with florist-secure's secure sum when it is on), tau
selection, federated evaluation; each exchanges its messages with `exchange.exchange`."""

from __future__ import annotations

from flwr.serverapp import Grid

from florist.config import FederationConfig
from florist.federation.exchange import exchange
from florist.federation.federated_evaluation import MaskedFederatedEvaluation
from florist.federation.reports import EvaluationReport, RoundReport, TauSelection
from florist.federation.sampling import nodes_for_round
from florist.federation.secure_round import secure_sum_stages
from florist.federation.strategy import LoraStrategy


def train_stage(grid: Grid, strategy: LoraStrategy, federation: FederationConfig, seed: int, server_round: int, first: bool) -> RoundReport:
    """One round's training: sample, send, take replies until the deadline, retry the nodes that
    did not deliver while the quorum is missed, then aggregate. Never waits without a bound. With
    privacy.secure_aggregation the replies are the sites' public keys, and the secure sum's stages
    (federation/secure_round.py) bring the sum of their sketches before it is aggregated."""
    sampled = nodes_for_round(grid, federation, seed, server_round, first)
    strategy.begin_round(server_round, sampled)
    nodes = sampled
    for attempt in range(federation.round_retries + 1):
        late = exchange(grid, strategy.configure_train(server_round, nodes), federation.round_timeout, strategy.receive_train)
        strategy.note_late(late)
        if strategy.has_quorum():
            if strategy.secure is not None and strategy.secure.protocol:
                secure_sum_stages(grid, strategy.secure.round, federation.round_timeout)
            return strategy.finish_round()
        connected = set(grid.get_node_ids())
        nodes = [node for node in strategy.pending() if node in connected]
        if not nodes or attempt == federation.round_retries:
            break
        print(f"round {server_round}: quorum missed, asking {len(nodes)} nodes again (retry {attempt + 1} of {federation.round_retries})", flush=True)
    raise strategy.quorum_failure()


def evaluate_stage(grid: Grid, strategy: LoraStrategy, federation: FederationConfig, server_round: int) -> EvaluationReport:
    """Every connected node scores the current global model on its own held-out examples. With
    privacy.secure_aggregation the replies are the sites' public keys, and the secure sum's stages
    bring the sum of their evaluation sums."""
    nodes = sorted(grid.get_node_ids())
    late = exchange(grid, strategy.configure_evaluate(server_round, nodes), federation.round_timeout, strategy.receive_evaluate)
    if isinstance(strategy.evaluation, MaskedFederatedEvaluation):
        secure_sum_stages(grid, strategy.evaluation, federation.round_timeout)
    return strategy.finish_evaluate(late)


def select_stage(grid: Grid, strategy: LoraStrategy, federation: FederationConfig, report: RoundReport) -> TauSelection:
    """Automatic tau: the round's clients score the candidate cuts of its exact update."""
    nodes = [client.node for client in report.clients]
    late = exchange(grid, strategy.configure_select(report.round, nodes), federation.round_timeout, strategy.receive_select)
    return strategy.finish_select(late)
