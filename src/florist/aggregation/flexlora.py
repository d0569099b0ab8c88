"""FlexLoRA: form each dense update, one SVD per module, a rank-r truncation per client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from florist.aggregation.base import Aggregator, ModuleBatch
from florist.aggregation.spectral import dense_svd
from florist.aggregation.types import AggregationError


@dataclass(frozen=True)
class FlexLoRA(Aggregator):
    """`ranks`: the rank each client receives (default: the rank it sent)."""

    ranks: Sequence[int] | None = None

    name = "flexlora"
    continues_from_global = True

    def __post_init__(self) -> None:
        if self.ranks is not None and any(r < 1 for r in self.ranks):
            raise AggregationError(f"FlexLoRA ranks must be >= 1, got {list(self.ranks)}")

    def combine(self, batch: ModuleBatch):
        ranks = list(self.ranks) if self.ranks is not None else batch.ranks
        if len(ranks) != len(batch.ranks):
            raise AggregationError(f"FlexLoRA got {len(ranks)} ranks for {len(batch.ranks)} clients")
        b_stack, a_stack = batch.stacked()
        shared, per_client = {}, [{} for _ in ranks]
        # One module at a time: a dense update is m x n, the memory this method cannot avoid.
        for g, name in enumerate(batch.names):
            u, s, vh = dense_svd(b_stack[g] @ a_stack[g])
            # One SVD per module, truncated per distinct rank (the reference recomputes it per client).
            truncations = {r: batch.module(g, u[:, :r] * s[:r], vh[:r], singular_values=s) for r in set(ranks)}
            shared[name] = truncations[max(ranks)]
            for mine, r in zip(per_client, ranks):
                mine[name] = truncations[r]
        return shared, per_client
