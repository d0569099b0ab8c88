"""The numbers a site reports about its training, summed by the secure sum instead of sent in the
clear (privacy.secure_aggregation): its examples, its train tokens, its train loss times its weight
and, under privacy.dp, whether its update was clipped. The server reads only their totals: the
round's examples and tokens, the weighted mean train loss (the summed loss times weight over the
summed weight) and how many sites were clipped.

The secure sum quantises a float to a step of 2 * secure_clip_range / (2**secure_bits - 1) within
+-secure_clip_range (secure_sum/quantization.py), which would refuse a site of more examples than
the range and make a count inexact. So the counts (examples, tokens, the clipped flag and the
weight level's cut flag) are the layout's counts, summed exactly, and the two floats (the sketches'
WEIGHT, min(examples, weight level), and the loss times weight) travel as their whole part, a
count, and their fraction, quantised (`exact_parts`): their totals are within K quantisation steps
of the clear sums, whatever their size.

These totals are sums over at least federation.min_sites sites (the secure sum's own quorum); they
carry no differential-privacy noise.

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

from collections.abc import Mapping

import torch

from florist.aggregation.sketch import WEIGHT
from florist.federation.secure_sum import Layout
from florist.federation.secure_sum.quantization import exact_names, exact_parts, joined
from florist.federation.sketch_round import CUT

EXAMPLES, TRAIN_TOKENS, WEIGHTED_LOSS, CLIPPED = "total:examples", "total:train-tokens", "total:weighted-train-loss", "total:clipped"
COUNTS = (EXAMPLES, TRAIN_TOKENS, CLIPPED, CUT)
"""The upload's counts, summed exactly."""
FLOATS = (WEIGHT, WEIGHTED_LOSS)
"""The upload's floats of any size, each summed as its whole part and its fraction."""
CLEAR_METRICS = ("round", "partition-id", "chain-length", "rank", "train-steps")
"""What a secure site's train reply carries in the clear: nothing about its data (see above)."""


def summed_layout(sketch_shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """The secure sum's layout for a round of these sketch shapes: the sketches, the counts and the floats' parts."""
    counts = [*COUNTS, *(exact_names(name)[0] for name in FLOATS)]
    fractions = [exact_names(name)[1] for name in FLOATS]
    sketches = {name: shape for name, shape in sketch_shapes.items() if name not in (WEIGHT, CUT)}
    shapes = sketches | dict.fromkeys([*counts, *fractions], ())
    return Layout(tuple(sorted(shapes.items())), tuple(sorted(counts)))


def with_totals(upload: Mapping[str, torch.Tensor], examples: int, tokens: int, loss: float, clipped: bool) -> dict[str, torch.Tensor]:
    """A site's sketch upload as the secure sum takes it: its sketches, its counts, and its weight and
    training loss (weighted by the weight its sketches carry) as `exact_parts`."""
    weight = float(upload[WEIGHT].item())
    values = {EXAMPLES: examples, TRAIN_TOKENS: tokens, CLIPPED: float(clipped), CUT: float(upload[CUT].item())}
    for name, value in ((WEIGHT, weight), (WEIGHTED_LOSS, loss * weight)):
        if not value >= 0:
            raise ValueError(f"{name} {value!r} is not a non-negative number that the secure sum can carry")
        values |= exact_parts(name, value)
    sketches = {key: value for key, value in upload.items() if key not in (WEIGHT, CUT)}
    return sketches | {key: torch.tensor(float(value), dtype=torch.float64) for key, value in values.items()}


def read_totals(total: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The secure sum's result as the accumulator takes it (the sketches, the weight and the cut), and
    the round's totals: examples, train tokens, weighted mean train loss, sites clipped."""
    value = {name: float(tensor.item()) for name, tensor in total.items() if tensor.dim() == 0}
    weight = joined(value, WEIGHT)
    parts = {name for float_name in FLOATS for name in exact_names(float_name)}
    summed = {key: tensor for key, tensor in total.items() if key not in parts and key not in COUNTS}
    summed |= {WEIGHT: torch.tensor(weight, dtype=torch.float64), CUT: total[CUT]}
    totals = {
        "examples": round(value[EXAMPLES]),
        "train_tokens": round(value[TRAIN_TOKENS]),
        "train_loss": joined(value, WEIGHTED_LOSS) / weight if weight > 0 else float("nan"),
        "sites_clipped": round(value[CLIPPED]),
    }
    return summed, totals
