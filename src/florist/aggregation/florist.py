"""FLoRIST: SVD of the stacked adapters in the R x R intermediate space, energy-thresholded rank."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

from torch import Tensor

from florist.aggregation.base import Aggregator, ModuleBatch
from florist.aggregation.budget import CRITERIA, allocate_ranks, check_budget, component_bytes
from florist.aggregation.spectral import ROUTES, RankRule, energy_rank
from florist.aggregation.stream import StreamingAccumulator
from florist.aggregation.truncation import cut
from florist.aggregation.types import Aggregate, AggregationError, ClientAdapter, GlobalModule, relative_bound

DEFAULT_TAU = 0.9
RESOLVED_SHARE = 0.1
"""How finely the route resolves the energy share, as a share of what tau's cut drops."""


@dataclass(frozen=True)
class FLoRIST(Aggregator):
    """tau in (0, 1]: share of spectral energy kept per module; max_rank caps any module's rank.

    `download_budget_mb`, instead of tau: what one client downloads per round (MiB), spent on ranks
    across all modules at once, at least `min_rank` each, in the order of `budget_criterion`
    (aggregation/budget.py). It counts `fixed_download_bytes` whatever the ranks, and per component
    of an m x n module (m + n) * `wire_bytes` plus `component_overhead_bytes`: the caller states
    what its medium costs (federation/payload.py, `update_cost`). Give tau or a budget, not both;
    with neither, tau is DEFAULT_TAU.

    `memory_budget_mb` bounds what `accumulator()` holds of a round (aggregation/stream.py):
    within it, and while the stacks are narrower than the layers, the result is exact;
    `aggregate` always is, holding every client it is given.
    """

    tau: float | None = None
    max_rank: int | None = None
    route: str = "gram"
    memory_budget_mb: float = 1024.0
    download_budget_mb: float | None = None
    budget_criterion: str = "per-byte"
    min_rank: int = 1
    wire_bytes: int = 4
    component_overhead_bytes: int = 0
    fixed_download_bytes: int = 0

    name = "florist"
    continues_from_global = False

    def __post_init__(self) -> None:
        if self.tau is not None and self.download_budget_mb is not None:
            raise AggregationError(f"give tau or download_budget_mb, not both (got tau {self.tau} and {self.download_budget_mb} MiB)")
        if self.tau is None and self.download_budget_mb is None:
            object.__setattr__(self, "tau", DEFAULT_TAU)
        if self.tau is not None and not 0 < self.tau <= 1:
            raise AggregationError(f"tau must be in (0, 1], got {self.tau}")
        if self.download_budget_mb is not None and not (math.isfinite(self.download_budget_mb) and self.download_budget_mb > 0):
            raise AggregationError(f"download_budget_mb must be a positive number, got {self.download_budget_mb}")
        if self.budget_criterion not in CRITERIA:
            raise AggregationError(f"unknown budget criterion {self.budget_criterion!r}; choose from {', '.join(CRITERIA)}")
        if self.min_rank < 1:
            raise AggregationError(f"min_rank must be >= 1, got {self.min_rank}")
        if self.wire_bytes not in (1, 2, 4, 8):
            raise AggregationError(f"wire_bytes must be 1, 2, 4 or 8, got {self.wire_bytes}")
        for key in ("component_overhead_bytes", "fixed_download_bytes"):
            if getattr(self, key) < 0:
                raise AggregationError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_rank is not None and self.max_rank < 1:
            raise AggregationError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.route not in ROUTES:
            raise AggregationError(f"unknown decomposition route {self.route!r}; choose from {sorted(ROUTES)}")
        if not (math.isfinite(self.memory_budget_mb) and self.memory_budget_mb > 0):
            raise AggregationError(f"memory_budget_mb must be a positive number, got {self.memory_budget_mb}")

    def accumulator(self) -> StreamingAccumulator:
        return StreamingAccumulator(self)

    # -- the rank rules ------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int | None:
        return None if self.download_budget_mb is None else int(self.download_budget_mb * 2**20)

    def component_bytes(self, shape: tuple[int, int]) -> int:
        """Bytes one kept component of a module of this shape adds to the download."""
        return component_bytes(shape, self.wire_bytes, self.component_overhead_bytes)

    def affordable(self, shape: tuple[int, int]) -> int:
        """The most components of a module of this shape that the whole download budget buys."""
        return max(self.min_rank, (self.budget_bytes - self.fixed_download_bytes) // self.component_bytes(shape))

    def check_budget(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Refuse a download budget below what min_rank in every module of these shapes costs."""
        costs = {name: self.component_bytes(shape) for name, shape in shapes.items()}
        check_budget(self.budget_bytes, costs, self.min_rank, self.fixed_download_bytes)

    @property
    def tolerance(self) -> float:
        """The share of each module's energy its route may leave unresolved (aggregation/spectral.py):
        a tenth of what tau's cut drops, so the rank meets tau on the true spectrum to within that;
        none at tau = 1 or with a budget, which may buy any component."""
        return 0.0 if self.tau is None else (1.0 - self.tau) * RESOLVED_SHARE

    def rank_rule(self, shape: tuple[int, int]) -> RankRule:
        """Per module: tau's rank; with a budget, every resolved component it could buy (at least
        min_rank), to be cut by `spend_budget` once every module's spectrum is known."""
        if self.budget_bytes is None:
            return partial(energy_rank, tau=self.tau, max_rank=self.max_rank)
        cap = min(self.affordable(shape), self.max_rank or self.affordable(shape))

        def rule(s: Tensor) -> Tensor:
            return energy_rank(s, 1.0).clamp(min=min(self.min_rank, s.shape[-1]), max=cap)

        return rule

    def spend_budget(self, modules: Mapping[str, GlobalModule]) -> dict[str, GlobalModule]:
        """Cut every module to the rank `allocate_ranks` gives it; without a budget, as they are."""
        if self.budget_bytes is None:
            return dict(modules)
        shapes = {name: (m.B.shape[0], m.A.shape[1]) for name, m in modules.items()}
        ranks = allocate_ranks(
            {name: m.singular_values for name, m in modules.items()},
            {name: self.component_bytes(shape) for name, shape in shapes.items()},
            self.budget_bytes,
            self.fixed_download_bytes,
            self.budget_criterion,
            self.min_rank,
            self.max_rank,
        )
        return cut(modules, ranks)

    # -- the exact route -----------------------------------------------------------------------

    def aggregate(self, clients: Sequence[ClientAdapter]) -> Aggregate:
        result = super().aggregate(clients)
        return replace(result, modules=self.spend_budget(result.modules))

    def combine(self, batch: ModuleBatch):
        b_stack, a_stack = batch.stacked()
        factored = ROUTES[self.route](b_stack, a_stack, self.rank_rule(batch.shape), tolerance=self.tolerance)
        modules = {
            name: batch.module(
                g,
                factored.left[g, :, :p],
                factored.right[g, :p],
                singular_values=factored.singular_values[g],
                error_bound=relative_bound(factored.unresolved[g], factored.singular_values[g]),
            )
            for g, (name, p) in enumerate(zip(batch.names, factored.ranks.tolist()))
        }
        return modules, None
