"""FlexLoRA: the SVD of each module's aggregated update, a rank-r truncation per client.

The paper forms each dense m x n update and decomposes it (`route = "dense"`). The same SVD comes
from the stacked factors without forming the update (`route = "qr"`, the default): B_stack = Q_B R_B,
A_stack^T = Q_A R_A and the SVD of the small core R_B R_A^T, as FLoRIST's exact route does. Both give
every client its best rank-r approximation of the exact update; the factored one costs
O((m + n) R^2) per module instead of O(m n min(m, n)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from florist.aggregation.base import Aggregator, ModuleBatch
from florist.aggregation.spectral import dense_svd, qr_route
from florist.aggregation.types import AggregationError

FLEXLORA_ROUTES = ("qr", "dense")


@dataclass(frozen=True)
class FlexLoRA(Aggregator):
    """`ranks`: the rank each client receives (default: the rank it sent)."""

    ranks: Sequence[int] | None = None
    route: str = "qr"

    name = "flexlora"
    continues_from_global = True

    def __post_init__(self) -> None:
        if self.ranks is not None and any(r < 1 for r in self.ranks):
            raise AggregationError(f"FlexLoRA ranks must be >= 1, got {list(self.ranks)}")
        if self.route not in FLEXLORA_ROUTES:
            raise AggregationError(f"unknown FlexLoRA route {self.route!r}; choose from {', '.join(FLEXLORA_ROUTES)}")

    def combine(self, batch: ModuleBatch):
        ranks = list(self.ranks) if self.ranks is not None else batch.ranks
        if len(ranks) != len(batch.ranks):
            raise AggregationError(f"FlexLoRA got {len(ranks)} ranks for {len(batch.ranks)} clients")
        shared, per_client = {}, [{} for _ in ranks]
        for g, name, (left, right, s) in self._decompositions(batch):
            # One SVD per module, truncated per distinct rank (the reference recomputes it per client).
            truncations = {r: batch.module(g, *_leading(left, right, min(r, *batch.shape)), singular_values=s) for r in set(ranks)}
            shared[name] = truncations[max(ranks)]
            for mine, r in zip(per_client, ranks):
                mine[name] = truncations[r]
        return shared, per_client

    def _decompositions(self, batch: ModuleBatch):
        """(g, name, (U S, V^T, singular values)) per module, every component kept."""
        b_stack, a_stack = batch.stacked()
        if self.route == "qr":
            # In the compute dtype, as the paper's dense SVD: each client's truncation drops far more
            # than its rounding (tolerance 1 never asks for float64).
            left, right, s, _, _ = qr_route(b_stack, a_stack, lambda values: torch.full(values.shape[:-1], values.shape[-1]), tolerance=1.0)
            yield from ((g, name, (left[g], right[g], s[g])) for g, name in enumerate(batch.names))
            return
        # One module at a time: a dense update is m x n, the memory this route cannot avoid.
        for g, name in enumerate(batch.names):
            u, s, vh = dense_svd(b_stack[g] @ a_stack[g])
            yield g, name, (u * s, vh, s)


def _leading(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The leading `rank` components, zero-padded where the update has fewer (a client asking for more
    rank than the whole stack holds still gets a LoRA of its own rank)."""
    missing = rank - left.shape[-1]
    if missing <= 0:
        return left[:, :rank], right[:rank]
    return torch.nn.functional.pad(left, (0, missing)), torch.nn.functional.pad(right, (0, 0, 0, missing))
