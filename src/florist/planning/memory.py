"""Peak memory of one site's training step and of the server's aggregation, from sizes alone.

Pure arithmetic over `ModelShape` and the run's numbers. A site's peak is the sum of:

- weights: float32 as florist loads them ("none"), or the decoder's linear layers quantised by
  bitsandbytes (nf4: 4 bits and one float32 absmax per block of 64; int8: a byte and a float32
  scale per row), the embeddings, norms and an untied lm_head in the compute dtype;
- compute copies: bf16 autocast over float32 weights keeps a bf16 copy of every linear weight
  through the step (autocast's cast cache); a quantised layer is dequantised one at a time;
- the trained tensors (LoRA factors and tensors trained in full, float32), their gradients and
  AdamW's two moments;
- the activations autograd saves, counted per token and per layer for a frozen base (the inputs
  of the norms, attention's q, k, v, output and log-sum-exp, the gated MLP's three products, each
  LoRA's A output and any input no frozen layer saved); with gradient checkpointing only each
  layer's input, plus one layer recomputed during the backward pass;
- the largest temporary: at the start of the backward pass the float32 log-probabilities over the
  vocabulary, their gradient and the logits' gradient for every labelled position.

The plan assumes the worst batch: every sequence `max_length` tokens long and every position
labelled. benchmarks/memory_plan.py measures the peak against it (BENCHMARKS.md, "Memory plan").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from florist.aggregation.sketch import DENSE, oriented, sketch_shapes, widths
from florist.planning.shapes import ModelShape

GIB = 2**30
MIB = 2**20
FLOAT32 = 4
FLOAT64 = 8
BF16 = 2
NF4_BLOCK = 64
"""Values per float32 absmax in bitsandbytes' 4-bit layers (its default block size)."""
OPTIMIZER_STATES = 2
"""AdamW keeps two float32 moments per trained value."""
LOGIT_COPIES = 3
"""Vocabulary-wide float32 tensors alive at the backward pass's start: the saved log-probabilities,
the loss's gradient over them and the logits' gradient."""


@dataclass(frozen=True)
class SiteTraining:
    """What one site trains, as far as its memory goes."""

    rank: int
    target_modules: tuple[str, ...]
    trained_in_full: int
    """Values trained in full beside the LoRA (model.lora_bias, model.modules_to_save)."""
    batch_size: int
    max_length: int
    quantization: str
    autocast: bool
    gradient_checkpointing: bool

    @property
    def compute_bytes(self) -> int:
        return BF16 if self.autocast else FLOAT32

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


@dataclass(frozen=True)
class SiteMemory:
    """Bytes of each part of a site's peak."""

    weights: int
    compute_copies: int
    trained: int
    gradients: int
    optimizer: int
    activations: int
    transient: int

    @property
    def peak(self) -> int:
        return sum(getattr(self, field.name) for field in fields(self))

    def parts(self) -> dict[str, int]:
        return {field.name.replace("_", " "): getattr(self, field.name) for field in fields(self)}


def weight_bytes(shape: ModelShape, quantization: str, compute_bytes: int) -> int:
    """The base weights in memory: float32 unquantised, else quantised linear layers and the rest
    (embeddings, norms, an untied lm_head, which bitsandbytes leaves alone) in the compute dtype."""
    if quantization == "none":
        return shape.parameters * FLOAT32
    linear = shape.layers * shape.layer_linear_params
    rest = (shape.parameters - linear) * compute_bytes
    if quantization == "nf4":
        return math.ceil(linear / 2) + math.ceil(linear / NF4_BLOCK) * FLOAT32 + rest
    if quantization == "int8":
        rows = shape.layers * sum(m for m, _ in shape.projections().values())
        return linear + rows * FLOAT32 + rest
    raise ValueError(f"model.quantization {quantization!r} is unknown; choose from none, nf4, int8")


