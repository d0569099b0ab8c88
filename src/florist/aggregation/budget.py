"""A download budget instead of tau: FLoRIST's ranks chosen across all modules at once.

A client downloads a fixed number of bytes whatever the ranks (on the wire: array headers and keys,
the tensors trained in full, the records around them) plus, per component kept of a module, a cost
of its own (on the wire: (m + n) values in the wire format, and int8's row scales). The caller
states both (federation/payload.py measures the wire's). Given a budget in bytes, `allocate_ranks`
gives every module its minimum rank, then takes components in the order of a criterion, each if
its module's next component still fits the budget:

- `normalized`: sigma_i^2 over its module's total energy, so every module counts alike (the
  closest to one tau everywhere);
- `absolute`: sigma_i^2 itself, so modules with larger updates get more rank;
- `per-byte`: the normalized energy divided by the bytes one component of its module costs,
  since (m + n) differs between q_proj and v_proj.

`per-byte` is the default: in the comparison at scale (BENCHMARKS.md, "Comparison at scale") it kept
the lowest validation and test loss at 5 MiB in each of three seeds, by 0.0001-0.0003 nats over
`normalized` and 0.001 over `absolute`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from florist.aggregation.types import AggregationError

CRITERIA = ("normalized", "absolute", "per-byte")


def component_bytes(shape: tuple[int, int], value_bytes: int, overhead_bytes: int = 0) -> int:
    """Bytes one kept component of an m x n module adds to a client's download: a column of B and a
    row of A at `value_bytes` a value, and `overhead_bytes` beside them."""
    return sum(shape) * value_bytes + overhead_bytes


def minimum_download_bytes(costs: Mapping[str, int], min_rank: int, fixed_bytes: int = 0) -> int:
    """Bytes a client downloads when every module is at `min_rank` (`costs`: each module's bytes per
    component): the smallest possible budget."""
    return fixed_bytes + sum(cost * min_rank for cost in costs.values())


def check_budget(budget_bytes: int, costs: Mapping[str, int], min_rank: int, fixed_bytes: int = 0) -> None:
    needed = minimum_download_bytes(costs, min_rank, fixed_bytes)
    if budget_bytes < needed:
        raise AggregationError(
            f"download budget of {budget_bytes / 2**20:.4g} MiB ({budget_bytes:,} bytes) is below the "
            f"{needed / 2**20:.4g} MiB ({needed:,} bytes) that rank {min_rank} in each of {len(costs)} modules needs"
            + (f" ({fixed_bytes:,} of them sent whatever the ranks)" if fixed_bytes else "")
        )


def allocate_ranks(
    spectra: Mapping[str, Tensor],
    costs: Mapping[str, int],
    budget_bytes: int,
    fixed_bytes: int = 0,
    criterion: str = "per-byte",
    min_rank: int = 1,
    max_rank: int | None = None,
) -> dict[str, int]:
    """The rank of every module: the most valuable components under `criterion` whose bytes fit.

    `spectra` are each module's singular values, descending, and `costs` its bytes per component
    (`component_bytes`); `fixed_bytes` of the budget are spent whatever the ranks. A zero singular
    value (a component the route could not tell from zero) is never bought; `min_rank` is given to
    every module whatever its spectrum (at most its length), `max_rank` caps any module.
    """
    if criterion not in CRITERIA:
        raise AggregationError(f"unknown budget criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    check_budget(budget_bytes, costs, min_rank, fixed_bytes)
    ranks, values, owners = {}, [], []
    for j, (name, s) in enumerate(spectra.items()):
        s = s.double()
        cap = len(s) if max_rank is None else min(len(s), max_rank)
        ranks[name] = min(min_rank, cap)
        usable = min(cap, int((s > 0).sum()))
        power = s[ranks[name] : usable].square()
        if criterion != "absolute":
            total = s.square().sum()
            power = power / total if total > 0 else torch.zeros_like(power)
        if criterion == "per-byte":
            power = power / costs[name]
        values.append(power)
        owners.append(torch.full((len(power),), j))
    remaining = budget_bytes - fixed_bytes - sum(costs[name] * rank for name, rank in ranks.items())
    names = list(spectra)
    if values:
        value, owner = torch.cat(values), torch.cat(owners).tolist()
        # Descending value, ties in module order (a stable sort of modules' values in order).
        # Within a module values never rise, so each module's components are bought in order.
        for i in torch.argsort(value, descending=True, stable=True).tolist():
            name = names[owner[i]]
            cost = costs[name]
            if cost <= remaining:
                ranks[name] += 1
                remaining -= cost
    return ranks
