"""FFA-LoRA: A stays at its shared random initialisation; only B is trained and averaged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from florist.aggregation.base import Aggregator, ModuleBatch
from florist.aggregation.types import AggregationError


@dataclass(frozen=True)
class FFALoRA(Aggregator):
    name = "ffa"
    continues_from_global = True

    def combine(self, batch: ModuleBatch):
        # p_k s_k folded into B: exact with the shared A, whatever each client's scale.
        b_mean, scales = batch.folded_b_average()
        modules = {}
        for g, (name, row) in enumerate(zip(batch.names, batch.factors)):
            frozen = max(row, key=lambda f: f.rank).A
            for k, factors in enumerate(row):
                # Every client's A must be a prefix of the same seeded initialisation.
                if not torch.equal(factors.A, frozen[: factors.rank].to(factors.A.dtype)):
                    raise AggregationError("FFA-LoRA needs the same frozen A on every client", client=k, module=name)
            modules[name] = batch.module(g, b_mean[g], frozen, scale=scales[g].item())
        return modules, None
