"""The chain of merged global updates, and what each node has confirmed it holds.

FLoRIST and FLoRA clients merge every round's global update into their base. The server sends
a node only the updates it lacks, and counts an update as delivered only when the node's reply
confirms it: a lost message or a node that lost its state is sent the updates again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from florist.aggregation import GlobalModule
from florist.lora.model import load_dense, merge_into_base


@dataclass(frozen=True)
class GlobalUpdate:
    """What the server sends for one global state: a merged update of the chain, or the adapter
    clients continue from.

    `modules`: LoRA modules, whose update scale * B @ A adds to the adapted weights. `dense`: the
    tensors trained in full (biases, modules_to_save) by `read_dense` name, as the clients'
    weighted mean: their values replace the model's.
    """

    modules: dict[str, GlobalModule]
    dense: dict[str, Tensor] = field(default_factory=dict)


def apply_update(model: nn.Module, update: GlobalUpdate) -> None:
    """Merge the update into a plain model: LoRA updates add, tensors trained in full replace."""
    merge_into_base(model, update.modules)
    load_dense(model, update.dense)


def _digest_tensor(digest, label: str, tensor: Tensor) -> None:
    digest.update(f"{label}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    # flatten, not contiguous: a (m, 1) column may keep a transpose's strides, which no byte view reads.
    digest.update(tensor.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())


def update_digest(update: GlobalUpdate) -> str:
    """A digest of an update's exact tensors and scales, trained-in-full ones included: nodes check their chain against it."""
    digest = hashlib.sha256()
    for name, module in update.modules.items():
        digest.update(f"{name}:{module.scale!r}".encode())
        for tensor in (module.A, module.B):
            _digest_tensor(digest, "", tensor)
    for name, tensor in update.dense.items():
        _digest_tensor(digest, name, tensor)
    return digest.hexdigest()[:16]


@dataclass
class Chain:
    """The updates of rounds 1..t, as the nodes receive them (already in the wire dtype)."""

    updates: list[GlobalUpdate] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    confirmed: dict[int, int] = field(default_factory=dict)
    """node id -> length of the chain prefix its last reply confirmed."""

    def append(self, update: GlobalUpdate) -> None:
        self.updates.append(update)
        self.digests.append(update_digest(update))

    def __len__(self) -> int:
        return len(self.updates)

    def missing(self, node: int, start: int | None = None) -> range:
        """1-based indices of the updates to send a node: from `start`, or after what it confirmed."""
        first = start if start is not None else self.confirmed.get(node, 0) + 1
        return range(max(1, first), len(self.updates) + 1)

    def confirm(self, node: int, length: int) -> None:
        """The node's reply says it holds updates 1..length."""
        self.confirmed[node] = min(length, len(self.updates))
