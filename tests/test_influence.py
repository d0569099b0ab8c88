"""How much one reply may move a round: the norm screen (reject, clip, near-zero), the weight cap,
and the bound they give together against colluding nodes (the README states it)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from florist.aggregation import ClientAdapter, LoraFactors
from florist.config import RunConfig
from florist.federation.influence import DENSE, UPDATE, NormScreen, WeightCap, clipped, screened_norms, weight_level
from florist.federation.strategy import LoraStrategy
from florist.federation.validation import MAX_VALUE

from test_strategy import base_norms, identity_for, reply


def norms(update: float, dense: float = 0.0) -> dict[str, float]:
    return {UPDATE: update, DENSE: dense}


UNCLIPPED = norms(1.0, 1.0)


# ------------------------------------------------------------------------------ the norm screen


def test_the_first_updates_are_held_and_judged_against_their_own_median():
    screen = NormScreen(factor=10, clip=10)
    assert screen.offer(1, norms(1.0)) == ({}, {})
    assert screen.offer(2, norms(500.0)) == ({}, {})
    admitted, rejected = screen.offer(3, norms(2.0))
    assert admitted == {1: UNCLIPPED, 3: UNCLIPPED} and list(rejected) == [2]
    assert "update norm 500 is more than 10x the round's median 2" in rejected[2]


def test_later_updates_are_judged_on_arrival_against_the_median_admitted_so_far():
    screen = NormScreen(factor=10, clip=10)
    for node, norm in enumerate([1.0, 2.0, 3.0, 4.0]):
        screen.offer(node, norms(norm))
    assert screen.offer(10, norms(25.0)) == ({10: UNCLIPPED}, {})  # median of 1..4 is 2.5
    admitted, rejected = screen.offer(11, norms(31.0))  # median of 1, 2, 3, 4, 25 is 3
    assert admitted == {} and list(rejected) == [11]
    assert screen.offer(12, norms(float("nan")))[1]


def test_each_norm_is_judged_against_its_own_median():
    """A head's norm dwarfs any LoRA update's: pooled, a blown-up update would hide under it."""
    screen = NormScreen(factor=10, clip=10)
    for node, update in enumerate([0.02, 0.1, 1.0]):
        screen.offer(node, norms(update, dense=300.0 + node))
    admitted, rejected = screen.offer(10, norms(0.5, dense=301.0 * 11))
    assert admitted == {} and "tensors trained in full norm 3311 is more than 10x the round's median 301" in rejected[10]
    admitted, rejected = screen.offer(11, norms(2.0, dense=299.0))  # update 2.0: 20x the median 0.1
    assert admitted == {} and rejected[11].startswith("update norm 2 is more than 10x")
    assert screen.offer(12, norms(0.9, dense=2999.0)) == ({12: UNCLIPPED}, {})


def test_a_round_too_small_to_judge_admits_what_it_holds_and_one_of_three_judges_them():
    screen = NormScreen(factor=10, clip=5)
    screen.offer(1, norms(1.0))
    screen.offer(2, norms(1000.0))
    assert screen.flush() == ({1: UNCLIPPED, 2: UNCLIPPED}, {})
    assert screen.flush() == ({}, {})
    # A reference of 5 that only 3 replies reached: the 3 are judged against their own medians.
    screen = NormScreen(factor=10, clip=5, reference=5)
    for node, norm in [(1, 1.0), (2, 2.0), (3, 1000.0)]:
        assert screen.offer(node, norms(norm)) == ({}, {})
    admitted, rejected = screen.flush()
    assert set(admitted) == {1, 2} and list(rejected) == [3]


@pytest.mark.parametrize("sampled", range(1, 301))
def test_the_reference_outnumbers_twice_any_minority_below_a_third_of_the_sample(sampled):
    minority = max(k for k in range(sampled) if 3 * k < sampled)  # fewer than a third: 3k < sampled
    reference = NormScreen.for_sample(10, 5, sampled).reference
    assert reference > 2 * minority  # the minority is fewer than half of it: the median is an honest norm's or between two
    assert reference == max(NormScreen.WARMUP, 2 * minority + 1)  # and no larger than that needs


def test_near_zero_updates_that_arrive_first_are_rejected_and_every_honest_one_admitted():
    """Issue 19: three zero-norm replies first set the old screen's median to 0, after which every
    honest reply was rejected. Here 3 of 10 sampled nodes send zero (or almost zero) updates first."""
    rng = random.Random(5)
    honest = {node: rng.uniform(1.0, 2.8) for node in range(3, 10)}  # the spread honest norms have (config.py)
    screen = NormScreen.for_sample(10, 5, sampled=10)
    admitted, rejected = {}, {}
    for node, norm in [(0, 0.0), (1, 1e-30), (2, 0.0), *honest.items()]:
        now_admitted, now_rejected = screen.offer(node, norms(norm))
        admitted |= now_admitted
        rejected |= now_rejected
    assert set(admitted) == set(honest) and set(rejected) == {0, 1, 2}
    assert all(clip == UNCLIPPED for clip in admitted.values())
    assert "update norm 1e-30 is less than 1/10 of the round's median" in rejected[1]


def test_an_inflated_update_is_clipped_to_the_clip_bound_and_counts_as_clipped_in_later_medians():
    screen = NormScreen(factor=10, clip=5)
    for node, norm in enumerate([1.0, 1.5, 2.0]):
        screen.offer(node, norms(norm))
    admitted, _ = screen.offer(10, norms(9.0))
    assert admitted[10][UPDATE] == pytest.approx(5 * 1.5 / 9.0) and admitted[10][DENSE] == 1.0
    assert screen.admitted[-1][UPDATE] == pytest.approx(7.5)  # as admitted, not as sent
    admitted, _ = screen.offer(11, norms(9.0))  # the median of 1, 1.5, 2, 7.5 is 1.75
    assert admitted[11][UPDATE] == pytest.approx(5 * 1.75 / 9.0)


def test_a_clip_scales_the_update_and_the_change_of_the_tensors_trained_in_full():
    generator = torch.Generator().manual_seed(11)
    factors = {
        "q": LoraFactors(A=torch.randn(3, 20, generator=generator) * 1e2, B=torch.randn(12, 3, generator=generator) * 1e-3, scale=2.5),
        "v": LoraFactors(A=torch.randn(5, 20, generator=generator), B=torch.randn(8, 5, generator=generator), scale=0.5),
    }
    head, start = torch.randn(40, 8, generator=generator), torch.randn(40, 8, generator=generator)
    adapter = ClientAdapter(factors, 7.0, {"lm_head.weight": head})
    clip = {UPDATE: 0.3, DENSE: 0.125}
    result = clipped(adapter, clip, {"lm_head.weight": start})
    assert result.weight == 7.0
    for name, original in factors.items():
        update = result.modules[name].scale * result.modules[name].B.double() @ result.modules[name].A.double()
        torch.testing.assert_close(update, 0.3 * original.scale * original.B.double() @ original.A.double(), rtol=1e-12, atol=0)
    expected = start.double() + 0.125 * (head.double() - start.double())
    torch.testing.assert_close(result.dense["lm_head.weight"].double(), expected, rtol=1e-6, atol=1e-6)
    norm = screened_norms(result, {"lm_head.weight": start})
    assert norm[UPDATE] == pytest.approx(0.3 * screened_norms(adapter, {})[UPDATE], rel=1e-9)
    # Round 1 (no start): what the screen measured, the tensor itself.
    torch.testing.assert_close(clipped(adapter, clip, {}).dense["lm_head.weight"], head * 0.125)
    assert clipped(adapter, {UPDATE: 1.0, DENSE: 1.0}, {}) == adapter


# ------------------------------------------------------------------------------ the weight cap


def level_by_bisection(claims: list[int], share: float) -> Fraction:
    """The largest c with c <= share * sum(min(n, c)), in exact arithmetic by bisection (not the
    sorted-root formula under test); max(claims) when none needs cutting."""
    share = Fraction(share)
    holds = lambda c: c <= share * sum(min(Fraction(n), c) for n in claims)  # noqa: E731
    low, high = Fraction(0), Fraction(max(claims))
    if holds(high):
        return high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if holds(middle) else (low, middle)
    return low


# Claims spread over six decades, as forged ones are; shares from a tenth to all (none a float just
# below 1 / N, where the exact level jumps from 0 to the smallest claim).
CLAIMS = st.lists(st.integers(1, 10**6), min_size=1, max_size=12)
SHARES = st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0])


@given(CLAIMS, SHARES)
def test_the_weight_level_is_the_largest_cut_that_keeps_every_share_below_the_cap(claims, share):
    level = weight_level(claims, share)
    expected = level_by_bisection(claims, share)
    if math.isinf(level):
        assert expected == max(claims) and max(claims) <= Fraction(share) * sum(claims)
    else:
        assert level == pytest.approx(float(expected), rel=1e-9, abs=1e-9)
        weights = [min(n, level) for n in claims]
        assert level == 0 or max(weights) / sum(weights) <= share * (1 + 1e-12)


def test_one_node_claiming_a_million_against_seven_honest_500s_holds_the_cap():
    """Issue 19's example: uncapped, it held 1e6 / (1e6 + 3500) = 99.65% of the round."""
    claims = {0: 10**6, **{node: 500 for node in range(1, 8)}}
    for share, held in [(0.5, 0.5), (0.25, 0.25), (0.1, 1 / 8)]:  # 8 nodes cannot each hold below 1/8
        weights = run_cap(claims, share)
        assert weights[0] / sum(weights.values()) == pytest.approx(held)
        assert all(weights[node] == 500 for node in range(1, 8))


