"""4-bit and 8-bit bases (QLoRA) through bitsandbytes, as transformers loads them.

A site may hold its frozen base in nf4 or int8 to fit its memory; the LoRA it trains stays in
float32 on top. A quantised weight is stored as integers and takes no float update: the global
chain is held beside it as frozen low-rank terms (lora/beside.py), never merged into it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import BitsAndBytesConfig

QUANTIZATIONS = ("none", "nf4", "int8")
"""model.quantization and the node config's `quantization`, in that order of precision."""


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """transformers' quantisation config for `quantization` ("none": None); nf4 computes in `compute_dtype`."""
    if quantization == "none":
        return None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization {quantization!r} is unknown; choose from {', '.join(QUANTIZATIONS)}")


@lru_cache(maxsize=8)
def unsupported(quantization: str, device: str) -> str | None:
    """Why bitsandbytes cannot quantise to `quantization` on `device` here, or None when it can.

    Checked by quantising a small tensor on the device with the kernel the load will use: the
    installed bitsandbytes, its backends and the device decide, not a list kept here.
    """
    if quantization == "none":
        return None
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb
    except ImportError as error:
        return f"bitsandbytes is not importable ({error}); install bitsandbytes==0.50.2"
    try:
        probe = torch.ones(64, 64, device=device)
        if quantization == "nf4":
            bnb.quantize_4bit(probe, quant_type="nf4")
        else:
            bnb.int8_vectorwise_quant(probe.half())
    except Exception as error:  # whatever the backend raises, the answer is "not here"
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        return f"bitsandbytes {bitsandbytes.__version__} cannot quantise to {quantization} on {device}: {first_line}"
    return None


def stored_as_integers(weight: torch.Tensor) -> bool:
    """Whether a weight is held quantised (bitsandbytes packs nf4 in uint8 and int8 in int8): it
    cannot take a float update in place."""
    return not weight.is_floating_point()


def dequantised_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes layer stands for (its own weight, if not quantised)."""
    weight = layer.weight
    if not stored_as_integers(weight):
        return weight.detach().float()
    import bitsandbytes.functional as bnb

    if weight.dtype == torch.uint8:  # Params4bit
        return bnb.dequantize_4bit(weight.data, weight.quant_state).float()
    # Int8Params: each row scaled by its absolute maximum over 127 (LLM.int8's vector-wise quantisation).
    return weight.data.float() * (weight.SCB.float()[:, None] / 127)
