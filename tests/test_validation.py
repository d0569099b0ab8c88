"""The round's norm screen, judged as replies arrive."""

from __future__ import annotations

import math

import torch

from florist.aggregation import ClientAdapter, LoraFactors
from florist.federation.validation import NormScreen, screened_norms


def norms(update: float, dense: float = 0.0) -> dict[str, float]:
    return {"update": update, "tensors trained in full": dense}


def test_the_first_updates_are_held_and_judged_against_their_own_median():
    screen = NormScreen(factor=10)
    assert screen.offer(1, norms(1.0)) == ([], {})
    assert screen.offer(2, norms(500.0)) == ([], {})
    admitted, rejected = screen.offer(3, norms(2.0))
    assert admitted == [1, 3] and list(rejected) == [2]
    assert "update norm 500 is more than 10x the round's median 2" in rejected[2]


def test_later_updates_are_judged_on_arrival_against_the_median_admitted_so_far():
    screen = NormScreen(factor=10)
    for node, norm in enumerate([1.0, 2.0, 3.0, 4.0]):
        screen.offer(node, norms(norm))
    assert screen.offer(10, norms(25.0)) == ([10], {})  # median of 1..4 is 2.5
    admitted, rejected = screen.offer(11, norms(31.0))  # median of 1, 2, 3, 4, 25 is 3
    assert admitted == [] and list(rejected) == [11]
    assert screen.offer(12, norms(float("nan")))[1]


def test_each_norm_is_judged_against_its_own_median():
    """A head's norm dwarfs any LoRA update's: pooled, a blown-up update would hide under it."""
    screen = NormScreen(factor=10)
    for node, update in enumerate([0.01, 0.1, 1.0]):
        screen.offer(node, norms(update, dense=300.0 + node))
    admitted, rejected = screen.offer(10, norms(0.5, dense=301.0 * 11))
    assert admitted == [] and "tensors trained in full norm 3311 is more than 10x the round's median 301" in rejected[10]
    admitted, rejected = screen.offer(11, norms(2.0, dense=299.0))  # update 2.0: 20x the median 0.1
    assert admitted == [] and rejected[11].startswith("update norm 2 is more than 10x")
    assert screen.offer(12, norms(0.9, dense=2999.0)) == ([12], {})


def test_a_round_too_small_to_judge_admits_what_it_holds():
    screen = NormScreen(factor=10)
    screen.offer(1, norms(1.0))
    screen.offer(2, norms(1000.0))
    assert screen.flush() == [1, 2]
    assert screen.flush() == []


def test_the_screened_norms_are_the_update_and_the_tensors_trained_in_full():
    generator = torch.Generator().manual_seed(3)
    b, a = torch.randn(12, 3, generator=generator) * 1e-3, torch.randn(3, 20, generator=generator) * 1e2
    head, bias = torch.randn(40, 8, generator=generator), torch.randn(12, generator=generator) * 1e-4
    adapter = ClientAdapter({"q": LoraFactors(A=a, B=b, scale=2.5)}, 5.0, {"lm_head.weight": head, "q.bias": bias})
    screened = screened_norms(adapter, {})
    assert math.isclose(screened["update"], torch.linalg.matrix_norm(2.5 * b.double() @ a.double()).item(), rel_tol=1e-9)
    expected = math.hypot(torch.linalg.vector_norm(head.double()).item(), torch.linalg.vector_norm(bias.double()).item())
    assert math.isclose(screened["tensors trained in full"], expected, rel_tol=1e-12)
    assert screened_norms(ClientAdapter(adapter.modules, 5.0), {})["tensors trained in full"] == 0.0
    # From round 2 the nodes started from known values: the norm is of the change from them.
    start = {"lm_head.weight": head - 1e-3, "q.bias": bias}
    assert math.isclose(screened_norms(adapter, start)["tensors trained in full"], 1e-3 * math.sqrt(head.numel()), rel_tol=1e-3)
