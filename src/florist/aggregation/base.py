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

    def padded_average(self, factor: str) -> Tensor:
        """sum_k p_k X_k with every client zero-padded to the largest rank (HetLoRA), G x ..."""
        rank = max(self.ranks)
        m, n = self.shape
        size = (len(self.names), m, rank) if factor == "B" else (len(self.names), rank, n)
        out = torch.zeros(size, dtype=self.compute_dtype)
        for g, row in enumerate(self.factors):
            for k, factors in enumerate(row):
                weight = self.weights[k].item()
                if factor == "B":
                    out[g, :, : factors.rank].add_(factors.B.to(self.compute_dtype), alpha=weight)
                else:
                    out[g, : factors.rank].add_(factors.A.to(self.compute_dtype), alpha=weight)
        return out

    def mean_scale(self) -> Tensor:
        """sum_k p_k s_k per module: the scale of averaged factors."""
        return self.coefficients().sum(-1)

    def module(self, g: int, B: Tensor, A: Tensor, scale: float = 1.0, singular_values: Tensor | None = None) -> GlobalModule:
        """Package one module's result in the input dtype (singular values stay in the compute dtype)."""
        return GlobalModule(
            A=A.to(self.output_dtype).contiguous(),
            B=B.to(self.output_dtype).contiguous(),
            scale=scale,
            singular_values=singular_values,
        )


# Modules are batched in chunks whose stacked factors fit in a last-level cache: on the 2-core
# benchmark machine (32 MiB L3) this beat one batch of all 64 llama-7b modules by 20%, and it
# bounds the engine's extra memory to about one chunk.
CHUNK_BYTES = 32 * 2**20


def _compute_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    # Half-precision inputs are computed in fp32; float64 stays float64 (the property tests use it).
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_factors(factors: LoraFactors, reference: LoraFactors | None, k: int, name: str) -> None:
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
            f"{reference.shape[0]}x{reference.shape[1]} for client 0",
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


def module_batches(clients: Sequence[ClientAdapter]) -> Iterator[ModuleBatch]:
    """Validate every client against client 0 and group modules by (m, n, ranks)."""
    weights = client_weights(clients)
    names = list(clients[0].modules)
    if not names:
        raise AggregationError("client 0 sent no LoRA modules", client=0)
    expected = set(names)
    for k, client in enumerate(clients):
        missing = expected - set(client.modules)
        extra = set(client.modules) - expected
        if missing or extra:
            name = sorted(missing or extra)[0]
            raise AggregationError(f"{'lacks' if missing else 'has an extra'} module that client 0 {'has' if missing else 'lacks'}", client=k, module=name)
    groups: dict[tuple, list[str]] = {}
    for name in names:
        row = [client.modules[name] for client in clients]
        for k, factors in enumerate(row):
            _check_factors(factors, row[0] if k else None, k, name)
        groups.setdefault((row[0].shape, tuple(f.rank for f in row)), []).append(name)
    for (shape, ranks), group in groups.items():
        factors = [[client.modules[name] for client in clients] for name in group]
        dtype = _compute_dtype({t.dtype for row in factors for f in row for t in (f.A, f.B)})
        module_bytes = sum(shape) * sum(ranks) * torch.finfo(dtype).bits // 8
        size = max(1, CHUNK_BYTES // module_bytes)
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

    def add(self, client: ClientAdapter) -> None:
        self.clients.append(client)

    def result(self) -> Aggregate:
        return self.aggregator.aggregate(self.clients)


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
