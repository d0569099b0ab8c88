"""The memory plan of a run configuration: every site's peak and round bytes, and the server's.

Sizes come from the model's configuration (transformers' AutoConfig), never its weights; the
bytes of a round from the wire's own accounting (federation/payload.py, `update_cost`), at the
most a round can send: a merged FLoRIST update at its full stacked rank (tau and a download budget
only cut it), the ranks of the largest sample of sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig

from florist.aggregation.base import chunk_size
from florist.aggregation.sketch import WEIGHT, sketch_entries, sketch_key, sketch_shapes
from florist.config import RunConfig
from florist.federation.payload import ARRAY_HEADER_BYTES, update_cost
from florist.federation.secure import round_widths, upload_caps
from florist.federation.sketch_round import CUT
from florist.lora.model import trained_in_full_shapes, weightless_model
from florist.models import best_device, hardware_precision, resolve_model
from florist.planning.memory import (
    FLOAT32,
    FLOAT64,
    MIB,
    ServerMemory,
    SiteMemory,
    SiteTraining,
    aggregation_memory,
    secure_aggregation_memory,
    site_memory,
)
from florist.planning.shapes import ModelShape
from florist.privacy import noise_to_signal, planned_epsilon, planned_noise_multiplier


@dataclass(frozen=True)
class SitePlan:
    partition: int
    rank: int
    memory: SiteMemory
    upload_bytes: int
    download_bytes: int
    """The most one round after the first sends it (the first sends no update)."""


@dataclass(frozen=True)
class PrivacyPlan:
    """Client-level DP's numbers before a run (privacy.dp): the noise every round adds, what the run
    spends, and the noise-to-signal of round 1's mean sketch (`privacy.noise_to_signal`)."""

    noise_multiplier: float
    epsilon: float
    delta: float
    sampling_rate: float
    sites: int
    """The sites a round samples (federation.sample_size)."""
    sketch_values: int
    """One site's round-1 sketch, in values."""

    @property
    def noise_to_signal(self) -> float:
        return noise_to_signal(self.noise_multiplier, self.sketch_values, self.sites)

    @property
    def sites_for_ratio_one(self) -> int:
        """The sites a round would need for a noise-to-signal of 1 at this noise multiplier and sketch."""
        return math.ceil(self.noise_multiplier * math.sqrt(self.sketch_values))


@dataclass(frozen=True)
class Plan:
    model: str
    shape: ModelShape
    precision: str
    sites: list[SitePlan]
    server_model_bytes: int
    """The float32 model the server evaluates and saves, with the pristine copy of every adapted weight."""
    aggregation: ServerMemory
    first_sketch_bytes: int | None = None
    """florist-secure: one site's round-1 upload (later rounds size their sketches from the ranks kept)."""
    privacy: PrivacyPlan | None = None

    @property
    def server_peak(self) -> int:
        return self.server_model_bytes + self.aggregation.peak


def model_config(name: str) -> PretrainedConfig:
    """The configuration of `model.name`: a config.json read, no weights loaded."""
    return AutoConfig.from_pretrained(resolve_model(name))


