"""Local training of a LoRA-wrapped causal LM: the whole step fits on one screen."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from florist.data.tokenize import IGNORE_INDEX, pad_batch


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over the steps."""
    steps: int
    tokens: int
    seconds: float


def shuffled_batches(features: Sequence[dict], batch_size: int, steps: int, seed: int) -> Iterator[list[dict]]:
    """`steps` batches, reshuffling at each pass over the data (a client may hold fewer than a batch)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            epoch = list(range(len(features)))
            rng.shuffle(epoch)
            order += epoch
        yield [features[i] for i in order[:batch_size]]
        order = order[batch_size:]


def response_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, as transformers computes it from `labels`.

    Only the positions that predict a labelled token go through the vocabulary projection: with
    short responses after long prompts most positions are unlabelled, and the projection is a
    fifth of a small model's compute, forward and backward.
    """
    predicts_label = torch.zeros_like(labels, dtype=torch.bool)
    predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=predicts_label, use_cache=False).logits
    return F.cross_entropy(logits.float(), labels[:, 1:][predicts_label[:, :-1]])


def train_lora(
    model: nn.Module,
    features: Sequence[dict],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    pad_token_id: int,
    autocast: bool,
    gradient_checkpointing: bool,
) -> TrainResult:
    """AdamW on the model's trainable parameters (the LoRA factors), loss on response tokens;
    `gradient_checkpointing` recomputes each layer's activations in the backward pass."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model.train()
    if gradient_checkpointing:
        # Non-reentrant checkpointing, which also makes the embeddings' output require grad, so that
        # the gradient reaches the LoRA factors through layers whose own weights are all frozen.
        model.activation_checkpointing_enable({"use_reentrant": False})
    losses, tokens, start = [], 0, time.perf_counter()
    try:
        for batch in shuffled_batches(features, batch_size, steps, seed):
            inputs = {key: value.to(device) for key, value in pad_batch(batch, pad_token_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = response_loss(model, **inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(inputs["attention_mask"].sum())
    finally:
        model.eval()
        if gradient_checkpointing:
            # The model outlives this call (the workspace keeps it for the next message): leave it as it came.
            model.activation_checkpointing_disable()
            model.disable_input_require_grads()
    return TrainResult(sum(losses) / len(losses), len(losses), tokens, time.perf_counter() - start)
