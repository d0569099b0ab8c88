"""FLoRA: every client downloads the whole stack; exact, but the download grows with K."""

from __future__ import annotations

from dataclasses import dataclass

from florist.aggregation.base import Aggregator, ModuleBatch


@dataclass(frozen=True)
class FLoRA(Aggregator):
    name = "flora"
    continues_from_global = False

    def combine(self, batch: ModuleBatch):
        # Each client's own p_k s_k is folded into its rows of A, so a single scale of 1 is
        # right for the stack (the reference code's one global alpha/r is the bug to avoid).
        b_stack, a_stack = batch.stacked()
        return {name: batch.module(g, b_stack[g], a_stack[g]) for g, name in enumerate(batch.names)}, None
