"""Every client reply is checked against the server's own model before it is aggregated.

A reply that fails a check is rejected for its round with a reason; it never reaches the
aggregate and never crashes the server. The checks are against what the server knows, never
against another client, so one bad client cannot get good ones blamed. Every array's .npy header
is checked against the shape and dtype the server expects before any array is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message

from florist.aggregation import ClientAdapter, GlobalModule, LoraFactors, learned_since_start, lora_scale, start_of
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.messages import ADAPTER, Reply
from florist.lora.model import frozen_lora_A

MiB = 2**20
ARRAY_OVERHEAD = 256
"""Bytes an array may add to its raw data on the wire: its .npy header (128) and key suffix."""

MAX_VALUE = 65504.0
"""The largest value a reply's factors and tensors may hold: float16's largest, so that every wire
format carries it, and orders of magnitude above what training a LoRA (or a head) gives. With the
scale capped too, every product the aggregation forms stays finite in float32."""


REPORTED_METRICS = ("train-loss", "train-seconds", "train-tokens", "peak-rss-mib")
"""Numbers every trained reply reports about itself, recorded per client."""


class Rejected(ValueError):
    """A reply the server refuses for this round; the message is the reason."""


@dataclass(frozen=True)
class Limits:
    shapes: Mapping[str, tuple[int, int]]
    """(m, n) of every module the server adapts."""
    dense: Mapping[str, tuple[int, ...]]
    """The shape of every tensor trained in full that the server's model has for these settings."""
    wire: str
    """The upload's wire format (wire.upload)."""
    max_rank: int
    max_bytes: int
    min_examples: int
    max_examples: int
    max_scale: float
    """The largest LoRA scale the run's settings give any rank up to max_rank."""
    base_norms: Mapping[str, float]
    """||W||_F of every module's base weight, what `check_magnitude` measures an update against."""
    max_relative_update: float

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        shapes: Mapping[str, tuple[int, int]],
        base_norms: Mapping[str, float],
        dense: Mapping[str, tuple[int, ...]] | None = None,
    ) -> Limits:
        """Limits from the configuration and the server's model (`shapes`, `base_norms` and `dense`
        by module); a size cap below what the configured ranks need is an error."""
        wire, dense = config.wire.upload, dict(dense or {})
        needed = sum(m + n for m, n in shapes.values()) * config.rank_cap * payload.VALUE_BYTES[wire]
        arrays_per_module = 4 if wire == "int8" else 2  # int8 factors travel with their row scales
        needed += sum(arrays_per_module * (ARRAY_OVERHEAD + len(name)) + (8 * config.rank_cap if wire == "int8" else 0) for name in shapes)
        dense_bytes = payload.VALUE_BYTES[payload.dense_format(wire)]
        needed += sum(math.prod(shape) * dense_bytes + ARRAY_OVERHEAD + len(payload.DENSE_PREFIX + name) for name, shape in dense.items())
        cap_mb = config.validation.max_message_mb
        if cap_mb is not None and cap_mb * MiB < needed:
            raise ValueError(
                f"validation.max_message_mb {cap_mb:g} is below the {needed / MiB:.3f} MiB an adapter of rank "
                f"{config.rank_cap} needs on this model"
            )
        return cls(
            shapes=dict(shapes),
            dense=dense,
            wire=wire,
            max_rank=config.rank_cap,
            max_bytes=int(cap_mb * MiB) if cap_mb is not None else needed,
            min_examples=config.validation.min_examples,
            max_examples=config.validation.max_examples,
            # alpha = alpha_per_rank * r: the scale grows with r under rsLoRA, else it is alpha_per_rank.
            max_scale=lora_scale(config.federation.alpha_per_rank * config.rank_cap, config.rank_cap, config.federation.use_rslora),
            base_norms=dict(base_norms),
            max_relative_update=config.validation.max_relative_update,
        )


@dataclass(frozen=True)
class ClientUpdate:
    """A reply that passed every per-reply check."""

    modules: dict[str, dict]
    """{module: {"A"?, "B", "scale"}} in float32, as `payload.take` reads them."""
    dense: dict[str, torch.Tensor]
    """The tensors trained in full, in float32, as `payload.take_dense` reads them."""
    examples: int | None
    """None: a secure-sum site's, which the server does not read (federation/training_totals.py)."""
    partition: int
    rank: int
    metrics: dict
    bytes_up: int


