"""Which nodes take part in a round, and waiting (boundedly) for enough of them to connect."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from flwr.serverapp import Grid

from florist.config import FederationConfig


class NotEnoughNodes(RuntimeError):
    pass


def wait_for_nodes(
    grid: Grid, wanted: int, enough: int, timeout: float, poll: float = 1.0, log: Callable[[str], None] = print
) -> list[int]:
    """The connected node ids once `wanted` are connected, or at the timeout when at least
    `enough` are; stops with a message when fewer than `enough` connected in `timeout` seconds."""
    deadline = time.monotonic() + timeout
    announced = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() >= deadline:
            if len(nodes) >= enough:
                log(f"{len(nodes)} of {wanted} nodes connected after {timeout:g} s: going on with them")
                return nodes
            raise NotEnoughNodes(
                f"only {len(nodes)} nodes connected within federation.connect_timeout = {timeout:g} s, "
                f"fewer than the {enough} a round needs (its quorum, at least federation.min_sites); "
                "start more SuperNodes or lower the quorum"
            )
        if len(nodes) != announced:
            log(f"waiting for nodes: {len(nodes)} of {wanted} connected")
            announced = len(nodes)
        time.sleep(poll)


def sample(nodes: Sequence[int], size: int, seed: int, server_round: int) -> list[int]:
    """`size` of `nodes`, drawn from a generator seeded by (seed, round) alone: a resumed run
    draws what the uninterrupted one drew, given the same node ids (deployment keeps them)."""
    ordered = sorted(nodes)
    if size >= len(ordered):
        return ordered
    return sorted(random.Random(f"{seed}:{server_round}").sample(ordered, size))


def nodes_for_round(
    grid: Grid, federation: FederationConfig, seed: int, server_round: int, first: bool, log: Callable[[str], None] = print
) -> list[int]:
    """The round's sample. The first round waits up to federation.connect_timeout for every site
    to join; later rounds go on at once with the nodes still connected when they are a quorum,
    so that a site that dropped out does not stall the federation."""
    wanted, enough = federation.sample_size, federation.quorum(federation.sample_size)
    connected = wait_for_nodes(grid, wanted if first else enough, enough, federation.connect_timeout, log=log)
    return sample(connected, min(wanted, len(connected)), seed, server_round)
