"""FLoRIST: SVD of the stacked adapters in the R x R intermediate space, energy-thresholded rank."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from florist.aggregation.base import Aggregator, ModuleBatch
from florist.aggregation.spectral import ROUTES, energy_rank, gram_precision
from florist.aggregation.stream import StreamingAccumulator
from florist.aggregation.types import AggregationError


@dataclass(frozen=True)
class FLoRIST(Aggregator):
    """tau in (0, 1]: share of spectral energy kept per module; max_rank caps any module's rank.

    `memory_budget_mb` bounds what `accumulator()` holds of a round (see aggregation/stream.py):
    within it, and while the stacks are narrower than the layers, the result is exact;
    `aggregate` always is, holding every client it is given.
    """

    tau: float = 0.9
    max_rank: int | None = None
    route: str = "gram"
    memory_budget_mb: float = 1024.0

    name = "florist"
    continues_from_global = False

    def __post_init__(self) -> None:
        if not 0 < self.tau <= 1:
            raise AggregationError(f"tau must be in (0, 1], got {self.tau}")
        if self.max_rank is not None and self.max_rank < 1:
            raise AggregationError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.route not in ROUTES:
            raise AggregationError(f"unknown decomposition route {self.route!r}; choose from {sorted(ROUTES)}")
        if not (math.isfinite(self.memory_budget_mb) and self.memory_budget_mb > 0):
            raise AggregationError(f"memory_budget_mb must be a positive number, got {self.memory_budget_mb}")

    def accumulator(self) -> StreamingAccumulator:
        return StreamingAccumulator(self)

    def combine(self, batch: ModuleBatch):
        b_stack, a_stack = batch.stacked()
        # Below max(m, n) eps of the largest singular value a component is rounding noise of dW
        # in the compute dtype (torch.linalg.matrix_rank's floor): tau = 1 keeps the numerical rank.
        rtol = max(batch.shape) * torch.finfo(batch.compute_dtype).eps
        rule = partial(energy_rank, tau=self.tau, max_rank=self.max_rank, rtol=rtol)
        route = ROUTES[self.route]
        if self.route == "gram":
            route = partial(route, precision=gram_precision(sum(batch.ranks), self.tau, batch.compute_dtype))
        b_global, a_global, s, ranks = route(b_stack, a_stack, rule)
        modules = {
            name: batch.module(g, b_global[g, :, :p], a_global[g, :p], singular_values=s[g])
            for g, (name, p) in enumerate(zip(batch.names, ranks.tolist()))
        }
        return modules, None
