"""The live side of the peft bridge: LoRA factors in and out of a model in memory."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from florist.aggregation import GlobalModule, LoraFactors

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def attach_lora(
    model: nn.Module, rank: int, alpha: float, target_modules: list[str], use_rslora: bool = False
) -> PeftModel:
    """Wrap `model` (in place) with a fresh LoRA: A at peft's random init, B at zero."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora, lora_dropout=0.0, bias="none"
    )
    return get_peft_model(model, config)


def detach_lora(model: nn.Module) -> None:
    """Take off, in place and without merging, the LoRA that attach_lora put on `model`.

    peft's `unload()` does the same from the PeftModel; this is for a holder of the inner model
    only, which wraps it for one client and gets it back plain for the next.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):  # left by get_peft_model; a second wrap would warn about it
        del model.peft_config


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA layers by the base model's module path, e.g. model.layers.0.self_attn.q_proj."""
    return {
        name.removeprefix(PEFT_PREFIX): module for name, module in model.named_modules() if isinstance(module, LoraLayer)
    }


def read_factors(model: PeftModel) -> dict[str, LoraFactors]:
    """Detached copies of every module's trained factors and scale."""
    return {
        name: LoraFactors(
            A=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
            B=layer.lora_B[ADAPTER].weight.detach().float().cpu().clone(),
            scale=float(layer.scaling[ADAPTER]),
        )
        for name, layer in lora_layers(model).items()
    }


@torch.no_grad()
def load_global(model: PeftModel, modules: Mapping[str, Mapping]) -> None:
    """Start from the global adapter ({module: {"B", "scale", optional "A"}}) at this client's own rank.

    The first r components are taken (zero-padded when the global rank is smaller): for FedIT
    that is HetLoRA's truncation, for FlexLoRA's U S / V^T pairs the best rank-r part. B is
    rescaled so that this client's scale times B @ A equals the global update's part. Without
    "A" (FFA-LoRA), the client's frozen A stays.
    """
    for name, layer in lora_layers(model).items():
        if name not in modules:
            raise ValueError(f"the global adapter has no module {name}")
        source = modules[name]
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        rank = min(a.shape[0], source["B"].shape[1])
        if "A" in source:
            a.zero_()
            a[:rank].copy_(source["A"][:rank])
        b.zero_()
        b[:, :rank].copy_(source["B"][:, :rank] * (source["scale"] / float(layer.scaling[ADAPTER])))


@torch.no_grad()
def merge_into_base(model: nn.Module, modules: Mapping[str, GlobalModule], sign: float = 1.0) -> None:
    """W0 <- W0 + sign * scale * B @ A for each module of a plain (un-wrapped) model."""
    for name, module in modules.items():
        weight = model.get_submodule(name).weight
        weight.add_((module.B.to(weight) @ module.A.to(weight)), alpha=sign * module.scale)


def frozen_lora_A(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """FFA-LoRA's shared A for one module: the first `rank` rows of one seeded draw.

    Seeded by (seed, module name), so every client and the server derive the same matrix
    without sending it, and a lower-rank client holds a prefix of a higher-rank one's.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    bound = 1 / math.sqrt(in_features)  # peft's kaiming_uniform(a=sqrt(5)) bound
    # Row-major draws: the first r rows are the same numbers whatever rank is asked for.
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


@torch.no_grad()
def freeze_shared_A(model: PeftModel, seed: int) -> None:
    """Set every module's A to the shared seeded draw and stop its gradient (FFA-LoRA)."""
    for name, layer in lora_layers(model).items():
        a = layer.lora_A[ADAPTER].weight
        a.copy_(frozen_lora_A(name, a.shape[0], a.shape[1], seed))
        a.requires_grad_(False)
