"""How much one reply may move a round: its update's norm against the round's median (rejected far
off it, clipped above `clip_factor` times it), and its weight capped to a share of the round's.

Both are decided as replies arrive, so that the server can add each reply to the aggregate and
drop it; neither depends on another client's word beyond the median of many. The bound they give
together is stated and tested (README, "Faults, untrusted replies and resume").

Neither applies under florist-secure, whose server only sums the replies and reads none of them:
federation/secure.py says what protects the sum there (client-side clipping, min_sites, the sum's
own norm against the previous rounds').
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from florist.aggregation import ClientAdapter, adapter_norm, tensors_norm

UPDATE = "update"
DENSE = "tensors trained in full"
"""The names of a reply's two norms, as a reason names them."""

Norms = Mapping[str, float]
Clip = dict[str, float]
"""Per norm, the factor an admitted reply is scaled by: 1 where it is within the clip."""


def screened_norms(adapter: ClientAdapter, start: Mapping[str, Tensor]) -> dict[str, float]:
    """The norms the round's NormScreen judges a reply by, named as its reasons name them: the LoRA
    update's, and the change of the tensors trained in full from `start`, the values every node
    began the round with (none in round 1: the server does not hold the base model's weights, so
    there the tensors' own norm is judged)."""
    changes = {name: tensor.double() - start[name].double() if name in start else tensor for name, tensor in adapter.dense.items()}
    return {UPDATE: adapter_norm(adapter.modules), DENSE: tensors_norm(changes)}


def clipped(adapter: ClientAdapter, clip: Clip, start: Mapping[str, Tensor]) -> ClientAdapter:
    """The adapter with its update scaled as `clip` says: the LoRA update through each module's
    scale, the tensors trained in full through their change from `start` (in round 1, with no
    start, the tensors themselves, as `screened_norms` measured them)."""
    modules, dense = adapter.modules, adapter.dense
    if clip[UPDATE] < 1:
        modules = {name: replace(factors, scale=factors.scale * clip[UPDATE]) for name, factors in modules.items()}
    if clip[DENSE] < 1:
        factor = clip[DENSE]
        dense = {
            name: torch.lerp(start[name], tensor, factor) if name in start else tensor * factor for name, tensor in dense.items()
        }
    return replace(adapter, modules=modules, dense=dense)


class NormScreen:
    """The round's norm check, as replies arrive. An update whose norm is more than `factor` times
    the median of the same norm, or less than the median divided by `factor`, is rejected; one
    admitted above `clip` times the median is scaled down to it (`clipped`).

    A reply has two norms (`screened_norms`): its LoRA update's, and that of the change of its
    tensors trained in full (biases, a `modules_to_save` head; 0 where the settings train none),
    each judged against its own median, since a head's norm would drown any LoRA update's.

    A median says which norms are off only while most of the norms it is taken over are honest.
    So the first `reference` replies are held and judged together against their own medians:
    `for_sample` sizes it so that colluding nodes fewer than a third of the sampled ones are fewer
    than half of it, whatever the order replies arrive in. Each later reply is judged on arrival
    against the medians of the replies admitted so far (as admitted, clipped), so the server can
    fold it into the aggregate and drop it. A round that ends before `reference` replies judges
    what it holds against their own medians if there are at least `WARMUP`, and admits fewer
    unjudged (a median of two says nothing about which one is off).
    """

    WARMUP = 3

    def __init__(self, factor: float, clip: float, reference: int = WARMUP):
        self.factor = factor
        self.clip = clip
        self.reference = max(self.WARMUP, reference)
        self.held: dict[int, Norms] = {}
        self.admitted: list[Norms] = []

    @classmethod
    def for_sample(cls, factor: float, clip: float, sampled: int) -> NormScreen:
        """A screen whose reference holds more than twice the largest minority below a third of `sampled`."""
        minority = math.ceil(sampled / 3) - 1
        return cls(factor, clip, 2 * minority + 1)

    def offer(self, key: int, norms: Norms) -> tuple[dict[int, Clip], dict[int, str]]:
        """({key admitted now: its clip}, {key rejected: reason}) once `key`'s reply is judged; both
        empty while held. `norms` names each norm as the reason would (every reply names the same ones)."""
        if self.admitted:
            return self._judge({key: norms}, self.admitted)
        self.held[key] = norms
        if len(self.held) < self.reference:
            return {}, {}
        held, self.held = self.held, {}
        return self._judge(held, list(held.values()))

    def flush(self) -> tuple[dict[int, Clip], dict[int, str]]:
        """The replies still held at the round's end, judged against their own medians, or admitted
        unclipped when fewer than WARMUP."""
        held, self.held = self.held, {}
        if len(held) >= self.WARMUP:
            return self._judge(held, list(held.values()))
        self.admitted += held.values()
        return {key: dict.fromkeys(norms, 1.0) for key, norms in held.items()}, {}

    def _judge(self, offered: Mapping[int, Norms], against: list[Norms]) -> tuple[dict[int, Clip], dict[int, str]]:
        medians = {name: statistics.median(norms[name] for norms in against) for name in next(iter(offered.values()))}
        admitted, rejected = {}, {}
        for key, norms in offered.items():
            reason = next(filter(None, (self._refusal(name, norms[name], median) for name, median in medians.items())), None)
            if reason is not None:
                rejected[key] = reason
                continue
            admitted[key] = {name: self._clip(norms[name], median) for name, median in medians.items()}
        self.admitted += [{name: offered[key][name] * clip[name] for name in clip} for key, clip in admitted.items()]
        return admitted, rejected

    def _refusal(self, name: str, norm: float, median: float) -> str | None:
        if not norm <= self.factor * median:
            return f"{name} norm {norm:.4g} is more than {self.factor:g}x the round's median {median:.4g} (validation.norm_factor)"
        if norm < median / self.factor:
            return f"{name} norm {norm:.4g} is less than 1/{self.factor:g} of the round's median {median:.4g} (validation.norm_factor)"
        return None

    def _clip(self, norm: float, median: float) -> float:
        bound = self.clip * median
        return bound / norm if norm > bound else 1.0


