"""Norms of LoRA updates without forming them (||s B A||_F from the r x r Gram matrices), and of
tensors trained in full."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from florist.aggregation.types import LoraFactors


def update_norm(factors: LoraFactors) -> float:
    """||s B A||_F = |s| sqrt(trace((B^T B)(A A^T))), in float64: O((m + n) r^2), never m x n."""
    b, a = factors.B.double(), factors.A.double()
    squared = torch.sum((b.mT @ b) * (a @ a.mT)).clamp(min=0).item()
    return abs(factors.scale) * math.sqrt(squared)


def adapter_norm(modules: Mapping[str, LoraFactors]) -> float:
    """The norm of a whole adapter's update: the root of the modules' squared norms."""
    return math.sqrt(sum(update_norm(factors) ** 2 for factors in modules.values()))


def tensors_norm(tensors: Mapping[str, Tensor]) -> float:
    """The Frobenius norm of several tensors taken together, in float64 (0 for none)."""
    return math.sqrt(sum(torch.sum(tensor.double() ** 2).item() for tensor in tensors.values()))
