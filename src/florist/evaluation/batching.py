"""What every evaluator shares: eval mode without gradients, length-sorted batches, padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from rich.progress import track

from florist.printing import make_console


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode (dropout off, so scores are deterministic) and no autograd; restores training mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def pad_id(tokenizer) -> int:
    """The id to pad with: padded positions are masked out, so any valid id does."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def padded(
    sequences: Sequence[Sequence[int]], pad: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token lists padded on `side` ("left" for generation, else "right")."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if side == "left" else 0
        input_ids[row, start : start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, start : start + len(sequence)] = 1
    return input_ids.to(device), attention_mask.to(device)


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, *, progress: bool, description: str
) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    Similar lengths waste less compute on padding; longest first makes an out-of-memory batch size fail at once
    rather than at the end. Callers put results back in place by index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    yield from track(batches, description=description, disable=not progress, transient=True, console=make_console())
