"""Pure tensor math for aggregating LoRA adapters: no files, no Flower, no peft."""

from florist.aggregation.base import Accumulator, Aggregator
from florist.aggregation.budget import CRITERIA, allocate_ranks, minimum_download_bytes
from florist.aggregation.fedit import FedIT
from florist.aggregation.ffa import FFALoRA
from florist.aggregation.flexlora import FlexLoRA
from florist.aggregation.flora import FLoRA
from florist.aggregation.florist import DEFAULT_TAU, FLoRIST
from florist.aggregation.sketch import SecureFLoRIST, SketchSum, client_sketch
from florist.aggregation.norms import adapter_norm, tensors_norm, update_norm
from florist.aggregation.spectral import ROUTES, energy_rank
from florist.aggregation.stream import StreamingAccumulator, carried_rank_limit, exact_rank_limit
from florist.aggregation.truncation import cut, cut_ranks, truncate_update
from florist.aggregation.types import (
    Aggregate,
    AggregationError,
    ClientAdapter,
    GlobalModule,
    LoraFactors,
    lora_scale,
)
from florist.aggregation.warm_start import change_since_start, learned_since_start, lora_start, start_of

METHODS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FLoRIST, SecureFLoRIST, FLoRA, FedIT, FlexLoRA, FFALoRA)}


def make_aggregator(method: str, **options) -> Aggregator:
    """The aggregator for a method name, with its options (tau, max_rank, route, ranks)."""
    if method not in METHODS:
        raise AggregationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method](**options)


__all__ = [
    "CRITERIA",
    "DEFAULT_TAU",
    "METHODS",
    "Accumulator",
    "ROUTES",
    "Aggregate",
    "AggregationError",
    "Aggregator",
    "adapter_norm",
    "allocate_ranks",
    "minimum_download_bytes",
    "tensors_norm",
    "update_norm",
    "ClientAdapter",
    "FFALoRA",
    "FLoRA",
    "FLoRIST",
    "SecureFLoRIST",
    "SketchSum",
    "client_sketch",
    "FedIT",
    "FlexLoRA",
    "GlobalModule",
    "StreamingAccumulator",
    "carried_rank_limit",
    "exact_rank_limit",
    "LoraFactors",
    "energy_rank",
    "lora_scale",
    "change_since_start",
    "cut",
    "cut_ranks",
    "learned_since_start",
    "lora_start",
    "make_aggregator",
    "start_of",
    "truncate_update",
]
