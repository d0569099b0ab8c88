"""A client's own update made smaller before upload: an exact lower-rank decomposition of s B A."""

from __future__ import annotations

from functools import partial


from florist.aggregation.spectral import energy_rank, qr_route
from florist.aggregation.types import AggregationError, LoraFactors


def truncate_update(factors: LoraFactors, tau: float) -> LoraFactors:
    """The smallest-rank (B', A') with B' A' = the best approximation of s B A that keeps a share
    `tau` of its spectral energy (scale 1). At tau = 1 it is exact, of the update's numerical rank.

    Computed in float64 on the client's own r x r core: cheap, and no rounding of its own.
    """
    if not 0 < tau <= 1:
        raise AggregationError(f"client-side tau must be in (0, 1], got {tau}")
    b, a = factors.B.double()[None], (factors.A.double() * factors.scale)[None]
    b_kept, a_kept, _, ranks = qr_route(b, a, partial(energy_rank, tau=tau))
    rank = int(ranks[0])
    dtype = factors.A.dtype
    return LoraFactors(A=a_kept[0, :rank].to(dtype).contiguous(), B=b_kept[0, :, :rank].to(dtype).contiguous(), scale=1.0)