def weight_level(claims: list[int], share: float) -> float:
    """The level c at which claims are cut, min(n, c), so that none holds more than `share` of
    their sum: the largest c with c <= share * sum(min(n, c)); inf where no claim needs cutting.

    With the claims sorted, a level between the j-th and the (j+1)-th cuts the largest N - j and
    solves c = share * (P_j + (N - j) c), P_j the sum of the j smallest: the first j whose root lies
    below the next claim gives it (share * sum(min(n, c)) - c is concave and 0 at c = 0). Fewer
    than 1 / share claims leave only c = 0.
    """
    ordered = sorted(claims)
    below = 0.0
    for j, claim in enumerate(ordered):
        cut = len(ordered) - j
        if share * cut < 1:
            level = share * below / (1 - share * cut)
            if level <= claim:
                return level
        below += claim
    return math.inf


class WeightCap:
    """The round's weights, as replies are admitted: each node's claimed examples, cut to
    `weight_level` so that no node holds more than `share` of the round's weight.

    A claim at or below the level of the claims admitted so far is released at once with its full
    weight: later claims only raise the level, so it is below the round's final level too. A claim
    above it waits for the round's end, where every claim waiting is cut to the level of all of
    them. The weights are the same whatever the order replies arrive in. A round of N <= 1 / share
    replies cannot keep each below `share`: it is split evenly, every claim cut to the smallest.
    """

    def __init__(self, share: float):
        self.share = share
        self.claims: dict[int, int] = {}
        self.waiting: dict[int, int] = {}

    def offer(self, key: int, claim: int) -> dict[int, float]:
        """{key: weight} of the replies released now, `key`'s and those waiting that the level now covers."""
        self.claims[key] = self.waiting[key] = claim
        level = weight_level(list(self.claims.values()), self.share)
        released = {node: float(n) for node, n in self.waiting.items() if n <= level}
        for node in released:
            del self.waiting[node]
        return released

    def forget(self, key: int) -> None:
        """A released reply the aggregate refused: its claim no longer counts."""
        del self.claims[key]

    def close(self) -> dict[int, float]:
        """{key: weight} of the replies still waiting, each cut to the level of every claim admitted."""
        claims = list(self.claims.values())
        # No level keeps each of N <= 1 / share claims below share: all are cut to the smallest.
        level = weight_level(claims, self.share) if self.share * len(claims) > 1 else min(claims, default=0)
        released, self.waiting = {node: min(float(n), level) for node, n in self.waiting.items()}, {}
        return released