def check_reply(message: Message, reply: Reply, limits: Limits, factors: str = "AB") -> ClientUpdate:
    """The update of a trained reply, as `reply` decoded it, or `Rejected` (`Malformed`) with the
    first reason it fails."""
    examples = reply.integer("num-examples")
    if not limits.min_examples <= examples <= limits.max_examples:
        raise Rejected(f"num-examples {examples!r} is outside [{limits.min_examples}, {limits.max_examples}]")
    for key in REPORTED_METRICS:
        reply.number(key)
    content = message.content
    try:
        wire = payload.wire_format(content, ADAPTER)
    except ValueError as error:
        raise Rejected(f"malformed reply: {error}") from None
    adapter = content[ADAPTER]
    if not isinstance(adapter, ArrayRecord):
        raise Rejected(f"malformed reply: the adapter is a {type(adapter).__name__}, not an ArrayRecord")
    if wire != limits.wire:
        raise Rejected(f"adapter payload is in {wire}, not in the run's wire.upload {limits.wire}")
    size = adapter.count_bytes()
    if size > limits.max_bytes:
        raise Rejected(f"adapter payload is {size / MiB:.3f} MiB, above the cap of {limits.max_bytes / MiB:.3f} MiB")
    _check_headers(adapter, limits, factors)
    try:
        modules = payload.take(content, ADAPTER)
        dense = payload.take_dense(content, ADAPTER)
    except (KeyError, ValueError, TypeError) as error:
        raise Rejected(f"malformed reply: {type(error).__name__}: {error}") from None
    missing = set(limits.shapes) - set(modules)
    if missing:
        raise Rejected(f"lacks module {sorted(missing)[0]}")
    ranks = {_check_module(name, module, factors, limits.max_scale) for name, module in modules.items()}
    _check_dense(dense, limits)
    return ClientUpdate(
        modules=modules,
        dense=dense,
        examples=examples,
        partition=reply.partition,
        rank=max(ranks),
        metrics=reply.metrics,
        bytes_up=size,
    )


def _check_headers(record: ArrayRecord, limits: Limits, factors: str) -> None:
    """Each array's header against what the server expects for it: the wire's dtype; a factor of
    an adapted module with the module's size on one side and one rank of at most max_rank on the
    other, shared by its other factor and their row scales; a tensor trained in full at its shape."""
    ranks: dict[str, dict[str, int]] = {}
    for key, array in record.items():
        try:
            shape, dtype = payload.declared(array)
        except ValueError as error:
            raise Rejected(f"array {key}: {error}") from None
        expected = payload.array_dtype(limits.wire, key)
        if dtype != expected:
            raise Rejected(f"array {key} holds {dtype}, expected {expected} in wire format {limits.wire}")
        if key.startswith(payload.DENSE_PREFIX):
            name = key.removeprefix(payload.DENSE_PREFIX)
            if name not in limits.dense:
                raise Rejected(f"sends tensor {name}, which model.lora_bias / model.modules_to_save do not train in full")
            if shape != tuple(limits.dense[name]):
                raise Rejected(f"tensor {name} is {shape}, expected {tuple(limits.dense[name])}")
            continue
        name, factor, suffix = payload.factor_parts(key)
        if name not in limits.shapes:
            raise Rejected(f"sends a module the server does not adapt: module {name}")
        if factor not in factors:
            raise Rejected(f"module {name} carries array {key}, expected factors {list(factors)}")
        ranks.setdefault(name, {})[f"lora_{factor}{suffix}"] = _declared_rank(name, factor, suffix, shape, limits)
    for name, declared in ranks.items():
        if len(set(declared.values())) > 1:
            raise Rejected(f"module {name}: its arrays declare different ranks {declared}")


def _declared_rank(name: str, factor: str, suffix: str, shape: tuple[int, ...], limits: Limits) -> int:
    """The rank a factor's array (B: m x rank, A: rank x n, a row scale: rank) declares."""
    m, n = limits.shapes[name]
    label = f"lora_{factor}{suffix}"
    if suffix:
        if len(shape) != 1:
            raise Rejected(f"module {name}: {label} is {shape}, expected one scale per rank")
        rank = shape[0]
    elif factor == "B":
        if len(shape) != 2 or shape[0] != m:
            raise Rejected(f"module {name}: {label} is {shape}, expected {m} x rank")
        rank = shape[1]
    else:
        if len(shape) != 2 or shape[1] != n:
            raise Rejected(f"module {name}: {label} is {shape}, expected rank x {n}")
        rank = shape[0]
    if not 1 <= rank <= limits.max_rank:
        raise Rejected(f"module {name}: rank {rank} is outside [1, {limits.max_rank}] (validation.max_rank)")
    return rank


