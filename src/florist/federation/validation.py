"""Every client reply is checked against the server's own model before it is aggregated.

A reply that fails a check is rejected for its round with a reason; it never reaches the
aggregate and never crashes the server. The checks are against what the server knows, never
against another client, so one bad client cannot get good ones blamed. Every array's .npy header
is checked against the shape and dtype the server expects before any array is read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message

from florist.aggregation import ClientAdapter, GlobalModule, LoraFactors, adapter_norm, learned_since_start, start_of, tensors_norm
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.messages import ADAPTER, Reply
from florist.lora.model import frozen_lora_A

MiB = 2**20
ARRAY_OVERHEAD = 256
"""Bytes an array may add to its raw data on the wire: its .npy header (128) and key suffix."""


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
    norm_factor: float

    @classmethod
    def for_run(
        cls, config: RunConfig, shapes: Mapping[str, tuple[int, int]], dense: Mapping[str, tuple[int, ...]] | None = None
    ) -> Limits:
        """Limits from the configuration; a size cap below what the configured ranks need is an error."""
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
            norm_factor=config.validation.norm_factor,
        )


@dataclass(frozen=True)
class ClientUpdate:
    """A reply that passed every per-reply check."""

    modules: dict[str, dict]
    """{module: {"A"?, "B", "scale"}} in float32, as `payload.take` reads them."""
    dense: dict[str, torch.Tensor]
    """The tensors trained in full, in float32, as `payload.take_dense` reads them."""
    examples: int
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
    ranks = {_check_module(name, module, factors) for name, module in modules.items()}
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


def _check_module(name: str, module: dict, factors: str) -> int:
    """A module whose arrays passed `_check_headers`: every factor, a usable scale, finite values; its rank."""
    if set(module) != {"scale", *factors}:
        raise Rejected(f"module {name} carries {sorted(set(module) - {'scale'})}, expected {list(factors)}")
    scale = module["scale"]
    if not (math.isfinite(scale) and scale != 0):
        raise Rejected(f"module {name}: scale {scale!r} is not a finite non-zero number")
    for factor in factors:
        if not torch.isfinite(module[factor]).all():
            raise Rejected(f"module {name}: lora_{factor} holds NaN or Inf values")
    return module["B"].shape[1]


def _check_dense(dense: Mapping[str, torch.Tensor], limits: Limits) -> None:
    """Every tensor trained in full the server's model expects for these settings (`_check_headers`
    checked their shapes), finite."""
    missing = set(limits.dense) - set(dense)
    if missing:
        raise Rejected(f"lacks tensor {sorted(missing)[0]}, trained in full with model.lora_bias / model.modules_to_save")
    for name, tensor in dense.items():
        if not torch.isfinite(tensor).all():
            raise Rejected(f"tensor {name} holds NaN or Inf values")


def screened_norms(adapter: ClientAdapter, start: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The norms the round's NormScreen judges a reply by, named as its reasons name them: the LoRA
    update's, and the change of the tensors trained in full from `start`, the values every node
    began the round with (none in round 1: the server does not hold the base model's weights, so
    there the tensors' own norm is judged)."""
    changes = {name: tensor.double() - start[name].double() if name in start else tensor for name, tensor in adapter.dense.items()}
    return {"update": adapter_norm(adapter.modules), "tensors trained in full": tensors_norm(changes)}


class NormScreen:
    """The round's norm check, as replies arrive: an update with a norm more than `factor` times
    the median of the same norm is rejected.

    A reply has two norms (`screened_norms`): its LoRA update's, and that of the change of its
    tensors trained in full (biases, a `modules_to_save` head; 0 where the settings train none),
    each judged against its own median, since a head's norm would drown any LoRA update's.

    A median of fewer than three norms says nothing about which one is off, so the first
    `WARMUP` replies are held and judged together against their own medians; each later one is
    judged on arrival against the medians of the replies admitted so far, so the server can fold
    it into the aggregate and drop it. A round that ends with fewer than `WARMUP` replies admits
    them all.
    """

    WARMUP = 3

    def __init__(self, factor: float):
        self.factor = factor
        self.held: dict[int, Mapping[str, float]] = {}
        self.admitted: list[Mapping[str, float]] = []

    def offer(self, key: int, norms: Mapping[str, float]) -> tuple[list[int], dict[int, str]]:
        """(keys admitted now, {key rejected: reason}) once `key`'s reply is judged; both empty while held.
        `norms` names each norm as the reason would (every reply names the same ones)."""
        if len(self.admitted) >= self.WARMUP:
            return self._judge({key: norms}, self.admitted)
        self.held[key] = norms
        if len(self.held) < self.WARMUP:
            return [], {}
        held, self.held = self.held, {}
        return self._judge(held, list(held.values()))

    def flush(self) -> list[int]:
        """The replies still held at the round's end: too few to judge, all admitted."""
        held, self.held = self.held, {}
        self.admitted += held.values()
        return list(held)

    def _judge(self, offered: Mapping[int, Mapping[str, float]], against: list[Mapping[str, float]]) -> tuple[list[int], dict[int, str]]:
        medians = {name: statistics.median(norms[name] for norms in against) for name in next(iter(offered.values()))}
        admitted, rejected = [], {}
        for key, norms in offered.items():
            over = [name for name, median in medians.items() if not norms[name] <= self.factor * median]
            if over:
                name = over[0]
                rejected[key] = f"{name} norm {norms[name]:.4g} is more than {self.factor:g}x the round's median {medians[name]:.4g} (validation.norm_factor)"
            else:
                admitted.append(key)
        self.admitted += [offered[key] for key in admitted]
        return admitted, rejected
