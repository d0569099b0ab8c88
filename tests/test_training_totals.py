"""A secure site's training totals as fixed-point digits (federation/training_totals.py): summed
through the secure sum's own quantiser, counts come back exact and fractions to 2**-20 a site, for
values far beyond privacy.secure_clip_range; what cannot be carried is refused in one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from florist.aggregation.sketch import WEIGHT
from florist.config import load_config
from florist.federation.secure_site import check_range
from florist.federation.secure_sum import Quantizer
from florist.federation.training_totals import (
    EXAMPLES,
    FRACTION_BITS,
    TRAIN_TOKENS,
    WEIGHTED_LOSS,
    FixedPoint,
    read_totals,
    summed_shapes,
    with_totals,
)

SECURE = ['aggregation.method="florist-secure"', "privacy.secure_aggregation=true", "federation.num_clients=3", "federation.ranks=[4]"]


def secure_sum(vectors: list[np.ndarray], quantizer: Quantizer) -> np.ndarray:
    """The dequantised sum the protocol's server gets: each site's vector quantised (stochastic
    rounding), the integers summed mod 2**32 (the masks cancel in that sum), then decoded."""
    total = sum(quantizer.encode(vector).astype(np.uint64) for vector in vectors) % 2**32
    return quantizer.decode_sum(total.astype(np.uint32), len(vectors))


@pytest.mark.parametrize(("clip_range", "bits", "sites"), [(1e4, 24, 256), (64.0, 24, 100), (2.0, 16, 8)])
def test_counts_far_above_the_clip_range_sum_exactly_through_the_quantiser(clip_range, bits, sites):
    """At the most sites whose quantised sum stays within 1/2 (the configuration's check), among them
    the default range and bits at the most sites 24 bits allow."""
    quantizer = Quantizer(clip_range, bits)
    assert sites <= quantizer.most_inputs() and quantizer.bound(sites) < 0.5
    fixed_point = FixedPoint.of(load_config(None, [*SECURE, f"privacy.secure_clip_range={clip_range}", f"privacy.secure_bits={bits}"]).privacy)
    rng = np.random.default_rng(7)
    counts = [int(n) for n in rng.integers(0, 2**40, sites)]
    losses = [float(x) for x in rng.uniform(0, 1e9, sites)]
    for key, values, places in ((EXAMPLES, counts, 0), (WEIGHTED_LOSS, losses, FRACTION_BITS)):
        vectors = [fixed_point.split(key, value, places).numpy() for value in values]
        assert max(float(np.abs(v).max()) for v in vectors) <= clip_range
        summed = fixed_point.join(torch.from_numpy(secure_sum(vectors, quantizer)), places)
        if places == 0:
            assert summed == sum(values)
        else:
            assert abs(summed - math.fsum(values)) <= sites * 2**-FRACTION_BITS
        # Not exact before rounding: the quantiser moves each digit's sum off its integer.
        assert np.abs(secure_sum(vectors, quantizer) - sum(vectors)).max() > 0


def test_a_site_weight_above_the_clip_range_was_refused_and_now_sums_exactly():
    """Before, the weight went into the secure sum as one value: a site of 20,000 examples at the
    default secure_clip_range of 1e4 failed its round. As digits, its weight and examples sum exactly."""
    config = load_config(None, SECURE)
    fixed_point = FixedPoint.of(config.privacy)
    upload = {WEIGHT: torch.tensor(20_000.0, dtype=torch.float64), "q:range": torch.full((3, 2), 0.5)}
    with pytest.raises(ValueError, match=r"^upload weight: a value of magnitude 20000 is outside the secure sum's range of ±10000 \(privacy.secure_clip_range\)$"):
        check_range(config, upload)
    summed = with_totals(upload, fixed_point, examples=20_000, tokens=3_000_000, loss=2.5, clipped=False)
    check_range(config, summed)
    assert set(summed) == set(summed_shapes({WEIGHT: (), "q:range": (3, 2)}, fixed_point))
    two = {key: summed[key].double() * 2 for key in summed}  # two such sites, summed in the clear
    taken, totals = read_totals(two, fixed_point)
    assert taken[WEIGHT].item() == 40_000.0 and torch.equal(taken["q:range"], torch.full((3, 2), 1.0, dtype=torch.float64))
    assert totals == {"examples": 40_000, "train_tokens": 6_000_000, "train_loss": 2.5, "sites_clipped": 0}


@pytest.mark.parametrize(
    ("key", "value", "places", "message"),
    [
        (TRAIN_TOKENS, -1, 0, "total:train-tokens -1 is not a number in [0, 2**64) that the secure sum can carry"),
        (WEIGHTED_LOSS, float("nan"), FRACTION_BITS, "total:weighted-train-loss nan is not a number in [0, 2**44) that the secure sum can carry"),
        (WEIGHTED_LOSS, 2.0**44, FRACTION_BITS, "total:weighted-train-loss 17592186044416.0 is not a number in [0, 2**44) that the secure sum can carry"),
    ],
)
def test_what_the_digits_cannot_carry_is_refused_in_one_line(key, value, places, message):
    with pytest.raises(ValueError) as error:
        FixedPoint(13).split(key, value, places)
    assert str(error.value) == message


def test_the_largest_values_round_trip():
    fixed_point = FixedPoint(13)
    for value, places in ((2**64 - 1, 0), (2.0**44 - 2**-8, FRACTION_BITS), (0, 0), (10.75, FRACTION_BITS)):
        assert fixed_point.join(fixed_point.split("v", value, places), places) == value
