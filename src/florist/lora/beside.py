"""Low-rank updates held beside a quantised linear layer's weight instead of merged into it.

Merging scale * B @ A into 4-bit weights would re-quantise them, and the rounding would add up
round after round. Instead each layer keeps its updates stacked, exactly: A_s (sum r x n) and
B_s (m x sum r, scales folded in), and a forward hook adds x A_s^T B_s^T to the layer's output.
The layer stays the bitsandbytes module peft wraps, so a trainable LoRA goes on top as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from florist.quantization import stored_as_integers

BESIDE_A, BESIDE_B = "beside_A", "beside_B"


def _add_beside(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    a, b = getattr(module, BESIDE_A), getattr(module, BESIDE_B)
    if a.shape[0] == 0:
        return output
    return output + F.linear(F.linear(args[0].to(a.dtype), a), b).to(output.dtype)


@torch.no_grad()
def hold_beside(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """Add scale * B @ A to what `layer` computes, beside its weight (float32, on its device)."""
    device = layer.weight.device
    # Copies: A may be a view of a LoRA factor that goes on training (a warm start's).
    a, b = A.to(device, torch.float32, copy=True), B.to(device, torch.float32) * scale
    if not hasattr(layer, BESIDE_A):
        # Not persistent: a state dict (and so the base's digest) holds the base's own tensors only.
        layer.register_buffer(BESIDE_A, a, persistent=False)
        layer.register_buffer(BESIDE_B, b, persistent=False)
        layer.register_forward_hook(_add_beside)
        return
    setattr(layer, BESIDE_A, torch.cat([getattr(layer, BESIDE_A), a]))
    setattr(layer, BESIDE_B, torch.cat([getattr(layer, BESIDE_B), b], dim=1))


def held_beside(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A_s, B_s) the layer holds beside its weight, scales folded into B_s; None if it holds none."""
    if not hasattr(layer, BESIDE_A):
        return None
    return getattr(layer, BESIDE_A), getattr(layer, BESIDE_B)


@torch.no_grad()
def clear_beside(model: nn.Module) -> None:
    """Drop every term held beside the layers of `model`: it computes its base again."""
    for module in model.modules():
        if hasattr(module, BESIDE_A):
            setattr(module, BESIDE_A, getattr(module, BESIDE_A)[:0])
            setattr(module, BESIDE_B, getattr(module, BESIDE_B)[:, :0])


@torch.no_grad()
def add_low_rank(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """W <- W + scale * B @ A: merged into a float weight, held beside a quantised one."""
    weight = layer.weight
    if stored_as_integers(weight):
        hold_beside(layer, A, B, scale)
    else:
        weight.add_(B.to(weight) @ A.to(weight), alpha=scale)