def run_cap(claims: dict[int, int], share: float) -> dict[int, float]:
    """The weights a WeightCap gives `claims` offered in this order; checks that what it releases
    early is never cut later (so the accumulator could take it)."""
    cap, weights = WeightCap(share), {}
    for node, claim in claims.items():
        released = cap.offer(node, claim)
        assert all(weight == claims[node] for node, weight in released.items())
        weights |= released
    weights |= cap.close()
    return weights


@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=9), SHARES, st.randoms(use_true_random=False))
def test_the_weights_do_not_depend_on_the_order_claims_arrive_in_and_keep_the_cap(claims, share, rng):
    ordered = dict(enumerate(claims))
    shuffled = list(ordered.items())
    rng.shuffle(shuffled)
    weights = run_cap(ordered, share)
    assert weights == run_cap(dict(shuffled), share)
    if share * len(claims) > 1:
        level = level_by_bisection(claims, share)
        for node, claim in ordered.items():
            assert weights[node] == pytest.approx(float(min(Fraction(claim), level)), rel=1e-9)
        assert max(weights.values()) / sum(weights.values()) <= share * (1 + 1e-12)
    else:  # no N <= 1 / share claims can each stay below share: an even split
        assert set(weights.values()) == {float(min(claims))}


def test_fewer_replies_than_one_over_the_share_are_split_evenly():
    assert run_cap({1: 40, 2: 900}, share=0.25) == {1: 40.0, 2: 40.0}
    assert run_cap({1: 40, 2: 900, 3: 70}, share=0.25) == {1: 40.0, 2: 40.0, 3: 40.0}
    assert run_cap({1: 40}, share=0.25) == {1: 40.0}


