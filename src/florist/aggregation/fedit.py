"""FedIT: weighted averages of A and of B, zero-padded to the largest rank (HetLoRA)."""

from __future__ import annotations

from dataclasses import dataclass

from florist.aggregation.base import Aggregator, ModuleBatch


@dataclass(frozen=True)
class FedIT(Aggregator):
    name = "fedit"
    continues_from_global = True

    def combine(self, batch: ModuleBatch):
        b_mean, a_mean, scales = batch.padded_average("B"), batch.padded_average("A"), batch.mean_scale()
        return {
            name: batch.module(g, b_mean[g], a_mean[g], scale=scales[g].item()) for g, name in enumerate(batch.names)
        }, None
