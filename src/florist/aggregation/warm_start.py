"""Warm start: a client begins its round's LoRA from the last global update instead of from B = 0.

In the paper's round semantics a FLoRIST client merges every global update into its base and starts
a fresh LoRA (B = 0) each round; FlexLoRA's clients continue from their truncation of the global
adapter. A warm start gives FLoRIST's clients FlexLoRA's starting point and keeps FLoRIST's exact,
merged update: a client of rank r moves the leading r components of the last update (ordered by
singular value) out of its base and into its LoRA, so its model is unchanged, and trains from there.
Its upload is then start + its own update; the server, which sent the start, takes it off again as
one more stacked factor pair, without a dense matrix and without a byte more on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from florist.aggregation.truncation import cut
from florist.aggregation.types import GlobalModule, LoraFactors


def start_of(update: Mapping[str, GlobalModule], rank: int) -> dict[str, GlobalModule]:
    """What a client of `rank` starts from: each module's leading `rank` components (all of them
    where the update kept fewer)."""
    return cut(update, {name: min(rank, module.rank) for name, module in update.items()})


def since_start(trained: Mapping[str, LoraFactors], start: Mapping[str, GlobalModule]) -> dict[str, LoraFactors]:
    """A warm-started client's own update, exactly: s [B | -B0 s0 / s] @ [A ; A0] = s B A - s0 B0 A0."""
    return {
        name: LoraFactors(
            A=torch.cat([factors.A, start[name].A]),
            B=torch.cat([factors.B, start[name].B * (-start[name].scale / factors.scale)], dim=1),
            scale=factors.scale,
        )
        for name, factors in trained.items()
    }
