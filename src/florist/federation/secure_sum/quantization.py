"""Float tensors to integers mod 2**32 and back, with Flower's stochastic quantisation.

Each value in [-clip_range, clip_range] maps to an integer in [0, 2**bits - 1], rounded up or down
at random so that the rounding is unbiased; a sum of K such integers fits the modulus while
K * (2**bits - 1) < 2**32. The dequantised sum of K inputs differs from their plain sum by less
than K quantisation steps per value (`Quantizer.bound`).

A layout may name some tensors counts (`Layout.counts`): non-negative integers that travel as they
are, unquantised, so that their sum is exact; each input's count is at most (2**32 - 1) // K, so
that the sum of K fits the modulus. A non-negative float of any size travels as two entries
(`exact_parts`): its whole part, a count, and its fraction in [0, 1), quantised; the total of K
inputs (`joined`) is then within K quantisation steps of their sum, whatever their size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.common.secure_aggregation.quantization import quantize

MODULUS_BITS = 32
WHOLE, FRACTION = "whole", "fraction"
"""The two entries of a float summed by `exact_parts`: `name:whole` (a count) and `name:fraction`."""


def exact_parts(name: str, value: float) -> dict[str, float]:
    """A non-negative float as its layout entries: its whole part (a count) and its fraction."""
    whole = math.floor(value)
    return {f"{name}:{WHOLE}": float(whole), f"{name}:{FRACTION}": value - whole}


def exact_names(name: str) -> tuple[str, str]:
    """The (count, float) entries `exact_parts` writes for `name`."""
    return f"{name}:{WHOLE}", f"{name}:{FRACTION}"


def joined(total: Mapping[str, float], name: str) -> float:
    """The summed float from the sums of its `exact_parts`; every input was >= 0, so quantisation
    noise below 0 (a total of 0 rounds either way) is cut."""
    whole, fraction = exact_names(name)
    return max(0.0, total[whole] + total[fraction])
"""Masked values are uint32: the arithmetic mod 2**32 is numpy's own wrap-around."""


@dataclass(frozen=True)
class Layout:
    """The names and shapes of the tensors summed, in a fixed order: the flat vector's layout."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    counts: tuple[str, ...] = ()
    """The tensors of non-negative integers, summed exactly (the others are floats, quantised)."""

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        return cls(tuple((name, tuple(tensors[name].shape)) for name in sorted(tensors)))

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        if set(tensors) != {name for name, _ in self.shapes}:
            raise ValueError(f"the tensors {sorted(tensors)} are not the layout's {[name for name, _ in self.shapes]}")
        parts = []
        for name, shape in self.shapes:
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(tensors[name].shape)}, not the layout's {shape}")
            parts.append(tensors[name].detach().to(torch.float64).reshape(-1).numpy())
        return np.concatenate(parts) if parts else np.zeros(0)

    def _count_entries(self) -> np.ndarray:
        """Which entries of the flat vector are counts."""
        return np.concatenate([np.full(math.prod(shape), name in self.counts) for name, shape in self.shapes] or [np.zeros(0, dtype=bool)])

    def encode(self, tensors: Mapping[str, torch.Tensor], quantizer: Quantizer, inputs: int) -> np.ndarray:
        """The tensors as one vector of integers for a sum of at most `inputs`: the floats quantised
        (`Quantizer.encode`), the counts as they are. A value either cannot hold is refused, naming it."""
        vector, counts = self.flatten(tensors), self._count_entries()
        encoded = np.zeros(vector.size, dtype=np.uint32)
        if (~counts).any():
            encoded[~counts] = quantizer.encode(vector[~counts])
        most = (2**MODULUS_BITS - 1) // inputs
        for name in self.counts:
            value = tensors[name].detach().to(torch.float64)
            if not (torch.isfinite(value).all() and (value == value.round()).all() and ((value >= 0) & (value <= most)).all()):
                raise ValueError(f"count {name} is not an integer in [0, {most}], which a secure sum of {inputs} inputs holds exactly")
        encoded[counts] = vector[counts].astype(np.uint32)
        return encoded

    def decode_sum(self, total: np.ndarray, inputs: int, quantizer: Quantizer) -> dict[str, torch.Tensor]:
        """The float sum of `inputs` inputs from the sum of their encodings: the counts exact."""
        counts = self._count_entries()
        vector = total.astype(np.float64)
        vector[~counts] = quantizer.decode_sum(total[~counts], inputs)
        return self.unflatten(vector)

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        tensors, offset = {}, 0
        for name, shape in self.shapes:
            count = math.prod(shape)
            tensors[name] = torch.from_numpy(vector[offset : offset + count].reshape(shape).copy())
            offset += count
        return tensors


@dataclass(frozen=True)
class Quantizer:
    clip_range: float
    bits: int

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        return 2 * self.clip_range / self.levels

    def bound(self, count: int) -> float:
        """The largest difference, per value, between the dequantised sum of `count` inputs inside the
        range and their plain sum: one step of stochastic rounding per input."""
        return count * self.step

    def most_inputs(self) -> int:
        """The most inputs whose sum still fits the modulus."""
        return (2**MODULUS_BITS - 1) // self.levels

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """The input as integers in [0, levels]; a value outside the range is refused, not clipped,
        so that the sum is never silently another."""
        largest = float(np.abs(vector).max()) if vector.size else 0.0
        if not math.isfinite(largest) or largest > self.clip_range:
            raise ValueError(f"a value of magnitude {largest:g} is outside the secure sum's range of ±{self.clip_range:g} (privacy.secure_clip_range)")
        return quantize([vector], self.clip_range, self.levels)[0].astype(np.uint32)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of `count` inputs from the sum of their encodings."""
        return total.astype(np.float64) * self.step - count * self.clip_range
