"""Warm start: a client begins its round's LoRA from the last global update instead of from B = 0.

In the paper's round semantics a FLoRIST client merges every global update into its base and starts
a fresh LoRA (B = 0) each round; FlexLoRA's clients continue from their truncation of the global
adapter. A warm start gives FLoRIST's clients FlexLoRA's starting point and keeps FLoRIST's exact,
merged update: a client of rank r moves the leading r components of the last update (ordered by
singular value) out of its base and into its LoRA, so its model is unchanged, and trains from there.

It uploads its factors less the LoRA it started with (`change_since_start`), and the server, which
sent the start, recovers what the client learned as one stacked factor pair (`learned_since_start`):
without a dense matrix, without a byte more on the wire, and with no factor on the wire of the start's
size, so a lossy wire's error is relative to what was learned, not to the much larger start. Both
sides derive the LoRA's start from the same start module (`lora_start`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from florist.aggregation.truncation import cut
from florist.aggregation.types import AggregationError, GlobalModule, LoraFactors


def start_of(update: Mapping[str, GlobalModule], rank: int) -> dict[str, GlobalModule]:
    """What a client of `rank` starts from: each module's leading `rank` components (all of them
    where the update kept fewer)."""
    return cut(update, {name: min(rank, module.rank) for name, module in update.items()})


def lora_start(start: GlobalModule, scale: float) -> LoraFactors:
    """The leading factors of a LoRA of `scale` that starts from `start`: its A, and its B rescaled
    so that scale B A is the start's update."""
    return LoraFactors(A=start.A, B=start.B * (start.scale / scale), scale=scale)


def change_since_start(trained: Mapping[str, LoraFactors], start: Mapping[str, GlobalModule]) -> dict[str, LoraFactors]:
    """What a warm-started client uploads: its factors less the LoRA it started with, B - B0 in every
    column and A - A0 in the start's rows; the rows past them keep the trained A, whose random init
    the server does not know (their B0 columns are 0, so they need none)."""
    changes = {}
    for name, factors in trained.items():
        begun = lora_start(start[name], factors.scale)
        kept = begun.rank
        changes[name] = LoraFactors(
            A=torch.cat([factors.A[:kept] - begun.A, factors.A[kept:]]),
            B=torch.cat([factors.B[:, :kept] - begun.B, factors.B[:, kept:]], dim=1),
            scale=factors.scale,
        )
    return changes


def learned_since_start(changes: Mapping[str, LoraFactors], start: Mapping[str, GlobalModule]) -> dict[str, LoraFactors]:
    """A warm-started client's own update from its upload (`change_since_start`), exactly: with B0, A0
    the LoRA it started with and dB, dA its change, s B A - s B0 A0 = s [dB | B0] @ [A ; dA0], where
    A is A0 + dA in the start's rows and dA0 is dA there. No term cancels another."""
    learned = {}
    for name, change in changes.items():
        begun = lora_start(start[name], change.scale)
        kept = begun.rank
        if change.rank < kept:
            raise AggregationError(f"the upload's rank {change.rank} is below the warm start's {kept}", module=name)
        trained_a = torch.cat([begun.A + change.A[:kept], change.A[kept:]])
        learned[name] = LoraFactors(
            A=torch.cat([trained_a, change.A[:kept]]), B=torch.cat([change.B, begun.B], dim=1), scale=change.scale
        )
    return learned
