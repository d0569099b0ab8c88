"""The chain of merged global updates, and what each node has confirmed it holds.

FLoRIST and FLoRA clients merge every round's global update into their base. The server sends
a node only the updates it lacks, and counts an update as delivered only when the node's reply
confirms it: a lost message or a node that lost its state is sent the updates again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from florist.aggregation import GlobalModule


def update_digest(modules: Mapping[str, GlobalModule]) -> str:
    """A digest of an update's exact tensors and scales: nodes check their chain against it."""
    digest = hashlib.sha256()
    for name, module in modules.items():
        digest.update(f"{name}:{module.scale!r}".encode())
        for tensor in (module.A, module.B):
            digest.update(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Chain:
    """The updates of rounds 1..t, as the nodes receive them (already in the wire dtype)."""

    updates: list[dict[str, GlobalModule]] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    confirmed: dict[int, int] = field(default_factory=dict)
    """node id -> length of the chain prefix its last reply confirmed."""

    def append(self, modules: dict[str, GlobalModule]) -> None:
        self.updates.append(modules)
        self.digests.append(update_digest(modules))

    def __len__(self) -> int:
        return len(self.updates)

    def missing(self, node: int, start: int | None = None) -> range:
        """1-based indices of the updates to send a node: from `start`, or after what it confirmed."""
        first = start if start is not None else self.confirmed.get(node, 0) + 1
        return range(max(1, first), len(self.updates) + 1)

    def confirm(self, node: int, length: int) -> None:
        """The node's reply says it holds updates 1..length."""
        self.confirmed[node] = min(length, len(self.updates))
