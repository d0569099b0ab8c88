"""The live side of the peft bridge: LoRA factors in and out of a model in memory."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from florist.aggregation import GlobalModule, LoraFactors, lora_start
from florist.lora.beside import add_low_rank

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def attach_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    use_rslora: bool = False,
    bias: str = "none",
    modules_to_save: Sequence[str] = (),
) -> PeftModel:
    """Wrap `model` (in place) with a fresh LoRA: A at peft's random init, B at zero; `bias` and
    `modules_to_save` (peft's options) also train those tensors in full, from the model's values."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias=bias,
        modules_to_save=list(modules_to_save) or None,
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


def weightless_model(model_config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM a configuration describes, on the meta device: its structure (tied weights
    included) without its memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def trained_in_full_shapes(
    model: PreTrainedModel, target_modules: Sequence[str], bias: str, modules_to_save: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """The names and shapes `read_dense` gives for a LoRA with these options, peft's own choice of
    tensors. `model` is wrapped in place: give it a `weightless_model`."""
    peft_model = attach_lora(model, 1, 1.0, target_modules, bias=bias, modules_to_save=modules_to_save)
    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER)
    return {key.removeprefix(PEFT_PREFIX): tuple(tensor.shape) for key, tensor in state.items() if ".lora_" not in key}


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


def read_dense(model: PeftModel) -> dict[str, torch.Tensor]:
    """Detached copies of the tensors the adapter trains in full (biases, modules_to_save), named as
    peft saves them and `read_adapter` reads them: the path in the base model, e.g. lm_head.weight."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {
        key.removeprefix(PEFT_PREFIX): tensor.detach().float().cpu().clone()
        for key, tensor in state.items()
        if ".lora_" not in key
    }


def model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The live tensor behind a `read_dense` name (or any parameter path of the base model), in a
    PeftModel (a modules_to_save module's trained copy) or in a plain model."""
    if isinstance(model, PeftModel):
        root = model.get_base_model()
    else:
        # Merged into a plain model, a LoRA layer's base_layer.bias is the layer's own bias.
        root, name = model, name.replace(".base_layer.", ".")
    path, _, parameter = name.rpartition(".")
    try:
        module = root.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.modules_to_save[ADAPTER]
        tensor = getattr(module, parameter)
    except AttributeError:
        tensor = None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"the model has no tensor {name} to load a trained-in-full value into")
    return tensor


@torch.no_grad()
def load_dense(model: nn.Module, dense: Mapping[str, torch.Tensor]) -> None:
    """Set each tensor trained in full to its aggregated value, in a PeftModel (clients continuing
    from the global adapter) or in a plain model (the server, or clients merging each update)."""
    for name, value in dense.items():
        tensor = model_tensor(model, name)
        if tensor.shape != value.shape:
            raise ValueError(f"{name} is {tuple(tensor.shape)} in the model but {tuple(value.shape)} in the aggregate")
        tensor.copy_(value)


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
def move_into_lora(model: PeftModel, start: Mapping[str, GlobalModule]) -> None:
    """Start each fresh LoRA's leading components from `start` (a warm start: `lora_start`, from which
    the server recovers what the client learned) and take from the base weight exactly what they add
    (a quantised base holds the subtraction beside its weight): the model computes what it did, up to
    rounding. Components past a module's start keep peft's init
    (random A, B = 0), so they train."""
    for name, layer in lora_layers(model).items():
        if name not in start:
            raise ValueError(f"the update to start from has no module {name}")
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        begun = lora_start(start[name], float(layer.scaling[ADAPTER]))
        if begun.rank > a.shape[0]:
            raise ValueError(f"module {name}: the start has {begun.rank} components, more than the LoRA's rank {a.shape[0]}")
        a[: begun.rank].copy_(begun.A)
        b[:, : begun.rank].copy_(begun.B)
        add_low_rank(layer.get_base_layer(), a[: begun.rank], b[:, : begun.rank], -begun.scale)


@torch.no_grad()
def merge_into_base(model: nn.Module, modules: Mapping[str, GlobalModule], sign: float = 1.0) -> None:
    """W0 <- W0 + sign * scale * B @ A for each module of a plain (un-wrapped) model; a quantised
    weight holds it beside instead (lora/beside.py)."""
    for name, module in modules.items():
        add_low_rank(model.get_submodule(name), module.A, module.B, sign * module.scale)


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
