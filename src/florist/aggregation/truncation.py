"""Smaller updates: a client's own before upload, and an aggregate cut at another energy share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial

from florist.aggregation.spectral import energy_rank, qr_route
from florist.aggregation.types import AggregationError, GlobalModule, LoraFactors


def truncate_update(factors: LoraFactors, tau: float) -> LoraFactors:
    """The smallest-rank (B', A') with B' A' = the best approximation of s B A that keeps a share
    `tau` of its spectral energy (scale 1). At tau = 1 it is exact, of the update's numerical rank.

    Computed in float64 on the client's own r x r core: cheap, and no rounding of its own.
    """
    if not 0 < tau <= 1:
        raise AggregationError(f"client-side tau must be in (0, 1], got {tau}")
    b, a = factors.B.double()[None], (factors.A.double() * factors.scale)[None]
    factored = qr_route(b, a, partial(energy_rank, tau=tau))
    rank = int(factored.ranks[0])
    dtype = factors.A.dtype
    return LoraFactors(A=factored.right[0, :rank].to(dtype).contiguous(), B=factored.left[0, :, :rank].to(dtype).contiguous(), scale=1.0)


def cut_ranks(modules: Mapping[str, GlobalModule], tau: float, max_rank: int | None = None) -> dict[str, int]:
    """Each module's rank at energy share `tau`, from the whole spectrum the aggregate carries."""
    ranks = {}
    for name, module in modules.items():
        if module.singular_values is None:
            raise AggregationError("cutting at a tau needs the aggregate's singular values", module=name)
        ranks[name] = min(int(energy_rank(module.singular_values[None], tau, max_rank)[0]), module.rank)
    return ranks


def cut(modules: Mapping[str, GlobalModule], ranks: Mapping[str, int]) -> dict[str, GlobalModule]:
    """The leading `ranks[name]` components of each module (FLoRIST's are ordered by singular value)."""
    return {
        name: replace(module, A=module.A[: ranks[name]].contiguous(), B=module.B[:, : ranks[name]].contiguous())
        for name, module in modules.items()
    }
