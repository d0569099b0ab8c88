"""The round's norm screen, judged as replies arrive."""

from __future__ import annotations

from florist.federation.validation import NormScreen


def test_the_first_updates_are_held_and_judged_against_their_own_median():
    screen = NormScreen(factor=10)
    assert screen.offer(1, 1.0) == ([], {})
    assert screen.offer(2, 500.0) == ([], {})
    admitted, rejected = screen.offer(3, 2.0)
    assert admitted == [1, 3] and list(rejected) == [2]
    assert "500 is more than 10x the round's median 2" in rejected[2]


def test_later_updates_are_judged_on_arrival_against_the_median_admitted_so_far():
    screen = NormScreen(factor=10)
    for node, norm in enumerate([1.0, 2.0, 3.0, 4.0]):
        screen.offer(node, norm)
    assert screen.offer(10, 25.0) == ([10], {})  # median of 1..4 is 2.5
    admitted, rejected = screen.offer(11, 31.0)  # median of 1, 2, 3, 4, 25 is 3
    assert admitted == [] and list(rejected) == [11]
    assert screen.offer(12, float("nan"))[1]


def test_a_round_too_small_to_judge_admits_what_it_holds():
    screen = NormScreen(factor=10)
    screen.offer(1, 1.0)
    screen.offer(2, 1000.0)
    assert screen.flush() == [1, 2]
    assert screen.flush() == []
