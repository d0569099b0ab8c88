"""The one base every aggregation method builds on: validation, batching by shape, stacking."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from florist.aggregation.dense import weighted_mean
from florist.aggregation.types import (
    Aggregate,
    AggregationError,
    ClientAdapter,
    GlobalModule,
    LoraFactors,
    client_weights,
)


@dataclass(frozen=True)
class ModuleBatch:
    """Modules that share (m, n) and every client's rank, so one batched kernel serves them all."""

    names: list[str]
    factors: list[list[LoraFactors]]  # [module][client]
    weights: Tensor  # p_k, float64
    compute_dtype: torch.dtype
    output_dtype: torch.dtype

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.factors[0]]

    @property
    def shape(self) -> tuple[int, int]:
        return self.factors[0][0].shape

    def coefficients(self) -> Tensor:
        """p_k * s_k per (module, client), float64."""
        scales = torch.tensor([[f.scale for f in row] for row in self.factors], dtype=torch.float64)
        return scales * self.weights

    def stacked(self) -> tuple[Tensor, Tensor]:
        """B_stack (G x m x R) and A_stack (G x R x n) with p_k s_k folded into A: B_stack @ A_stack = dW."""
        (m, n), ranks, coefficients = self.shape, self.ranks, self.coefficients()
        size = (len(self.names), sum(ranks))
        b_stack = torch.empty(size[0], m, size[1], dtype=self.compute_dtype)
        a_stack = torch.empty(size[0], size[1], n, dtype=self.compute_dtype)
        for g, row in enumerate(self.factors):
            start = 0
            for k, factors in enumerate(row):
                stop = start + factors.rank
                b_stack[g, :, start:stop].copy_(factors.B)
                torch.mul(factors.A, coefficients[g, k].item(), out=a_stack[g, start:stop])
                start = stop
        return b_stack, a_stack

    def folded_scale(self) -> Tensor:
        """sum_k p_k |s_k| per module: the scale given to averaged factors (positive, never 0)."""
        return (self.coefficients().abs()).sum(-1)

    def padded_average(self, factor: str, coefficients: Tensor) -> Tensor:
        """sum_k c_gk X_k per module g, every client zero-padded to the largest rank (HetLoRA), G x ..."""
        rank = max(self.ranks)
        m, n = self.shape
        size = (len(self.names), m, rank) if factor == "B" else (len(self.names), rank, n)
        out = torch.zeros(size, dtype=self.compute_dtype)
        for g, row in enumerate(self.factors):
            for k, factors in enumerate(row):
                weight = coefficients[g, k].item()
                if factor == "B":
                    out[g, :, : factors.rank].add_(factors.B.to(self.compute_dtype), alpha=weight)
                else:
                    out[g, : factors.rank].add_(factors.A.to(self.compute_dtype), alpha=weight)
        return out

    def folded_b_average(self) -> tuple[Tensor, Tensor]:
        """(sum_k p_k s_k B_k / S, S) with S = sum_k p_k |s_k|: each client's scale folded into its B,
        every B zero-padded to the largest rank.

        With one A shared by every client (client k's A the first r_k rows of A, of the largest
        rank), S * B_avg @ A = sum_k p_k s_k B_k A_k is the exact update whatever the scales (rsLoRA,
        alpha not proportional to r) and the ranks: B_k's padding meets the rows client k lacks.
        That holds with A itself, not with an average of the padded A_k, which shrinks the rows
        beyond the smallest rank (FedIT's case). An average of raw B would weigh a client of scale 2
        like one of scale 0.5.
        """
        scales = self.folded_scale()
        return self.padded_average("B", self.coefficients() / scales[:, None]), scales

    def module(
        self, g: int, B: Tensor, A: Tensor, scale: float = 1.0, singular_values: Tensor | None = None, error_bound: float = 0.0
    ) -> GlobalModule:
        """Package one module's result in the input dtype (singular values stay in the compute dtype)."""
        return GlobalModule(
            A=A.to(self.output_dtype).contiguous(),
            B=B.to(self.output_dtype).contiguous(),
            scale=scale,
            singular_values=singular_values,
            error_bound=error_bound,
        )


# Modules are batched in chunks whose stacked factors fit in a last-level cache: on the 2-core
# benchmark machine (32 MiB L3) this beat one batch of all 64 llama-7b modules by 20%, and it
# bounds the engine's extra memory to about one chunk.
CHUNK_BYTES = 32 * 2**20


def compute_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    # Half-precision inputs are computed in fp32; float64 stays float64 (the property tests use it).
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_factors(factors: LoraFactors, reference: LoraFactors | None, k: int, name: str, reference_index: int) -> None:
    A, B = factors.A, factors.B
    if A.ndim != 2 or B.ndim != 2:
        raise AggregationError(f"LoRA factors must be matrices, got A {tuple(A.shape)} and B {tuple(B.shape)}", client=k, module=name)
    if not (A.is_floating_point() and B.is_floating_point()):
        raise AggregationError(f"LoRA factors must be floating point, got {A.dtype} and {B.dtype}", client=k, module=name)
    if A.shape[0] != B.shape[1] or A.shape[0] < 1:
        raise AggregationError(f"rank mismatch: A is {tuple(A.shape)} but B is {tuple(B.shape)}", client=k, module=name)
    if reference is not None and factors.shape != reference.shape:
        raise AggregationError(
            f"adapted weight is {factors.shape[0]}x{factors.shape[1]} here but "
            f"{reference.shape[0]}x{reference.shape[1]} for client {reference_index}",
            client=k,
            module=name,
        )
    if not math.isfinite(factors.scale) or factors.scale == 0:
        raise AggregationError(f"LoRA scale must be finite and non-zero, got {factors.scale}", client=k, module=name)
    for label, tensor in (("A", A), ("B", B)):
        # One reduction is far cheaper than an elementwise mask; only a non-finite sum is examined.
        if not torch.isfinite(tensor.sum()):
            problem = "NaN or Inf values" if not torch.isfinite(tensor).all() else "values so large that they overflow"
            raise AggregationError(f"lora_{label} holds {problem}", client=k, module=name)


