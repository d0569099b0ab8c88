"""Fingerprints that let the server refuse a node that would train something else.

The settings fingerprint covers what every node must agree on (`RunConfig.shared_settings`).
The model digest covers the base weights themselves, since the same model name or path may
hold different weights on different machines.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import torch
from torch import nn
from transformers import AutoModelForCausalLM

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
    not, which is the price of not hashing gigabytes per process. Floating-point tensors count as
    float32, the dtype florist loads them in: the same checkpoint read in its own bf16 or fp16 gives
    the same digest, since widening to float32 is exact.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_ELEMENTS)
        sample = flat[::step][:SAMPLED_ELEMENTS].to("cpu", torch.float32).contiguous()
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        digest.update(f"{name}:{tuple(tensor.shape)}:{dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=4)
def unquantised_digest(source: str) -> str:
    """`model_digest` of the base at `source` as the server loads it, for a site that holds it
    quantised (whose own weights are rounded): read once per process in the checkpoint's own dtype,
    on the CPU, and let go. A quantised site and a full-precision server so agree on the base."""
    return model_digest(AutoModelForCausalLM.from_pretrained(source, dtype="auto"))


def identity_of(config: RunConfig, model: nn.Module, digest: str | None = None) -> Identity:
    """The node's or server's identity; `digest`: the unquantised base's, where `model` is quantised."""
    settings = config.shared_settings()
    return Identity(settings_fingerprint(settings), settings, digest or model_digest(model))


def disagreement(ours: Identity, theirs: Identity) -> str | None:
    """Why a node's identity is refused (naming the differing key), or None when it agrees."""
    if theirs.model_digest != ours.model_digest:
        return f"base model differs (weights digest {theirs.model_digest}, the server's is {ours.model_digest})"
    if theirs.fingerprint != ours.fingerprint or theirs.settings != ours.settings:
        difference = first_difference(ours.settings, theirs.settings, ("server", "node"))
        return f"setting {difference} differs" if difference else "settings fingerprint differs"
    return None
