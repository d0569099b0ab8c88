"""FedIT: weighted averages of A and of B, zero-padded to the largest rank (HetLoRA)."""

from __future__ import annotations

from dataclasses import dataclass

from florist.aggregation.base import Aggregator, ModuleBatch


@dataclass(frozen=True)
class FedIT(Aggregator):
    """Each client's scale s_k is folded into its B before averaging (METHOD.md: "fold s_k into
    the factors"). A is where LoRA keeps its initialisation and B what was learned, so clients
    that share A (FFA-LoRA's case, or FedIT clients whose A barely moved from the global one)
    get the exact update whatever their scales; with raw factors a client of scale 2 would
    weigh like one of scale 0.5 (tests/test_aggregation.py shows both)."""

    name = "fedit"
    continues_from_global = True

    def combine(self, batch: ModuleBatch):
        b_mean, scales = batch.folded_b_average()
        a_mean = batch.padded_average("A", batch.weights.expand(len(batch.names), -1))
        return {
            name: batch.module(g, b_mean[g], a_mean[g], scale=scales[g].item()) for g, name in enumerate(batch.names)
        }, None
