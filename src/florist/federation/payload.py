"""LoRA factors on the wire: an ArrayRecord `<key>` of `<module>.A` / `<module>.B` arrays plus a
ConfigRecord `<key>:scales` of each module's scale and the wire format, inside a Flower RecordDict.

Wire formats:
- float32, float16: the factor itself;
- bfloat16: its bits as int16 (Flower's arrays go through numpy, which has no bfloat16);
- int8: each factor taken rank-major (the rows of A, the columns of B: one LoRA component per
  row), every row scaled by its largest magnitude / 127 and rounded; the row scales travel as
  float32 beside it (`<module>.<factor>:rowscale`).

Tensors trained in full (biases, modules_to_save) travel in the same ArrayRecord as
`@dense:<name>`, in the wire format when it is a float format and in float32 when it is int8:
per-row int8 is a LoRA component's format, not a bias's or an lm_head's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from florist.aggregation import GlobalModule, LoraFactors
from florist.federation.delivery import GlobalUpdate

WIRE_FORMATS = ("float32", "bfloat16", "float16", "int8")
VALUE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
ROW_SCALE = ":rowscale"
FORMAT_KEY = "@wire"
"""The scales record's entry naming the wire format (no module path starts with @)."""
DENSE_PREFIX = "@dense:"
"""The array key prefix of a tensor trained in full."""


def dense_format(wire: str) -> str:
    """The format tensors trained in full travel in for a wire format."""
    return "float32" if wire == "int8" else wire


def _rank_major(tensor: Tensor, factor: str) -> Tensor:
    return tensor.mT if factor == "B" else tensor


def encode(tensor: Tensor, factor: str, wire: str) -> dict[str, Tensor]:
    """The arrays one factor travels as, by suffix ("" for the data)."""
    tensor = tensor.detach().float()
    if wire == "float32":
        return {"": tensor.contiguous()}
    if wire == "float16":
        return {"": tensor.half().contiguous()}
    if wire == "bfloat16":
        return {"": tensor.bfloat16().view(torch.int16).contiguous()}
    rows = _rank_major(tensor, factor)
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    quantised = torch.where(scale > 0, rows / torch.where(scale > 0, scale, 1), 0).round().clamp(-127, 127).to(torch.int8)
    return {"": _rank_major(quantised, factor).contiguous(), ROW_SCALE: scale.squeeze(1).contiguous()}


def decode(arrays: Mapping[str, Tensor], factor: str, wire: str) -> Tensor:
    """The factor, in float32, from what `encode` made of it."""
    data = arrays[""]
    if wire in ("float32", "float16"):
        return data.float()
    if wire == "bfloat16":
        return data.view(torch.bfloat16).float()
    rows = _rank_major(data, factor).float() * arrays[ROW_SCALE].float()[:, None]
    return _rank_major(rows, factor).contiguous()


def put(
    content: RecordDict,
    key: str,
    modules: Mapping[str, GlobalModule | LoraFactors],
    wire: str,
    factors: str = "AB",
    dense: Mapping[str, Tensor] | None = None,
) -> int:
    """Store the chosen factors in the wire format, the scales, and the tensors trained in full;
    returns the arrays' bytes."""
    if wire not in WIRE_FORMATS:
        raise ValueError(f"unknown wire format {wire!r}; choose from {', '.join(WIRE_FORMATS)}")
    arrays = {}
    for name, module in modules.items():
        for factor in factors:
            for suffix, tensor in encode(getattr(module, factor), factor, wire).items():
                arrays[f"{name}.{factor}{suffix}"] = tensor
    for name, tensor in (dense or {}).items():
        arrays[f"{DENSE_PREFIX}{name}"] = encode(tensor, "", dense_format(wire))[""]
    record = ArrayRecord(arrays)
    content[key] = record
    content[f"{key}:scales"] = ConfigRecord({FORMAT_KEY: wire, **{name: float(module.scale) for name, module in modules.items()}})
    return record.count_bytes()


def _wire_format(content: RecordDict, key: str) -> str:
    if key not in content or f"{key}:scales" not in content:
        raise ValueError(f"message has no LoRA payload {key!r}")
    wire = content[f"{key}:scales"].get(FORMAT_KEY)
    if wire not in WIRE_FORMATS:
        raise ValueError(f"payload {key!r} has an unknown wire format {wire!r}")
    return wire


def _arrays(content: RecordDict, key: str, dense: bool) -> dict[str, Tensor]:
    """The payload's arrays as tensors: those of the tensors trained in full, or the others."""
    record = content[key]
    return {k: torch.from_numpy(record[k].numpy()) for k in record if k.startswith(DENSE_PREFIX) == dense}


def take(content: RecordDict, key: str) -> dict[str, dict]:
    """{module: {"A"?: tensor, "B"?: tensor, "scale": float}} in float32, in the sender's order."""
    wire = _wire_format(content, key)
    scales = dict(content[f"{key}:scales"])
    del scales[FORMAT_KEY]
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for array_key, tensor in _arrays(content, key, dense=False).items():
        base, suffix = (array_key[: -len(ROW_SCALE)], ROW_SCALE) if array_key.endswith(ROW_SCALE) else (array_key, "")
        name, _, factor = base.rpartition(".")
        if factor not in ("A", "B") or name not in scales:
            raise ValueError(f"payload {key!r} holds an unexpected array {array_key!r}")
        parts.setdefault((name, factor), {})[suffix] = tensor
    modules: dict[str, dict] = {}
    for (name, factor), arrays in parts.items():
        if "" not in arrays or (wire == "int8") != (ROW_SCALE in arrays):
            raise ValueError(f"payload {key!r}: {name}.{factor} is incomplete for wire format {wire}")
        modules.setdefault(name, {"scale": float(scales[name])})[factor] = decode(arrays, factor, wire)
    return modules


def take_dense(content: RecordDict, key: str) -> dict[str, Tensor]:
    """{name: tensor} in float32: the tensors trained in full that payload `key` carries, in the sender's order."""
    wire = _wire_format(content, key)
    return {
        array_key.removeprefix(DENSE_PREFIX): decode({"": tensor}, "", dense_format(wire))
        for array_key, tensor in _arrays(content, key, dense=True).items()
    }


def take_global(content: RecordDict, key: str) -> GlobalUpdate:
    modules = {name: GlobalModule(A=m["A"], B=m["B"], scale=m["scale"]) for name, m in take(content, key).items()}
    return GlobalUpdate(modules, take_dense(content, key))


def payload_keys(content: RecordDict, prefix: str) -> list[str]:
    """Keys of the LoRA payloads whose name starts with `prefix`, in insertion order."""
    return [key for key in content if key.startswith(prefix) and not key.endswith(":scales")]


def round_trip_dense(dense: Mapping[str, Tensor], wire: str) -> dict[str, Tensor]:
    """The tensors trained in full as a node receives them."""
    form = dense_format(wire)
    return {name: decode(encode(tensor, "", form), "", form) for name, tensor in dense.items()}


def round_trip(modules: Mapping[str, GlobalModule], wire: str) -> dict[str, GlobalModule]:
    """The modules as a node receives them: encoded in the wire format and decoded to float32."""
    return {
        name: GlobalModule(
            A=decode(encode(module.A, "A", wire), "A", wire),
            B=decode(encode(module.B, "B", wire), "B", wire),
            scale=module.scale,
            singular_values=module.singular_values,
        )
        for name, module in modules.items()
    }
