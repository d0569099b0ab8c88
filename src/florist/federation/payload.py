"""LoRA factors on the wire: an ArrayRecord `<key>` of `<module>.A` / `<module>.B` arrays plus a
ConfigRecord `<key>:scales` of each module's scale, inside a Flower RecordDict."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from florist.aggregation import GlobalModule, LoraFactors

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def put(
    content: RecordDict,
    key: str,
    modules: Mapping[str, GlobalModule | LoraFactors],
    wire_dtype: str,
    factors: str = "AB",
) -> int:
    """Store the chosen factors (cast to the wire dtype) and scales; returns the arrays' bytes."""
    dtype = WIRE_DTYPES[wire_dtype]
    arrays = ArrayRecord(
        {
            f"{name}.{factor}": getattr(module, factor).detach().to(dtype).contiguous()
            for name, module in modules.items()
            for factor in factors
        }
    )
    content[key] = arrays
    content[f"{key}:scales"] = ConfigRecord({name: float(module.scale) for name, module in modules.items()})
    return arrays.count_bytes()


def take(content: RecordDict, key: str) -> dict[str, dict]:
    """{module: {"A"?: tensor, "B"?: tensor, "scale": float}} in float32, in the sender's order."""
    if key not in content or f"{key}:scales" not in content:
        raise ValueError(f"message has no LoRA payload {key!r}")
    scales = content[f"{key}:scales"]
    modules: dict[str, dict] = {}
    for array_key, tensor in content[key].to_torch_state_dict().items():
        name, _, factor = array_key.rpartition(".")
        if factor not in ("A", "B") or name not in scales:
            raise ValueError(f"payload {key!r} holds an unexpected array {array_key!r}")
        modules.setdefault(name, {"scale": float(scales[name])})[factor] = tensor.float()
    return modules


def take_global(content: RecordDict, key: str) -> dict[str, GlobalModule]:
    return {name: GlobalModule(A=m["A"], B=m["B"], scale=m["scale"]) for name, m in take(content, key).items()}


def payload_keys(content: RecordDict, prefix: str) -> list[str]:
    """Keys of the LoRA payloads whose name starts with `prefix`, in insertion order."""
    return [key for key in content if key.startswith(prefix) and not key.endswith(":scales")]


def round_trip(modules: Mapping[str, GlobalModule], wire_dtype: str) -> dict[str, GlobalModule]:
    """The modules as a node receives them: cast to the wire dtype and back to float32."""
    dtype = WIRE_DTYPES[wire_dtype]
    return {
        name: GlobalModule(
            A=module.A.detach().to(dtype).float(),
            B=module.B.detach().to(dtype).float(),
            scale=module.scale,
            singular_values=module.singular_values,
        )
        for name, module in modules.items()
    }
