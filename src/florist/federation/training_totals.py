"""The numbers a site reports about its training, summed by the secure sum instead of sent in the
clear (privacy.secure_aggregation): its examples, its train tokens, its train loss times its weight
and, under privacy.dp, whether its update was clipped. The server reads only their totals: the
round's examples and tokens, the weighted mean train loss (the summed loss times weight over the
summed weight) and how many sites were clipped.

The secure sum quantises every value of a site's upload to a step of 2 * secure_clip_range /
(2**secure_bits - 1) within +-secure_clip_range (secure_sum/quantization.py), so a count of more
than the range (a site of 20,000 examples at the default 1e4) cannot go in as one value, and a
quantised count is off by up to one step per site. Each total therefore travels as `FixedPoint`
digits: the value in fixed point (FRACTION_BITS binary places for a fraction, none for a count),
written in base 2**b <= secure_clip_range, each digit one summed entry. A digit's sum over K sites
is an integer read within K steps; at K steps < 1/2 (checked by the configuration for
federation.sample_size sites) rounding recovers it exactly, so counts sum exactly and fractions to
2**-FRACTION_BITS a site. The sketches' WEIGHT, min(examples, weight level), travels the same way:
as one quantised value it failed any site of more examples than the range.

These totals are exact sums over at least federation.min_sites sites (the secure sum's own
quorum); they carry no differential-privacy noise.

What a secure site's train reply still says in the clear (`CLEAR_METRICS`), none of it about its
data: the round and the chain length it trained on (the server sent both), its partition-id (its
identity, which the server binds to its node), the rank the server assigned it, and its train
steps (training.local_steps, fixed by the shared settings). Not sent: its examples, train loss and
tokens (summed here), its clip factor (summed as a clipped flag), its train seconds and peak
memory (both grow with its data, and neither sums into anything the run uses). So the server
cannot check one site's example count against validation.min_examples/max_examples; the weight
each site gives itself is capped by the weight level (federation/weight_level.py) instead, and
the report records no per-site weight. The site's own log still prints its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from florist.aggregation.sketch import WEIGHT
from florist.config import PrivacyConfig

FRACTION_BITS = 20
"""Binary places of a total that is not a count (the weight, loss times weight): 1e-6 a site."""
TOTAL_BITS = 64
"""Bits of a total in fixed point, its fraction included: a loss times weight up to 2**44."""

EXAMPLES, TRAIN_TOKENS, WEIGHTED_LOSS, CLIPPED = "total:examples", "total:train-tokens", "total:weighted-train-loss", "total:clipped"
TOTALS = {EXAMPLES: 0, TRAIN_TOKENS: 0, WEIGHTED_LOSS: FRACTION_BITS, CLIPPED: 0}
"""Each total's key in the summed upload and its binary places (0: a count, summed exactly)."""
DIGITS = {WEIGHT: FRACTION_BITS} | TOTALS
"""Every entry of a secure-sum upload that travels as digits."""
CLEAR_METRICS = ("round", "partition-id", "chain-length", "rank", "train-steps")
"""What a secure site's train reply carries in the clear: nothing about its data (see above)."""


@dataclass(frozen=True)
class FixedPoint:
    """Non-negative numbers as digits of `digit_bits` bits, each below the secure sum's clip range."""

    digit_bits: int

    @classmethod
    def of(cls, privacy: PrivacyConfig) -> FixedPoint:
        return cls(math.floor(math.log2(privacy.secure_clip_range)))

    @property
    def digits(self) -> int:
        return math.ceil(TOTAL_BITS / self.digit_bits)

    def split(self, key: str, value: float, fraction_bits: int) -> torch.Tensor:
        """`value` as float64 digits, lowest first; a value it cannot hold is refused in one line."""
        if not (math.isfinite(value) and 0 <= value < 2 ** (TOTAL_BITS - fraction_bits)):
            raise ValueError(f"{key} {value!r} is not a number in [0, 2**{TOTAL_BITS - fraction_bits}) that the secure sum can carry")
        scaled, mask = round(value * 2**fraction_bits), 2**self.digit_bits - 1
        return torch.tensor([(scaled >> (i * self.digit_bits)) & mask for i in range(self.digits)], dtype=torch.float64)

    def join(self, digit_sums: torch.Tensor, fraction_bits: int) -> int | float:
        """The sum of the values whose digits were summed, each digit sum rounded to its integer: a
        count's an int, exact."""
        scaled = sum(round(d) << (i * self.digit_bits) for i, d in enumerate(digit_sums.tolist()))
        return scaled if fraction_bits == 0 else scaled / 2**fraction_bits


def summed_shapes(shapes: Mapping[str, tuple[int, ...]], fixed_point: FixedPoint) -> dict[str, tuple[int, ...]]:
    """The secure sum's tensors for an upload of these `shapes`: the weight as digits, and each total."""
    return dict(shapes) | {key: (fixed_point.digits,) for key in DIGITS}


def with_totals(upload: Mapping[str, torch.Tensor], fixed_point: FixedPoint, examples: int, tokens: int, loss: float, clipped: bool) -> dict[str, torch.Tensor]:
    """A site's sketch upload for the secure sum: its weight as digits, and its training's totals,
    the loss weighted by the weight its sketches carry."""
    weight = float(upload[WEIGHT].item())
    values = {WEIGHT: weight, EXAMPLES: examples, TRAIN_TOKENS: tokens, WEIGHTED_LOSS: loss * weight, CLIPPED: float(clipped)}
    return dict(upload) | {key: fixed_point.split(key, values[key], DIGITS[key]) for key in DIGITS}


def read_totals(total: Mapping[str, torch.Tensor], fixed_point: FixedPoint) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The secure sum's result as the accumulator takes it (the weight a scalar again, the totals
    out), and the round's totals: examples, train tokens, weighted mean train loss, sites clipped."""
    sums = {key: fixed_point.join(total[key], places) for key, places in DIGITS.items()}
    upload = {key: value for key, value in total.items() if key not in DIGITS} | {WEIGHT: torch.tensor(sums[WEIGHT], dtype=torch.float64)}
    totals = {
        "examples": int(sums[EXAMPLES]),
        "train_tokens": int(sums[TRAIN_TOKENS]),
        "train_loss": sums[WEIGHTED_LOSS] / sums[WEIGHT],
        "sites_clipped": int(sums[CLIPPED]),
    }
    return upload, totals
