"""The data the aggregation engine consumes and produces: plain tensors, no files, no peft."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


class AggregationError(ValueError):
    """An input the engine refuses; `module` and `client` say where, when known."""

    def __init__(self, message: str, *, module: str | None = None, client: int | None = None):
        where = []
        if client is not None:
            where.append(f"client {client}")
        if module is not None:
            where.append(f"module {module}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.module = module
        self.client = client


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraFactors:
    """One module of one client: the update it means is `scale * B @ A`."""

    A: Tensor  # r x n
    B: Tensor  # m x r
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): the shape of the adapted weight."""
        return self.B.shape[0], self.A.shape[1]


@dataclass(frozen=True)
class ClientAdapter:
    """Everything one client sends: its factors per module and its weight (number of examples).

    `dense`: tensors the client trained in full beside its LoRA (bias vectors, modules_to_save
    such as lm_head), by name; every method aggregates them as the clients' weighted mean.
    """

    modules: Mapping[str, LoraFactors]
    weight: float
    dense: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class GlobalModule:
    """One aggregated module: the update is `scale * B @ A`, of rank `rank`.

    `singular_values` is the whole spectrum of the aggregated update when the method
    computed it (FLoRIST, FlexLoRA), else None; `energy` is the share of its squared
    singular values that the kept rank holds.

    `error_bound` bounds how far the decomposition that `singular_values` come from may be
    from the exact aggregate dW: ||dW - D||_F <= error_bound * ||D||_F, up to the rounding of the
    factors to their dtype. FLoRIST reports what its route could not resolve (aggregation/spectral.py)
    and, streaming, what its folds dropped; 0 where nothing was lost.
    """

    A: Tensor
    B: Tensor
    scale: float = 1.0
    singular_values: Tensor | None = None
    error_bound: float = 0.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def energy(self) -> float | None:
        if self.singular_values is None:
            return None
        power = self.singular_values.double().square()
        total = power.sum().item()
        return 1.0 if total == 0 else power[: self.rank].sum().item() / total

    def delta(self) -> Tensor:
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class Aggregate:
    """The server's answer for one round.

    `modules` (and `dense`) is what every client downloads. `per_client`, when set (FlexLoRA), gives
    client k its own modules instead.
    """

    modules: dict[str, GlobalModule]
    per_client: list[dict[str, GlobalModule]] | None = None
    dense: dict[str, Tensor] = field(default_factory=dict)
    """The clients' tensors trained in full, as their weighted mean (shared by every client)."""

    def for_client(self, k: int) -> dict[str, GlobalModule]:
        return self.modules if self.per_client is None else self.per_client[k]


def relative_bound(absolute: float | Tensor, singular_values: Tensor) -> float:
    """An error bound in units of the update, as a share of the norm of the decomposition whose
    spectrum is `singular_values` (GlobalModule.error_bound); infinite where that is zero."""
    absolute = float(absolute)
    if absolute == 0:
        return 0.0
    norm = singular_values.double().square().sum().sqrt().item()
    return absolute / norm if norm > 0 else math.inf


def check_weight(weight: float, k: int) -> None:
    if not math.isfinite(weight) or weight < 0:
        raise AggregationError(f"weight must be a finite number >= 0, got {weight}", client=k)


def check_total_weight(total: float) -> None:
    if total <= 0:
        raise AggregationError(f"client weights sum to {total}; at least one must be positive")


def client_weights(clients: Sequence[ClientAdapter]) -> Tensor:
    """p_k = n_k / sum(n), in float64; refuses negative, non-finite or zero-sum weights."""
    if not clients:
        raise AggregationError("no client adapters to aggregate")
    weights = torch.tensor([float(c.weight) for c in clients], dtype=torch.float64)
    for k, w in enumerate(weights.tolist()):
        check_weight(w, k)
    check_total_weight(weights.sum().item())
    return weights / weights.sum()
