"""Fingerprints that let the server refuse a node that would train something else.

The settings fingerprint covers what every node must agree on (`RunConfig.shared_settings`).
The model digest covers the base weights themselves, since the same model name or path may
hold different weights on different machines.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from florist.config import RunConfig, first_difference
from florist.federation.messages import Identity

SAMPLED_ELEMENTS = 4096
"""Elements hashed per tensor: enough to tell two checkpoints apart, cheap for a 7B model."""


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def model_digest(model: nn.Module) -> str:
    """A digest of every parameter's name, shape, dtype and an evenly spaced sample of its values.

    A different model or checkpoint differs in the sample almost surely; one changed weight may
    not, which is the price of not hashing gigabytes per process.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_ELEMENTS)
        sample = flat[::step][:SAMPLED_ELEMENTS].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def identity_of(config: RunConfig, model: nn.Module) -> Identity:
    settings = config.shared_settings()
    return Identity(settings_fingerprint(settings), settings, model_digest(model))


def disagreement(ours: Identity, theirs: Identity) -> str | None:
    """Why a node's identity is refused (naming the differing key), or None when it agrees."""
    if theirs.model_digest != ours.model_digest:
        return f"base model differs (weights digest {theirs.model_digest}, the server's is {ours.model_digest})"
    if theirs.fingerprint != ours.fingerprint or theirs.settings != ours.settings:
        difference = first_difference(ours.settings, theirs.settings, ("server", "node"))
        return f"setting {difference} differs" if difference else "settings fingerprint differs"
    return None
