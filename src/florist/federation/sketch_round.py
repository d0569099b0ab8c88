"""florist-secure's round as a site sees it: the train instruction's record of the round's sketch
(`SketchRound`: the test matrices' seed, each module's width, the sites sampled, the noise and the
weight level) and what the site uploads for it (`site_upload`): its sketches weighted by its
examples at the round's weight level (federation/weight_level.py) or, under differential privacy,
clipped and noised (florist/privacy.py). The server's side is federation/secure.py.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from florist.aggregation import LoraFactors
from florist.aggregation.sketch import WEIGHT, add_noise, client_sketch, clip_to_norm, sketch_sensitivity, widths
from florist.config import RunConfig
from florist.federation.messages import ADAPTER
from florist.federation.node_config import Refused
from florist.federation.weight_level import capped_weight
from florist.privacy import planned_noise_multiplier, site_noise_std

SKETCH = "sketch"
"""The train instruction's record of the round's sketch: seed, widths, sites sampled, noise multiplier, weight level."""
CUT = "cut"
"""A sketch upload's key for 1 if the site cut its weight to the round's weight level, else 0: summed,
how many sites were cut (`WeightLevel`)."""
SKETCH_DTYPES = {WEIGHT: np.dtype("<f8"), CUT: np.dtype("<f8")}
"""A sketch upload's arrays are float32 but its weight and cut, float64 (counts, exactly)."""


@dataclass(frozen=True)
class SketchRound:
    """What every site of a round needs to sketch alike: the test matrices' seed and each module's
    width, how many sites were sampled (each adds 1/sites of the noise), and the noise multiplier
    (0 without DP)."""

    seed: int
    widths: tuple[int, ...]
    """Each module's sketch width l, in the order of the sorted module names (`module_widths`)."""
    sites: int
    noise_multiplier: float = 0.0
    weight_level: float = math.inf
    """Each site weighs its sketches by min(its examples, this) (`WeightLevel`); inf: no cut."""
    rounds: int = 1
    """federation.rounds, which is not a shared setting (a resumed run may change it): what a private
    run's epsilon is spent over, so that each site recomputes the noise it must add (`site_upload`)."""

    def record(self) -> ConfigRecord:
        return ConfigRecord({
            "seed": self.seed, "widths": list(self.widths), "sites": self.sites, "noise-multiplier": self.noise_multiplier,
            "weight-level": self.weight_level, "rounds": self.rounds,
        })

    @classmethod
    def read(cls, message: Message) -> SketchRound:
        record = message.content[SKETCH]
        level = float(record["weight-level"])
        if not level > 0:
            raise ValueError(f"the server's weight level {level!r} is not positive")
        widths = record.get("widths")
        if not isinstance(widths, list) or not all(type(width) is int for width in widths):
            raise Refused(f"the server's sketch widths {widths!r} are not a list of integers")
        rounds, sites = record.get("rounds"), record["sites"]
        if type(rounds) is not int or rounds < 1 or type(sites) is not int or sites < 1:
            raise Refused(f"the server's sketch record states {rounds!r} rounds and {sites!r} sites, not positive integers")
        return cls(int(record["seed"]), tuple(widths), sites, float(record["noise-multiplier"]), level, rounds)

    @classmethod
    def of(cls, seed: int, widths: Mapping[str, int], sites: int, noise_multiplier: float, weight_level: float, rounds: int) -> SketchRound:
        return cls(seed, tuple(widths[name] for name in sorted(widths)), sites, noise_multiplier, weight_level, rounds)

    def sampling_rate(self, config: RunConfig) -> float:
        """The share of the federation's clients this round sampled (federation.num_clients is shared)."""
        return min(1.0, self.sites / config.federation.num_clients)

    def module_widths(self, shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        """Each module's width, once every one is a width its sketch can have (1 <= l <= min(m, n)):
        a site refuses (one line) widths that name other modules or would make it upload more than
        the exact sketch, which a hostile server could use to read more of its update."""
        names = sorted(shapes)
        if len(self.widths) != len(names):
            raise Refused(f"the server sends {len(self.widths)} sketch widths for the {len(names)} modules this site trains")
        for name, width in zip(names, self.widths):
            if not 1 <= width <= min(shapes[name]):
                raise Refused(f"the server's sketch width {width} for module {name} is outside [1, {min(shapes[name])}]")
        return dict(zip(names, self.widths))


def site_upload(config: RunConfig, sketch: SketchRound, factors: Mapping[str, LoraFactors], examples: int) -> tuple[dict[str, torch.Tensor], dict]:
    """What a site uploads for its trained `factors`, and metrics about it: its sketches weighted by its
    examples, or, under DP, clipped to privacy.clip_norm, at weight 1, with its share of the noise
    from a generator the server cannot know."""
    privacy = config.privacy
    shapes = {name: f.shape for name, f in factors.items()}
    sides = {name: widths(shapes[name], width) for name, width in sketch.module_widths(shapes).items()}
    if not privacy.dp:
        weight, cut = capped_weight(examples, sketch.weight_level)
        return client_sketch(factors, weight, sketch.seed, sides) | {CUT: torch.tensor(cut, dtype=torch.float64)}, {}
    planned = planned_noise_multiplier(privacy, sketch.rounds, sketch.sampling_rate(config))
    # A relative tolerance: the server computed the same number, maybe with another float order.
    if sketch.noise_multiplier < planned * (1 - 1e-9):
        stated = "privacy.noise_multiplier" if privacy.noise_multiplier is not None else f"privacy.target_epsilon {privacy.target_epsilon:g}"
        raise Refused(f"the server asks for noise multiplier {sketch.noise_multiplier:g}, below the {planned:.6g} that {stated} needs")
    clipped, factor = clip_to_norm(factors, privacy.clip_norm)
    std = site_noise_std(sketch.noise_multiplier, sketch_sensitivity(privacy.clip_norm), sketch.sites)
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    upload = add_noise(client_sketch(clipped, 1.0, sketch.seed, sides), std, generator)
    return upload | {CUT: torch.tensor(0.0, dtype=torch.float64)}, {"dp-clip-factor": factor}


def put_upload(content, upload: Mapping[str, torch.Tensor]) -> int:
    record = ArrayRecord({key: Array(value.detach().cpu().numpy()) for key, value in upload.items()})
    content[ADAPTER] = record
    return record.count_bytes()
