"""FedIT: weighted averages of A and of B, zero-padded to the largest rank (HetLoRA)."""

from __future__ import annotations

from dataclasses import dataclass

from florist.aggregation.base import Aggregator, ModuleBatch


@dataclass(frozen=True)
class FedIT(Aggregator):
    """Each client's scale s_k is folded into its B before averaging (METHOD.md: "fold s_k into
    the factors"); with raw factors a client of scale 2 would weigh like one of scale 0.5.

    A is where LoRA keeps its initialisation and B what was learned. Clients of one rank that
    share A (FedIT clients whose A barely moved from the global one) get the exact update
    whatever their scales: the average of A is that A. With mixed ranks they do not, even with
    A shared (client k's A its first r_k rows): zero-padding averages row j of A to P_j times
    itself, P_j the weight share of the clients whose rank exceeds j, so FedIT's update is
    sum_k p_k s_k B_k diag(P_1..P_rk) A_k, every direction beyond the smallest rank shrunk
    (7% and 18% off the exact update at ranks 2/4/8/8 and 1/2/4/8 in tests/test_aggregation.py,
    which shows each case). FFA-LoRA keeps the shared A itself and is exact at mixed ranks."""

    name = "fedit"
    continues_from_global = True

    def combine(self, batch: ModuleBatch):
        b_mean, scales = batch.folded_b_average()
        a_mean = batch.padded_average("A", batch.weights.expand(len(batch.names), -1))
        return {
            name: batch.module(g, b_mean[g], a_mean[g], scale=scales[g].item()) for g, name in enumerate(batch.names)
        }, None