def check_client(client: ClientAdapter, k: int, reference: ClientAdapter | None = None, reference_index: int = 0) -> None:
    """Client k's modules against those of the reference client (the first one accepted, client
    `reference_index`): same module names and shapes, valid factors. Refuses with an
    AggregationError naming client k and the module."""
    if not client.modules:
        raise AggregationError("sent no LoRA modules", client=k)
    if reference is not None:
        missing = set(reference.modules) - set(client.modules)
        extra = set(client.modules) - set(reference.modules)
        if missing or extra:
            name = sorted(missing or extra)[0]
            relation = "lacks a module that" if missing else "has an extra module that"
            raise AggregationError(f"{relation} client {reference_index} {'has' if missing else 'lacks'}", client=k, module=name)
    for name, factors in client.modules.items():
        _check_factors(factors, None if reference is None else reference.modules[name], k, name, reference_index)


def chunk_size(shape: tuple[int, int], width: int, dtype: torch.dtype) -> int:
    """How many modules of this shape, with stacks `width` columns wide, make one chunk."""
    return max(1, CHUNK_BYTES // (sum(shape) * width * torch.finfo(dtype).bits // 8))


def module_batches(clients: Sequence[ClientAdapter]) -> Iterator[ModuleBatch]:
    """Validate every client against client 0 and group modules by (m, n, ranks)."""
    weights = client_weights(clients)
    for k, client in enumerate(clients):
        check_client(client, k, clients[0] if k else None)
    groups: dict[tuple, list[str]] = {}
    for name, factors in clients[0].modules.items():
        groups.setdefault((factors.shape, tuple(client.modules[name].rank for client in clients)), []).append(name)
    for (shape, ranks), group in groups.items():
        factors = [[client.modules[name] for client in clients] for name in group]
        dtype = compute_dtype({t.dtype for row in factors for f in row for t in (f.A, f.B)})
        size = chunk_size(shape, sum(ranks), dtype)
        for start in range(0, len(group), size):
            chunk = slice(start, start + size)
            yield ModuleBatch(group[chunk], factors[chunk], weights, dtype, factors[0][0].A.dtype)


class Accumulator:
    """One round's client adapters, added as their replies arrive; `result()` aggregates them.

    This one keeps every adapter until the end, which the exact batched methods need. A method
    that can fold clients in as they come (bounded memory whatever the number of clients)
    returns its own accumulator from `Aggregator.accumulator`.
    """

    def __init__(self, aggregator: Aggregator):
        self.aggregator = aggregator
        self.clients: list[ClientAdapter] = []
        self.keys: list[float] = []

    def add(self, client: ClientAdapter, key: float = 0.0) -> None:
        """`key` orders the clients held for an exact aggregate (a server passes the partition id),
        so that its rounding does not depend on the order in which replies happened to arrive."""
        self.clients.append(client)
        self.keys.append(key)

    def held_in_order(self) -> list[ClientAdapter]:
        return [client for _, client in sorted(zip(self.keys, self.clients, strict=True), key=lambda pair: pair[0])]

    def result(self) -> Aggregate:
        return self.aggregator.aggregate(self.held_in_order())


class Aggregator(ABC):
    """A server-side aggregation method, and how clients start their next round from its output.

    `continues_from_global`: True when clients resume training from the adapter they download
    (FedIT, FFA-LoRA, FlexLoRA); False when they merge it into their base weights and start
    a fresh LoRA of their own rank (FLoRIST, FLoRA).
    """

    name: ClassVar[str]
    continues_from_global: ClassVar[bool]

    def accumulator(self) -> Accumulator:
        """A fresh accumulator for one round's replies."""
        return Accumulator(self)

    def aggregate(self, clients: Sequence[ClientAdapter]) -> Aggregate:
        dense = weighted_mean(clients)
        shared: dict[str, GlobalModule] = {}
        per_client: list[dict[str, GlobalModule]] | None = None
        for batch in module_batches(clients):
            modules, client_modules = self.combine(batch)
            shared.update(modules)
            if client_modules is not None:
                per_client = per_client or [{} for _ in clients]
                for mine, theirs in zip(per_client, client_modules):
                    mine.update(theirs)
        order = list(clients[0].modules)
        return Aggregate(
            modules={name: shared[name] for name in order},
            per_client=None if per_client is None else [{name: m[name] for name in order} for m in per_client],
            dense=dense,
        )

    @abstractmethod
    def combine(self, batch: ModuleBatch) -> tuple[dict[str, GlobalModule], list[dict[str, GlobalModule]] | None]:
        """Aggregate one batch: the shared modules, and per-client modules when the method has them."""