def lora_rank(update: ClientUpdate, limits: Limits) -> int:
    """The rank of the LoRA the client trained, which it reports: what a warm start began from."""
    rank = update.metrics.get("rank")
    if not (isinstance(rank, int) and update.rank <= rank <= limits.max_rank):
        raise Rejected(f"metric rank {rank!r} is not an integer in [{update.rank}, {limits.max_rank}] (the uploaded rank, validation.max_rank)")
    return rank


def client_adapter(update: ClientUpdate, limits: Limits, ffa_seed: int | None, start: Mapping[str, GlobalModule] | None) -> ClientAdapter:
    """The client's update as the aggregator takes it. FFA-LoRA (`ffa_seed`): A derived from the
    shared seed. A warm start (`start`, the update the client began from as the node received it):
    the upload is the change since the start, to which the start is added back."""
    modules = {}
    for name, module in update.modules.items():
        a = frozen_lora_A(name, module["B"].shape[1], limits.shapes[name][1], ffa_seed) if ffa_seed is not None else module["A"]
        modules[name] = LoraFactors(A=a, B=module["B"], scale=module["scale"])
    if start is not None:
        modules = learned_since_start(modules, start_of(start, lora_rank(update, limits)))
    return ClientAdapter(modules, float(update.examples), update.dense)


def checked_adapter(
    message: Message, reply: Reply, limits: Limits, ffa_seed: int | None, start: Mapping[str, GlobalModule] | None
) -> tuple[ClientUpdate, ClientAdapter]:
    """A factor reply's update and its adapter as the aggregator takes it, once every check passed
    (FFA-LoRA, `ffa_seed`: B only; `start`: a warm start's, as in `client_adapter`)."""
    update = check_reply(message, reply, limits, factors="B" if ffa_seed is not None else "AB")
    adapter = client_adapter(update, limits, ffa_seed, start)
    check_magnitude(adapter, limits)
    return update, adapter


def _check_module(name: str, module: dict, factors: str, max_scale: float) -> int:
    """A module whose arrays passed `_check_headers`: every factor, a scale in (0, max_scale], finite
    values within MAX_VALUE; its rank."""
    if set(module) != {"scale", *factors}:
        raise Rejected(f"module {name} carries {sorted(set(module) - {'scale'})}, expected {list(factors)}")
    scale = module["scale"]
    if not 0 < scale <= max_scale:
        raise Rejected(
            f"module {name}: scale {scale!r} is outside (0, {max_scale:g}], the scales federation.alpha_per_rank "
            "and federation.use_rslora give a rank up to validation.max_rank"
        )
    for factor in factors:
        _check_values(f"module {name}: lora_{factor}", module[factor])
    return module["B"].shape[1]


def _check_values(label: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise Rejected(f"{label} holds NaN or Inf values")
    if tensor.numel() and tensor.abs().max().item() > MAX_VALUE:
        raise Rejected(f"{label} holds values beyond +-{MAX_VALUE:g}, float16's largest, which no training comes near")


def check_magnitude(adapter: ClientAdapter, limits: Limits) -> None:
    """Each module of the update as it will be aggregated (a warm start's learned part, FFA-LoRA's
    derived A) at most `max_relative_update` times the norm of the base weight it adapts, measured
    by its factors, |s| ||B||_F ||A||_F (in float64): at least the update's own norm, and large too
    for factors whose products cancel, which float32 aggregation would round into noise."""
    for name, factors in adapter.modules.items():
        magnitude = abs(factors.scale) * factors.B.double().norm().item() * factors.A.double().norm().item()
        bound = limits.max_relative_update * limits.base_norms[name]
        if not magnitude <= bound:
            raise Rejected(
                f"module {name}: |s| ||B|| ||A|| = {magnitude:.4g} is more than {limits.max_relative_update:g}x the norm "
                f"{limits.base_norms[name]:.4g} of the base weight it adapts (validation.max_relative_update)"
            )


def _check_dense(dense: Mapping[str, torch.Tensor], limits: Limits) -> None:
    """Every tensor trained in full the server's model expects for these settings (`_check_headers`
    checked their shapes), finite and within MAX_VALUE."""
    missing = set(limits.dense) - set(dense)
    if missing:
        raise Rejected(f"lacks tensor {sorted(missing)[0]}, trained in full with model.lora_bias / model.modules_to_save")
    for name, tensor in dense.items():
        _check_values(f"tensor {name}", tensor)