# ------------------------------------------------------- the bound against a colluding minority

SAMPLED = 10
COLLUDERS = 3  # fewer than a third of the sampled nodes
SHAPES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (16, 20)}
CLIP = 5.0


def honest_factors(generator: torch.Generator, rank: int, scale: float) -> dict[str, LoraFactors]:
    """Updates that share directions, as trained adapters do, at norms spread by `scale`."""
    factors = {}
    for name, (m, n) in SHAPES.items():
        left, right = torch.linspace(-1, 1, m)[:, None] * torch.ones(1, rank), torch.cos(torch.arange(n) * (1 + torch.arange(rank))[:, None])
        factors[name] = LoraFactors(A=right + 0.3 * torch.randn(rank, n, generator=generator), B=(left + 0.3 * torch.randn(m, rank, generator=generator)) * scale, scale=2.0)
    return factors


def update_of(factors: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    return {name: f.scale * f.B.double() @ f.A.double() for name, f in factors.items()}


def frobenius(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(torch.sum(t**2).item() for t in update.values()))


def mean_update(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {name: sum(w / total * u[name] for u, w in zip(updates, weights)) for name in SHAPES}


def zero(factors, honest_mean):
    return {name: LoraFactors(A=f.A, B=torch.zeros_like(f.B), scale=f.scale) for name, f in factors.items()}


def inflated(factors, honest_mean):
    """An honest-looking update 12x: past the clip, within the rejection factor, even against a
    median the colluders push up to the largest honest norm."""
    return {name: LoraFactors(A=f.A, B=f.B * 12, scale=f.scale) for name, f in factors.items()}


def reversed_(factors, honest_mean):
    """Against the honest consensus, as strong as `inflated`."""
    return {name: LoraFactors(A=f.A, B=f.B * -12, scale=f.scale) for name, f in factors.items()}


ATTACKS = {
    "zero": (zero, 500),
    "zero-forged": (zero, 10**6),
    "inflated-forged": (inflated, 10**6),
    "reversed-forged": (reversed_, 10**6),
    "reversed": (reversed_, 500),
}


@pytest.mark.usefixtures("server_task")
@pytest.mark.parametrize("share", [0.5, 0.1])
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_colluding_minority_replying_first_moves_the_update_by_at_most_the_stated_bound(attack, share):
    """3 of 10 sampled nodes reply first, each with the same attack: zero updates, updates inflated
    or reversed, with the honest 500 examples or a forged million. Every honest reply is admitted
    unclipped at its own weight, and the exact aggregate (FLoRIST at tau = 1) is within
    min(1, k share) (clip_factor h + ||D_H||) of D_H, the honest replies' aggregate, where h is the
    largest honest update's norm and k the number of colluders (README)."""
    config = RunConfig.model_validate(
        {
            "federation": {"num_clients": SAMPLED, "ranks": [4]},
            "aggregation": {"method": "florist", "tau": 1.0},
            "validation": {"clip_factor": CLIP, "max_weight_share": share},
        }
    )
    strategy = LoraStrategy(config, SHAPES, base_norms(SHAPES), identity_for(config))
    nodes = list(range(1, SAMPLED + 1))
    strategy.begin_round(1, nodes)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, nodes)}
    generator = torch.Generator().manual_seed(23)
    honest = {node: honest_factors(generator, rank=4, scale=1 + (node % 4) / 2) for node in nodes[COLLUDERS:]}  # norms 1x-2.5x
    honest_mean = mean_update([update_of(f) for f in honest.values()], [1.0] * len(honest))
    change, claim = ATTACKS[attack]
    for node in nodes:  # the colluders first
        partition = node - 1
        factors = honest[node] if node in honest else change(honest_factors(generator, 4, 1.5), honest_mean)
        examples = 500 if node in honest else claim
        message = reply(strategy, instructions[node], partition, factors)
        message.content["metrics"]["num-examples"] = examples
        strategy.receive_train(node, message)
    report = strategy.finish_round()

    clients = {c.node: c for c in report.clients}
    assert set(honest) <= set(clients)  # no honest reply rejected
    assert all(clients[node].weight == 500 and clients[node].clipped == {} for node in honest)
    [update] = strategy.chain.updates
    aggregate = {name: module.scale * module.B.double() @ module.A.double() for name, module in update.modules.items()}
    honest_aggregate = mean_update([update_of(f) for f in honest.values()], [500.0] * len(honest))
    largest = max(frobenius(update_of(f)) for f in honest.values())
    bound = min(1.0, COLLUDERS * share) * (CLIP * largest + frobenius(honest_aggregate))
    deviation = frobenius({name: aggregate[name] - honest_aggregate[name] for name in SHAPES})
    assert deviation <= bound
    # The colluders' share of the weight is within k * share, as the bound assumes, and each
    # mechanism the bound rests on did its part.
    colluders = {node: clients.get(node) for node in nodes if node not in honest}
    assert sum(c.weight for c in colluders.values() if c) <= COLLUDERS * share * sum(c.weight for c in clients.values()) * (1 + 1e-12)
    reasons = {e.node: e.reason for e in report.events if e.status == "rejected"}
    if change is zero:
        assert all("less than 1/10 of the round's median" in reasons[node] for node in colluders)
    else:
        assert all(c is not None and c.clipped[UPDATE] < 1 for c in colluders.values())
    if claim > 500 and share == 0.1:
        assert all(c is None or c.weight < claim for c in colluders.values())