def compute_copy_bytes(shape: ModelShape, quantization: str, compute_bytes: int) -> int:
    """Weights held again in the compute dtype: under bf16 autocast over float32 weights, a bf16
    copy of every linear layer's weight (the output projection included); a quantised layer is
    dequantised for its own matmul only, so the largest one."""
    if quantization != "none":
        return max(m * n for m, n in shape.projections().values()) * compute_bytes
    if compute_bytes == FLOAT32:
        return 0
    return (shape.layers * shape.layer_linear_params + shape.vocab * shape.hidden) * compute_bytes


def lora_values(shape: ModelShape, rank: int, target_modules: Sequence[str]) -> int:
    """Values of a rank-`rank` LoRA's factors over every layer: (m + n) r per adapted module."""
    return shape.layers * sum((m + n) * rank for m, n in shape.adapted(target_modules).values())


def layer_activation_bytes(shape: ModelShape, rank: int, target_modules: Sequence[str], compute_bytes: int, residual_bytes: int) -> int:
    """Bytes autograd saves per token in one decoder layer whose base weights are frozen.

    In the residual stream's dtype: both RMSNorms' inputs and inverse RMS and the attention norm's
    output, which the q, k and v LoRAs read. In the compute dtype: attention's rotated q, k, v and
    output (its float32 log-sum-exp, one per head), the MLP's gate, up and activated products, each
    adapted module's r-wide A output, and the inputs of o_proj and down_proj when adapted (no frozen
    layer keeps them). Measured on random Llamas with saved-tensor hooks: exact in float32, within 3%
    under bf16 autocast."""
    h, i = shape.hidden, shape.intermediate
    adapted = shape.adapted(target_modules)
    extra_inputs = sum(n for name, (_, n) in adapted.items() if name in ("o_proj", "down_proj"))
    residual = (3 * h + 2) * residual_bytes
    computed = (2 * shape.q_dim + 2 * shape.kv_dim + 3 * i + len(adapted) * rank + extra_inputs) * compute_bytes
    return residual + computed + shape.heads * FLOAT32


def site_memory(shape: ModelShape, training: SiteTraining) -> SiteMemory:
    """The peak of one training step at a site, part by part."""
    compute = training.compute_bytes
    # The residual stream keeps the dtype of the unquantised weights: float32 unless a quantised
    # base holds them in the compute dtype.
    residual = FLOAT32 if training.quantization == "none" else compute
    trained_values = lora_values(shape, training.rank, training.target_modules) + training.trained_in_full
    tokens = training.tokens
    per_layer = layer_activation_bytes(shape, training.rank, training.target_modules, compute, residual) * tokens
    if training.gradient_checkpointing:
        # Each layer keeps its input; in the backward pass one layer at a time is recomputed.
        saved = shape.layers * shape.hidden * residual * tokens
        recomputed = per_layer
    else:
        saved, recomputed = shape.layers * per_layer, 0
    final_norm = (shape.hidden + 1) * residual * tokens
    labelled = training.batch_size * (training.max_length - 1)
    logits = LOGIT_COPIES * labelled * shape.vocab * FLOAT32
    return SiteMemory(
        weights=weight_bytes(shape, training.quantization, compute),
        compute_copies=compute_copy_bytes(shape, training.quantization, compute),
        trained=trained_values * FLOAT32,
        gradients=trained_values * FLOAT32,
        optimizer=OPTIMIZER_STATES * trained_values * FLOAT32,
        activations=saved + final_norm,
        transient=max(logits, recomputed + per_layer),
    )


