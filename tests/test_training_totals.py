"""A secure site's training totals (federation/training_totals.py) through the secure sum's own
encoding (the layout's counts unquantised, floats as whole part and quantised fraction): counts come
back exact and floats within K quantisation steps, far beyond privacy.secure_clip_range; what
cannot be carried is refused in one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from florist.aggregation.sketch import WEIGHT
from florist.federation.secure_sum import Quantizer
from florist.federation.sketch_round import CUT
from florist.federation.training_totals import EXAMPLES, TRAIN_TOKENS, summed_layout, read_totals, with_totals

SHAPES = {"q:range": (3, 2), "q:corange": (4, 3), WEIGHT: (), CUT: ()}


def upload(weight: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        # Sketch entries within the smallest range tested (2): only the totals go beyond it.
        "q:range": torch.rand(3, 2, generator=generator) - 0.5, "q:corange": torch.rand(4, 3, generator=generator) - 0.5,
        WEIGHT: torch.tensor(weight, dtype=torch.float64), CUT: torch.tensor(float(seed % 2), dtype=torch.float64),
    }


def secure_sum(inputs: list[dict[str, torch.Tensor]], quantizer: Quantizer) -> dict[str, torch.Tensor]:
    """What the protocol's server unmasks: each input encoded by the round's layout, the integers
    summed mod 2**32 (the masks cancel in that sum), then decoded."""
    layout = summed_layout(SHAPES)
    total = sum(layout.encode(tensors, quantizer, len(inputs)).astype(np.uint64) for tensors in inputs) % 2**32
    return layout.decode_sum(total.astype(np.uint32), len(inputs), quantizer)


@pytest.mark.parametrize(("clip_range", "bits", "sites"), [(1e4, 24, 256), (64.0, 24, 100), (2.0, 16, 8)])
def test_counts_and_weights_far_above_the_clip_range_sum_through_the_secure_sums_encoding(clip_range, bits, sites):
    quantizer = Quantizer(clip_range, bits)
    rng = np.random.default_rng(sites)
    examples = [int(e) for e in rng.integers(1, 50_000, sites)]  # up to 5x the default range
    tokens = [int(t) for t in rng.integers(1, 2**32 // (2 * sites), sites)]
    losses = rng.uniform(0.5, 12.0, sites)
    inputs = [with_totals(upload(float(e) + 0.375, k), e, t, float(l), k % 3 == 0) for k, (e, t, l) in enumerate(zip(examples, tokens, losses))]
    summed, totals = read_totals(secure_sum(inputs, quantizer))
    assert totals["examples"] == sum(examples) and totals["train_tokens"] == sum(tokens)  # exact
    assert totals["sites_clipped"] == sum(k % 3 == 0 for k in range(sites)) and summed[CUT].item() == sum(k % 2 for k in range(sites))
    weight = math.fsum(e + 0.375 for e in examples)
    assert abs(summed[WEIGHT].item() - weight) <= quantizer.bound(sites)
    expected_loss = math.fsum(l * (e + 0.375) for e, l in zip(examples, losses)) / weight
    assert abs(totals["train_loss"] - expected_loss) <= 2 * quantizer.bound(sites) / weight * max(1.0, expected_loss)
    # Before, the weight went in as one quantised value: any site of more examples than the range failed.
    big = max(examples)
    if big > clip_range:
        with pytest.raises(ValueError):
            quantizer.encode(np.array([float(big)]))


def test_a_site_upload_round_trips_to_the_sketches_and_its_own_totals():
    site = upload(12.0, 1)
    summed, totals = read_totals(with_totals(site, 12, 340, 2.5, clipped=False))
    assert summed.keys() == site.keys() and all(torch.equal(summed[key], site[key].double()) for key in ("q:range", WEIGHT, CUT))
    assert totals == {"examples": 12, "train_tokens": 340, "train_loss": 2.5, "sites_clipped": 0}


@pytest.mark.parametrize(
    ("weight", "loss", "message"),
    [(12.0, float("nan"), "total:weighted-train-loss nan is not a non-negative number"), (-1.0, 2.0, "weight -1.0 is not a non-negative number")],
)
def test_what_the_totals_cannot_carry_is_refused_in_one_line_naming_it(weight, loss, message):
    with pytest.raises(ValueError, match=f"^{message} that the secure sum can carry$"):
        with_totals(upload(weight, 0), 12, 340, loss, clipped=False)


def test_a_count_beyond_what_a_sum_of_k_sites_holds_is_refused_naming_it():
    inputs = [with_totals(upload(1.0, k), 2**32 // 3, 10, 1.0, clipped=False) for k in range(4)]
    with pytest.raises(ValueError, match=rf"^count {EXAMPLES} is not an integer in \[0, {(2**32 - 1) // 4}\], which a secure sum of 4 inputs holds exactly$"):
        secure_sum(inputs, Quantizer(64.0, 24))
    assert TRAIN_TOKENS in summed_layout(SHAPES).counts