def test_huge_but_finite_values_in_a_round_of_two_are_refused_before_they_reach_the_aggregate(server_task):
    """Issue 19: with fewer than three replies the screen judges none, and an update of huge finite
    values made FLoRIST's linalg.eigh fail in finish_round (the others refused it there, ending the
    round). Factors beyond float16's range, a scale no rank gives, and factors whose products
    cancel are each refused per reply; the round aggregates the honest one (min_sites 1 allows it)."""
    config = RunConfig.model_validate(
        {"federation": {"num_clients": 2, "ranks": [4], "min_sites": 1}, "aggregation": {"method": "florist", "tau": 1.0}}
    )
    generator = torch.Generator().manual_seed(3)
    honest = honest_factors(generator, 4, 1.0)

    def each_module(change):
        return {name: change(f) for name, f in honest_factors(generator, 4, 1.0).items()}

    def cancelling(f):
        """Two components +x y^T and -x y^T at 1e4: the update is the honest-looking rest."""
        huge_b, huge_a = torch.randn(f.B.shape[0], 1, generator=generator) * 1e4, torch.randn(1, f.A.shape[1], generator=generator) * 1e4
        return LoraFactors(A=torch.cat([f.A[:2], huge_a, huge_a]), B=torch.cat([f.B[:, :2], huge_b, -huge_b], dim=1), scale=f.scale)

    hostile = {
        "near float32's limit": (each_module(lambda f: LoraFactors(A=f.A, B=f.B * 1e37, scale=f.scale)), "beyond +-65504"),
        "beyond float16's range": (each_module(lambda f: LoraFactors(A=f.A, B=f.B * 1e5, scale=f.scale)), "beyond +-65504"),
        "huge scale": (each_module(lambda f: LoraFactors(A=f.A, B=f.B * 1e-30, scale=1e30)), "scale 1e+30 is outside (0, 2]"),
        "products that cancel": (each_module(cancelling), "(validation.max_relative_update)"),
    }
    assert MAX_VALUE == 65504
    for name, (factors, reason) in hostile.items():
        strategy = LoraStrategy(config, SHAPES, base_norms(SHAPES), identity_for(config))
        strategy.begin_round(1, [1, 2])
        instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, [1, 2])}
        strategy.receive_train(1, reply(strategy, instructions[1], 0, factors))
        strategy.receive_train(2, reply(strategy, instructions[2], 1, honest))
        report = strategy.finish_round()
        [event] = [e for e in report.events if e.node == 1]
        assert event.status == "rejected" and reason in event.reason, (name, event.reason)
        [update] = strategy.chain.updates
        expected = update_of(honest)
        for module, global_module in update.modules.items():
            torch.testing.assert_close(global_module.scale * global_module.B.double() @ global_module.A.double(), expected[module], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- partitions bound to nodes


@pytest.mark.usefixtures("server_task")
def test_a_partition_is_bound_to_the_node_that_first_delivered_it_across_rounds():
    config = RunConfig.model_validate({"federation": {"num_clients": 3, "ranks": [4]}, "aggregation": {"method": "florist"}})
    strategy = LoraStrategy(config, SHAPES, base_norms(SHAPES), identity_for(config))
    generator = torch.Generator().manual_seed(1)

    def play(server_round: int, claims: dict[int, int]):
        strategy.begin_round(server_round, list(claims))
        instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, list(claims))}
        for node, partition in claims.items():
            strategy.receive_train(node, reply(strategy, instructions[node], partition, honest_factors(generator, 4, 1.0)))
        return strategy.finish_round()

    play(1, {11: 0, 22: 1, 33: 2})
    assert strategy.partition_of == {11: 0, 22: 1, 33: 2}
    # Round 2: node 44 claims node 11's partition before node 11 replies; node 22 claims node 33's.
    report = play(2, {44: 0, 11: 0, 22: 2, 33: 2})
    events = {e.node: (e.status, e.reason) for e in report.events}
    assert events[44] == ("refused", "partition-id 0 is bound to node 11, which first delivered it")
    assert events[22] == ("refused", "partition-id 2, but node 22 is bound to partition 1, the one it first delivered")
    assert {c.node: c.partition for c in report.clients} == {11: 0, 33: 2}
    assert strategy.partition_of == {11: 0, 22: 1, 33: 2}