def trained_in_full(config: RunConfig, model: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The tensors model.lora_bias and model.modules_to_save train in full, found on a weightless copy."""
    settings = config.model
    if settings.lora_bias == "none" and not settings.modules_to_save:
        return {}
    return trained_in_full_shapes(weightless_model(model), settings.target_modules, settings.lora_bias, settings.modules_to_save)


def site_training(config: RunConfig, rank: int, dense_values: int, autocast: bool, quantization: str | None = None) -> SiteTraining:
    """A site's training at `rank`; `quantization` is its own base's (default: model.quantization)."""
    return SiteTraining(
        rank=rank,
        target_modules=tuple(config.model.target_modules),
        trained_in_full=dense_values,
        batch_size=config.training.batch_size,
        max_length=config.data.max_length,
        quantization=quantization or config.model.quantization,
        autocast=autocast,
        gradient_checkpointing=config.training.gradient_checkpointing,
    )


def site_peak(config: RunConfig, model: PretrainedConfig, rank: int, device: torch.device, quantization: str) -> SiteMemory:
    """One site's planned training peak at `rank` on `device` (its autocast as `model.autocast` chooses
    there), its base held as `quantization` (its node config's, which the run's settings do not carry)."""
    dense = sum(math.prod(shape) for shape in trained_in_full(config, model).values())
    autocast = hardware_precision(config.model.autocast, device).autocast
    return site_memory(ModelShape.from_config(model), site_training(config, rank, dense, autocast, quantization))


def payload_bytes(modules: dict[str, tuple[int, int]], ranks: dict[str, int], dense: dict, wire: str, factors: str = "AB") -> int:
    """What `payload.put` counts for these modules at these ranks, in this wire format."""
    cost = update_cost(modules, dense, wire, factors)
    width = {"AB": lambda m, n: m + n, "B": lambda m, n: m}[factors]
    per_component = {name: width(*shape) * cost.value_bytes + cost.component_overhead_bytes for name, shape in modules.items()}
    return cost.fixed_bytes + sum(per_component[name] * ranks[name] for name in modules)


def sketch_bytes(modules: Mapping[str, tuple[int, int]], module_widths: Mapping[str, int]) -> int:
    """What `sketch_round.put_upload` counts for one site's florist-secure upload at these widths:
    each module's two float32 sketches or its dense update (`sketch_entries`), its weight and cut flag
    (float64 scalars)."""
    total = sum(ARRAY_HEADER_BYTES + FLOAT64 + len(key) for key in (WEIGHT, CUT))
    for name, shape in modules.items():
        total += sum(ARRAY_HEADER_BYTES + len(sketch_key(name, part)) for part in sketch_shapes(shape, module_widths[name]))
    return total + sketch_entries(modules, module_widths) * FLOAT32


def privacy_plan(config: RunConfig, modules: Mapping[str, tuple[int, int]], first_widths: Mapping[str, int]) -> PrivacyPlan:
    privacy, federation = config.privacy, config.federation
    rate = federation.sample_size / federation.num_clients
    return PrivacyPlan(
        noise_multiplier=planned_noise_multiplier(privacy, federation.rounds, rate),
        epsilon=planned_epsilon(privacy, federation.rounds, rate),
        delta=privacy.delta,
        sampling_rate=rate,
        sites=federation.sample_size,
        sketch_values=sketch_entries(modules, first_widths),
    )


def plan_run(config: RunConfig, model: PretrainedConfig | None = None, device: torch.device | None = None) -> Plan:
    """The plan of `config` on `device` (default: this machine's best), from `model` (default: model.name's configuration)."""
    model = model if model is not None else model_config(config.model.name)
    device = device if device is not None else best_device()
    shape = ModelShape.from_config(model)
    layer = shape.adapted(config.model.target_modules)
    modules = shape.module_paths(config.model.target_modules)
    dense = trained_in_full(config, model)
    dense_values = sum(math.prod(size) for size in dense.values())
    precision = hardware_precision(config.model.autocast, device)
    federation, method, wire = config.federation, config.aggregation.method, config.wire
    ranks = [federation.rank_of(partition) for partition in range(federation.num_clients)]
    sampled = sorted(ranks, reverse=True)[: federation.sample_size]
    stacked = sum(sampled)
    cap = config.aggregation.max_rank or stacked
    budget = config.aggregation.download_budget_mb
    secure = method == "florist-secure"
    if secure:  # the widest sketches any round sends (a kept rank of min(m, n) everywhere), and round 1's
        caps = upload_caps(modules, config)
        widest = round_widths(modules, config, {name: min(size) for name, size in modules.items()}, caps)
        first = round_widths(modules, config, None, caps)

    def download(rank: int) -> int:
        if method in ("florist", "florist-secure"):
            kept = {name: min(stacked, cap, *size, *([widest[name]] if secure else [])) for name, size in modules.items()}
            full = payload_bytes(modules, kept, dense, wire.download)
            return full if budget is None else min(full, int(budget * MIB))
        if method == "flora":
            return payload_bytes(modules, dict.fromkeys(modules, stacked), dense, wire.download)
        if method == "flexlora":
            return payload_bytes(modules, dict.fromkeys(modules, rank), dense, wire.download)
        return payload_bytes(modules, dict.fromkeys(modules, max(sampled)), dense, wire.download, "B" if method == "ffa" else "AB")

    sites = []
    for partition, rank in enumerate(ranks):
        training = site_training(config, rank, dense_values, precision.autocast)
        if secure:
            upload = sketch_bytes(modules, widest)
        else:
            upload = payload_bytes(modules, dict.fromkeys(modules, rank), dense, wire.upload, "B" if method == "ffa" else "AB")
        sites.append(SitePlan(partition, rank, site_memory(shape, training), upload, download(rank)))
    largest = max(layer.values(), key=sum)
    chunk = min(shape.layers * list(layer.values()).count(largest), chunk_size(largest, stacked, torch.float32))
    if secure:
        aggregation = secure_aggregation_memory(modules, widest)
    else:
        aggregation = aggregation_memory(method, modules, sampled, chunk, int(config.aggregation.memory_budget_mb * MIB))
    adapted_weights = shape.layers * sum(m * n for m, n in layer.values()) + dense_values
    server_model = (shape.parameters + adapted_weights) * FLOAT32
    privacy = privacy_plan(config, modules, first) if config.privacy.dp else None
    first_sketch = sketch_bytes(modules, first) if secure else None
    return Plan(config.model.name, shape, precision.dtype, sites, server_model, aggregation, first_sketch, privacy)


