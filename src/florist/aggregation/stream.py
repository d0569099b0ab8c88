"""FLoRIST over a stream of replies: exact while the round's stacks are small, else clients folded
into a running decomposition as they arrive, in memory bounded whatever the number of clients.

The rule (README, "Methods and round semantics"): the accumulator holds the clients' adapters,
and aggregates them with the exact batched route, while every module's stacked rank R (the sum
of the ranks held) stays within `exact_rank_limit`. The first client that would pass it switches
the round to folding: the clients held so far, then each one as it arrives, are folded in small
blocks into a running rank-c decomposition of sum_k n_k s_k B_k A_k (weights p_k = n_k / sum n
are known only at the end). A fold keeps, per module, four times the rank tau keeps of the running
sum (CARRY_FACTOR), at most `carried_rank_limit`; what it drops is summed into
`GlobalModule.error_bound`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from florist.aggregation.base import (
    Accumulator,
    check_client,
    chunk_size,
    compute_dtype,
)
from florist.aggregation.dense import check_dense
from florist.aggregation.spectral import energy_rank, fold_route
from florist.aggregation.types import (
    Aggregate,
    AggregationError,
    ClientAdapter,
    GlobalModule,
    check_total_weight,
    relative_bound,
    check_weight,
)

if TYPE_CHECKING:
    from florist.aggregation.florist import FLoRIST


# A fold keeps CARRY_FACTOR times the rank tau keeps of the running sum: a component weak among
# the clients folded so far may be lifted by later ones. With unrelated clients whose norms spread
# over two decades, 2 lost 13% in the final error at tau 0.9 (the first big client's tail was cut
# before the small ones made it matter), 4 lost nothing; on clients that share directions, as
# trained adapters do, both were exact (tests/test_aggregation.py checks the latter).
CARRY_FACTOR = 4


def exact_rank_limit(shape: tuple[int, int], bytes_per_rank: int, memory_budget: float) -> int:
    """The largest stacked rank R for which FLoRIST holds a module's clients and decomposes them
    exactly, rather than folding them into a running decomposition.

    Two bounds: the layer's width min(m, n), past which a stack has more columns than its update
    can have rank and the exact route's O((m + n) R^2 + R^3) nears a dense SVD's; and the memory
    budget, which the stacks of every module must fit (`bytes_per_rank`: one column of B plus one
    row of A, summed over all modules, in the compute dtype).
    """
    return max(1, min(min(shape), int(memory_budget // bytes_per_rank)))


def carried_rank_limit(shape: tuple[int, int], bytes_per_rank: int, memory_budget: float) -> int:
    """The most components a fold keeps of a module: half the budget's columns (the other half
    holds the clients waiting to be folded), and never more than the update can have, min(m, n)."""
    return max(1, min(min(shape), int(memory_budget // bytes_per_rank) // 2))


class StreamingAccumulator(Accumulator):
    """FLoRIST's accumulator: exact for small rounds, bounded memory and linear time for large ones.

    `add` validates a client fully before it stores anything, so a refused client (an
    AggregationError naming it by its position among the clients added) leaves the round as it
    was. Each fold costs O((m + n) W c) for a block W columns wide and c carried, so the round
    is linear in the number of clients.
    """

    aggregator: FLoRIST

    def __init__(self, aggregator: FLoRIST):
        super().__init__(aggregator)
        self.added = 0
        self.reference: tuple[int, ClientAdapter] | None = None
        self.total_weight = 0.0
        self.folding = False
        self.pending: list[ClientAdapter] = []
        self.chunks: list[tuple[tuple[int, int], list[str]]] | None = None
        self.carried: dict[int, tuple[Tensor, Tensor]] = {}  # per chunk: B (G x m x c), A (G x c x n)
        self.dropped: dict[str, float] = {}
        self.dense_sums: dict[str, Tensor] = {}

    # -- adding --------------------------------------------------------------------------------

    def add(self, client: ClientAdapter, key: float = 0.0) -> None:
        """Folding, once it starts, takes the clients in the order they come (see `Accumulator.add`)."""
        k, self.added = self.added, self.added + 1
        check_weight(float(client.weight), k)
        if self.reference is None:
            check_client(client, k)
            check_dense(client, k, client, k)
        else:
            check_client(client, k, self.reference[1], reference_index=self.reference[0])
            check_dense(client, k, self.reference[1], self.reference[0])
        if self.reference is None:
            self.reference = (k, client)
            self._plan(client)
        self.total_weight += float(client.weight)
        self._add_dense(client)
        if self.folding:
            self._queue(client)
            return
        self.clients.append(client)
        self.keys.append(key)
        if any(sum(c.modules[name].rank for c in self.clients) > self.exact_limit[name] for name in self.exact_limit):
            held, self.clients, self.keys, self.folding = self.held_in_order(), [], [], True
            for waiting in held:
                self._queue(waiting)

    def _plan(self, first: ClientAdapter) -> None:
        modules = first.modules
        self.dtype = compute_dtype({t.dtype for f in modules.values() for t in (f.A, f.B)})
        self.output_dtype = next(iter(modules.values())).A.dtype
        itemsize = torch.finfo(self.dtype).bits // 8
        bytes_per_rank = sum(sum(f.shape) * itemsize for f in modules.values())
        budget = self.aggregator.memory_budget_mb * 2**20
        self.exact_limit = {name: exact_rank_limit(f.shape, bytes_per_rank, budget) for name, f in modules.items()}
        self.carry_limit = {name: carried_rank_limit(f.shape, bytes_per_rank, budget) for name, f in modules.items()}
        self.groups: dict[tuple[int, int], list[str]] = {}
        for name, factors in modules.items():
            self.groups.setdefault(factors.shape, []).append(name)

    def _add_dense(self, client: ClientAdapter) -> None:
        """Running sums n_k T_k of the tensors trained in full (their weighted mean is linear)."""
        for name, tensor in client.dense.items():
            if name not in self.dense_sums:
                wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
                self.dense_sums[name] = torch.zeros(tensor.shape, dtype=wide)
            self.dense_sums[name].add_(tensor.to(self.dense_sums[name].dtype), alpha=float(client.weight))

    def _queue(self, client: ClientAdapter) -> None:
        """Fold once the clients waiting are as wide as what is carried: the cost per client of a
        fold W = c + b wide is about (m + n) W (1 + c / b), least at b = c."""
        self.pending.append(client)
        waiting = max(sum(c.modules[name].rank for c in self.pending) for name in self.carry_limit)
        carried = max((b.shape[-1] for b, _ in self.carried.values()), default=0)
        if waiting >= carried:
            self._fold(final=False)

    # -- folding -------------------------------------------------------------------------------

    def _fold(self, final: bool) -> dict[str, GlobalModule]:
        """Fold the pending clients into the carried decomposition, module chunk by module chunk;
        with `final`, cut every module by the aggregator's rule and return the global modules."""
        if self.chunks is None:
            # Fixed at the first fold, so each chunk's carried factors stay one batched tensor.
            # Sized for the carried columns plus about as many waiting (cache-sized, see base.py).
            self.chunks = []
            for shape, names in self.groups.items():
                width = 2 * max(sum(c.modules[name].rank for c in self.pending) for name in names)
                size = chunk_size(shape, width, self.dtype)
                self.chunks += [(shape, names[start : start + size]) for start in range(0, len(names), size)]
        out: dict[str, GlobalModule] = {}
        for index, (shape, names) in enumerate(self.chunks):
            out.update(self._fold_chunk(index, names, shape, final))
        self.pending = []
        return out

    def _fold_chunk(self, index: int, names: list[str], shape: tuple[int, int], final: bool) -> dict[str, GlobalModule]:
        (m, n), widths = shape, [sum(c.modules[name].rank for c in self.pending) for name in names]
        b_new = torch.zeros(len(names), m, max(widths), dtype=self.dtype)
        a_new = torch.zeros(len(names), max(widths), n, dtype=self.dtype)
        for g, name in enumerate(names):
            start = 0
            for client in self.pending:
                factors = client.modules[name]
                stop = start + factors.rank
                b_new[g, :, start:stop].copy_(factors.B)
                torch.mul(factors.A, float(client.weight) * factors.scale, out=a_new[g, start:stop])
                start = stop
        empty = (b_new[:, :, :0], a_new[:, :0])
        carried = self.carried.pop(index, empty)
        rule = self.aggregator.rank_rule(shape) if final else self._carry_rule(names, shape)
        # Every fold in float64: what a fold cannot resolve adds up over the folds, so no fold may
        # leave the share of 1 - tau that one exact decomposition may.
        factored = fold_route(carried, (b_new, a_new), rule, tolerance=0.0)
        del carried, b_new, a_new
        s, eps = factored.singular_values, torch.finfo(self.dtype).eps
        out = {}
        for g, (name, p) in enumerate(zip(names, factored.ranks.tolist())):
            dropped = self.dropped.get(name, 0.0) + factored.unresolved[g].item()
            if final:
                # sum_k n_k s_k B_k A_k / sum_k n_k: the weights p_k are known only now.
                out[name] = GlobalModule(
                    A=factored.right[g, :p].to(self.output_dtype).contiguous(),
                    B=(factored.left[g, :, :p] / self.total_weight).to(self.output_dtype).contiguous(),
                    singular_values=s[g] / self.total_weight,
                    error_bound=relative_bound(dropped, s[g]),
                )
            else:
                # The tail the fold cut, and the rounding of the factors it carries in the compute
                # dtype: (U S, V^T) rounded moves their product by at most eps sqrt(p) s_max.
                tail = s[g, p:].double().square().sum().sqrt().item()
                rounding = eps * p**0.5 * s[g, 0].double().item()
                self.dropped[name] = dropped + tail + rounding
        if not final:
            # Past each module's rank the factors are zero (aggregation/spectral.py, _kept).
            self.carried[index] = (factored.left, factored.right)
        return out

    def _carry_rule(self, names: list[str], shape: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        """CARRY_FACTOR times the rank tau would keep of the running sum; with a download budget,
        all that the budget could buy of the module. At most the carried limit."""
        limits = torch.tensor([self.carry_limit[name] for name in names])
        aggregator = self.aggregator

        def rule(s: Tensor) -> Tensor:
            if aggregator.tau is None:
                carried = torch.full(s.shape[:-1], aggregator.affordable(shape))
            else:
                carried = CARRY_FACTOR * energy_rank(s, aggregator.tau)
            return torch.minimum(carried, limits).clamp(max=s.shape[-1])

        return rule

    # -- the result ----------------------------------------------------------------------------

    def result(self) -> Aggregate:
        if self.reference is None:
            raise AggregationError("no client adapters to aggregate")
        check_total_weight(self.total_weight)
        if not self.folding:
            return self.aggregator.aggregate(self.held_in_order())
        modules = self.aggregator.spend_budget(self._fold(final=True))
        reference = self.reference[1]
        return Aggregate(
            modules={name: modules[name] for name in reference.modules},
            dense={name: (total / self.total_weight).to(reference.dense[name].dtype) for name, total in self.dense_sums.items()},
        )
