"""The weight cap (validation.max_weight_share) in florist-secure, where the server must not read one
site's examples: the sites cap their own weights at a level the server sets from sums alone."""

from __future__ import annotations

import math


class WeightLevel:
    """validation.max_weight_share in florist-secure, without the server reading a site's examples.

    Plain rounds cut each claim n_k to min(n_k, c), c = weight_level(claims, share): the root of
    c = share * F(c), F(c) = sum_k min(n_k, c), concave and piecewise linear in c. Here the server
    sends a level c_r before the round and gets back two sums: the weight W = F(c_r) and the number
    m of sites cut (n_k > c_r). They give F's piece at c_r, P + m c with P = W - m c_r, and the next
    level is that line's root, a Newton step: c_{r+1} = share P / (1 - share m). F is concave, so
    with the same claims the step never goes below plain's level (no site is cut harder than plain
    cuts it) and lands on it by round d + 1, d the number of distinct claims (tests/test_secure.py).

    So secure equals plain (the same weights, hence the same aggregate from the same start) when the
    same sites, with the same examples, take part every round (full participation, no dropped
    reply), once the level has settled: typically from round 3. Round 1 has no sums yet and is not
    cut (c_1 = inf); round 2 is cut at share * round 1's summed examples, looser than plain's (one
    site of 1000 examples beside two of 100 holds 10/12 of round 1, 3/4 of round 2, 1/2 from round 3,
    as in plain). Where share * sites <= 1, plain weighs every site evenly and so does the level 1
    sent then (each weight min(n_k, 1) = 1), in every round. Where sites change between rounds, the
    level is last round's sites'. Under privacy.dp every site weighs 1 and no level is used.
    """

    def __init__(self, share: float):
        self.share = share
        self.level = math.inf

    def for_round(self, sites: int) -> float:
        return 1.0 if self.share * sites <= 1 else self.level

    def observe(self, sites: int, level: float, weight: float, cut: float) -> None:
        """The round's sums at the level it was sent: set the next round's level."""
        if self.share * sites <= 1:
            return
        below = weight - (cut * level if cut else 0.0)
        # share * cut >= 1 only below plain's level (claims grew): a plain fixed-point step, which rises.
        self.level = self.share * below / (1 - self.share * cut) if self.share * cut < 1 else self.share * weight


def capped_weight(examples: int, level: float) -> tuple[float, float]:
    """A site's weight at the round's level, and whether it was cut (1.0) or not (0.0)."""
    return (level, 1.0) if examples > level else (float(examples), 0.0)