# -- the server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerMemory:
    """Bytes of the server's aggregation of one round."""

    received: int
    """The round's replies held until aggregated (FLoRIST: at most its memory budget)."""
    work: int
    """The largest chunk's working tensors."""
    result: int
    """The aggregate kept for the next round."""

    @property
    def peak(self) -> int:
        return self.received + self.work + self.result

    def parts(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def secure_aggregation_memory(modules: Mapping[str, tuple[int, int]], module_widths: Mapping[str, int]) -> ServerMemory:
    """florist-secure's round at these sketch widths: the running float64 sum of the uploads (a module's
    m l + l' n values, (m, n) its `oriented` shape, or its m n where dW itself is sent: aggregation/sketch.py's
    `sketch_shapes`), whatever the number of sites; as work the larger of adding one upload (float32,
    its float64 copy and the new sum: SketchSum.add) and the reconstruction: the round's test matrices
    (Omega n x l and Psi l' x m of every sketched module, float64, drawn as it goes and kept for the
    round) and the largest module's working tensors in float64 (a sketch's Q m x l, Psi Q, X l x n and
    its SVD's l x l and l x n factors; a dense module's quotient, LAPACK's copy and its SVD's factors);
    the float32 factors at rank at most l (min(m, n) dense) as its result.
    benchmarks/secure_server_memory.py measures it (BENCHMARKS.md)."""
    sketched = {name: (oriented(shape), widths(shape, module_widths[name])) for name, shape in modules.items() if DENSE not in sketch_shapes(shape, module_widths[name])}
    dense = {name: shape for name, shape in modules.items() if name not in sketched}
    values = sum(m * l + l2 * n for (m, n), (l, l2) in sketched.values()) + sum(m * n for m, n in dense.values())
    matrices = sum(n * l + l2 * m for (m, n), (l, l2) in sketched.values()) * FLOAT64

    def reconstruction(name: str) -> int:
        if name in dense:
            (m, n), k = dense[name], min(dense[name])
            return (2 * m * n + k * (m + n + 1)) * FLOAT64
        (m, n), (l, l2) = sketched[name]
        return (m * l + l2 * l + 2 * l * n + l * l) * FLOAT64

    received = values * FLOAT64
    work = max(values * (FLOAT32 + 2 * FLOAT64), matrices + max(map(reconstruction, modules)))
    result = (sum((m + n) * l for (m, n), (l, _) in sketched.values()) + sum((m + n) * min(m, n) for m, n in dense.values())) * FLOAT32
    return ServerMemory(received, work, result)


def aggregation_memory(
    method: str,
    modules: Mapping[str, tuple[int, int]],
    ranks: Sequence[int],
    chunk_modules: int,
    memory_budget_bytes: int | None = None,
) -> ServerMemory:
    """A round's aggregation of adapters of `ranks` over `modules` ({name: (m, n)}, every layer's),
    `chunk_modules` modules of a shape at a time (aggregation/base.py's chunks).

    - florist: the float32 stacks B (m x R) and A (R x n), R = sum of ranks, their two R x R Gram
      matrices and eigenvectors in float64, and factors of at most rank min(R, m, n) as its result;
    - flora: the same stacks, which are its result (every client downloads them);
    - flexlora: the stacks and the QR route's Q factors (its default; the paper's dense route would
      form an m x n update per module instead) and an R x R core, a rank-max(r) adapter as its result;
    - fedit, ffa: the zero-padded average at the largest rank (ffa: B alone).
    """
    total, widest = sum(ranks), max(ranks)
    received = sum((m + n) * total for m, n in modules.values()) * FLOAT32
    if method == "florist" and memory_budget_bytes is not None:
        received = min(received, memory_budget_bytes)
    largest = max(modules.values(), key=sum)
    stack = chunk_modules * sum(largest) * total * FLOAT32
    core = chunk_modules * 3 * total * total * 2 * FLOAT32
    if method == "florist":
        work = stack + core
        result = sum((m + n) * min(total, m, n) for m, n in modules.values()) * FLOAT32
    elif method == "flora":
        work, result = stack, received
    elif method == "flexlora":
        work = 2 * stack + core
        result = sum((m + n) * widest for m, n in modules.values()) * FLOAT32
    elif method in ("fedit", "ffa"):
        work = chunk_modules * sum(largest) * widest * FLOAT32
        # FFA-LoRA averages B alone: its A is the shared seeded draw.
        width = (lambda m, n: m) if method == "ffa" else (lambda m, n: m + n)
        result = sum(width(m, n) * widest for m, n in modules.values()) * FLOAT32
    else:
        raise ValueError(f"aggregation.method {method!r} has no memory model")
    return ServerMemory(received, work, result)
