"""Pure tensor math for aggregating LoRA adapters: no files, no Flower, no peft."""

from florist.aggregation.base import Accumulator, Aggregator
from florist.aggregation.fedit import FedIT
from florist.aggregation.ffa import FFALoRA
from florist.aggregation.flexlora import FlexLoRA
from florist.aggregation.flora import FLoRA
from florist.aggregation.florist import FLoRIST
from florist.aggregation.norms import adapter_norm, update_norm
from florist.aggregation.truncation import cut, cut_ranks, truncate_update
from florist.aggregation.spectral import ROUTES, energy_rank
from florist.aggregation.types import (
    Aggregate,
    AggregationError,
    ClientAdapter,
    GlobalModule,
    LoraFactors,
    lora_scale,
)

METHODS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FLoRIST, FLoRA, FedIT, FlexLoRA, FFALoRA)}


def make_aggregator(method: str, **options) -> Aggregator:
    """The aggregator for a method name, with its options (tau, max_rank, route, ranks)."""
    if method not in METHODS:
        raise AggregationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method](**options)


__all__ = [
    "METHODS",
    "Accumulator",
    "ROUTES",
    "Aggregate",
    "AggregationError",
    "Aggregator",
    "adapter_norm",
    "update_norm",
    "ClientAdapter",
    "FFALoRA",
    "FLoRA",
    "FLoRIST",
    "FedIT",
    "FlexLoRA",
    "GlobalModule",
    "LoraFactors",
    "energy_rank",
    "lora_scale",
    "cut",
    "cut_ranks",
    "make_aggregator",
    "truncate_update",
]
