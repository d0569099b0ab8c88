"""The peft bridge: LoRA adapters as files (adapters) and as live modules (model), to and from tensors."""

from florist.lora.adapters import find_duplicate, read_adapter, read_adapters, read_config, write_adapter
from florist.lora.model import attach_lora, load_dense, load_global, merge_into_base, read_dense, read_factors

__all__ = [
    "attach_lora",
    "find_duplicate",
    "load_dense",
    "load_global",
    "merge_into_base",
    "read_adapter",
    "read_adapters",
    "read_config",
    "read_dense",
    "read_factors",
    "write_adapter",
]
