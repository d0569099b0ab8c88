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

A value the format cannot hold is refused, naming its factor or tensor: a non-finite one, and in
float16 and bfloat16 one past the format's largest finite value (it would arrive as inf).

The half formats keep 11 and 8 bits of mantissa but a limited range: float16 holds nothing below
6e-8 and is coarse below 6e-5. Where the receiver uses a module only through B @ A (a merged update
of the chain, the part of it no warm start begins from), `round_trip` first splits each component's
magnitude evenly between B's column and A's row, by a power of two, so a component far below the
largest keeps its precision instead of vanishing into B. The server keeps and sends those values,
which every format then holds exactly: `put` sends factors as they are, since the split of an
adapter a client continues from, or of a client's upload, is the method's own.

Nothing is allocated for an array before its .npy header has been read (`declared`) and found to
describe exactly the bytes that follow it: a header cannot make the receiver allocate more than the
message holds. A server reading a node's upload also checks each header's shape and dtype against
what it expects (validation.py) first.

What a download costs, as Flower counts it (`count_bytes` of each record): per array its values,
its .npy header (ARRAY_HEADER_BYTES) and its key; per entry of the scales record its key and 8 bytes
(the format: its name). `update_cost` gives it for a merged update, for a download budget.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType
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
ROW_SCALE_BYTES = torch.finfo(torch.float32).bits // 8
"""Bytes of one int8 row scale (float32)."""
NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2"), "int8": np.dtype("i1")}
"""The dtype of an array's values in each wire format, as its .npy header names it."""


def _array_header_bytes() -> int:
    key = "x"
    return ArrayRecord({key: torch.zeros(0, 0)}).count_bytes() - len(key)


ARRAY_HEADER_BYTES = _array_header_bytes()
"""What Flower counts for an array beyond its values and its key: the .npy header numpy writes,
measured here on an empty array. numpy pads the header to a multiple of 64 bytes, leaving room for
the first dimension to grow, so it is this size for every shape a model's arrays have
(tests/test_wire.py measures it on biases, factors and a 151936-row lm_head)."""


def dense_format(wire: str) -> str:
    """The format tensors trained in full travel in for a wire format."""
    return "float32" if wire == "int8" else wire


def _rank_major(tensor: Tensor, factor: str) -> Tensor:
    return tensor.mT if factor == "B" else tensor


def _in_range(values: Tensor, label: str, wire: str) -> Tensor:
    """`values` in a float format, or a one-line refusal naming what would arrive as inf."""
    if not torch.isfinite(values).all():
        largest = torch.finfo(values.dtype).max
        raise ValueError(f"{label} cannot travel in {wire}: it holds values beyond {wire}'s largest finite value {largest:.6g}")
    return values


def encode(tensor: Tensor, factor: str, wire: str, label: str) -> dict[str, Tensor]:
    """The arrays one factor travels as, by suffix ("" for the data); `label` names it in a refusal."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{label} cannot travel: it holds non-finite values")
    tensor = _in_range(tensor.detach().float(), label, "float32")
    if wire == "float32":
        return {"": tensor.contiguous()}
    if wire == "float16":
        return {"": _in_range(tensor.half(), label, wire).contiguous()}
    if wire == "bfloat16":
        return {"": _in_range(tensor.bfloat16(), label, wire).view(torch.int16).contiguous()}
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


def _factor_label(name: str, factor: str) -> str:
    return f"{name}.{factor}"


def _dense_label(name: str) -> str:
    return f"tensor trained in full {name}"


def _scales(wire: str, scales: Mapping[str, float]) -> ConfigRecord:
    return ConfigRecord({FORMAT_KEY: wire, **scales})


def put(
    content: RecordDict,
    key: str,
    modules: Mapping[str, GlobalModule | LoraFactors],
    wire: str,
    factors: str = "AB",
    dense: Mapping[str, Tensor] | None = None,
) -> int:
    """Store the chosen factors as they are in the wire format, the scales, and the tensors trained
    in full; returns the arrays' bytes."""
    if wire not in WIRE_FORMATS:
        raise ValueError(f"unknown wire format {wire!r}; choose from {', '.join(WIRE_FORMATS)}")
    arrays = {}
    for name, module in modules.items():
        for factor in factors:
            for suffix, tensor in encode(getattr(module, factor), factor, wire, _factor_label(name, factor)).items():
                arrays[f"{name}.{factor}{suffix}"] = tensor
    for name, tensor in (dense or {}).items():
        arrays[f"{DENSE_PREFIX}{name}"] = encode(tensor, "", dense_format(wire), _dense_label(name))[""]
    record = ArrayRecord(arrays)
    content[key] = record
    content[f"{key}:scales"] = _scales(wire, {name: float(module.scale) for name, module in modules.items()})
    return record.count_bytes()


def wire_format(content: RecordDict, key: str) -> str:
    """The wire format payload `key` names."""
    if key not in content or f"{key}:scales" not in content:
        raise ValueError(f"message has no LoRA payload {key!r}")
    scales = content[f"{key}:scales"]
    if not isinstance(scales, ConfigRecord):
        raise ValueError(f"payload {key!r}: its scales are a {type(scales).__name__}, not a ConfigRecord")
    wire = scales.get(FORMAT_KEY)
    if not isinstance(wire, str) or wire not in WIRE_FORMATS:
        raise ValueError(f"payload {key!r} has an unknown wire format {wire!r}")
    return wire


def array_dtype(wire: str, array_key: str) -> np.dtype:
    """The dtype array `array_key` of a payload in `wire` has: a row scale's float32, a tensor
    trained in full's dense format, a factor's wire format."""
    if array_key.endswith(ROW_SCALE):
        return NUMPY_DTYPES["float32"]
    return NUMPY_DTYPES[dense_format(wire) if array_key.startswith(DENSE_PREFIX) else wire]


def declared(array: Array) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an array's .npy header declares, read without allocating anything; a
    ValueError unless the bytes after the header hold exactly that many values of that dtype."""
    if array.stype != SType.NUMPY:
        raise ValueError(f"serialised as {array.stype!r}, not as a .npy array")
    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} is not one numpy writes for these arrays")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)
    if dtype.hasobject or dtype.itemsize == 0:
        raise ValueError(f"dtype {dtype} holds no plain values")
    expected, held = math.prod(shape) * dtype.itemsize, len(array.data) - stream.tell()
    if expected != held:
        raise ValueError(f"its header declares {shape} {dtype} ({expected} bytes), and {held} bytes follow it")
    return shape, dtype


def _tensor(array: Array, array_key: str) -> Tensor:
    try:
        declared(array)
    except ValueError as error:
        raise ValueError(f"array {array_key!r}: {error}") from None
    return torch.from_numpy(array.numpy())


def _arrays(content: RecordDict, key: str, dense: bool) -> dict[str, Tensor]:
    """The payload's arrays as tensors: those of the tensors trained in full, or the others."""
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"payload {key!r} is a {type(record).__name__}, not an ArrayRecord")
    return {k: _tensor(record[k], k) for k in record if k.startswith(DENSE_PREFIX) == dense}


def _scale(scales: Mapping, name: str) -> float:
    value = scales[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"the scale of {name} is a {type(value).__name__}, not a number")
    return float(value)


def factor_parts(array_key: str) -> tuple[str, str, str]:
    """(module, factor, suffix) of a factor's array key: `<module>.<factor><suffix>`."""
    base, suffix = (array_key[: -len(ROW_SCALE)], ROW_SCALE) if array_key.endswith(ROW_SCALE) else (array_key, "")
    name, _, factor = base.rpartition(".")
    return name, factor, suffix


def take(content: RecordDict, key: str) -> dict[str, dict]:
    """{module: {"A"?: tensor, "B"?: tensor, "scale": float}} in float32, in the sender's order."""
    wire = wire_format(content, key)
    scales = dict(content[f"{key}:scales"])
    del scales[FORMAT_KEY]
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for array_key, tensor in _arrays(content, key, dense=False).items():
        name, factor, suffix = factor_parts(array_key)
        if factor not in ("A", "B") or name not in scales:
            raise ValueError(f"payload {key!r} holds an unexpected array {array_key!r}")
        parts.setdefault((name, factor), {})[suffix] = tensor
    modules: dict[str, dict] = {}
    for (name, factor), arrays in parts.items():
        if "" not in arrays or (wire == "int8") != (ROW_SCALE in arrays):
            raise ValueError(f"payload {key!r}: {name}.{factor} is incomplete for wire format {wire}")
        modules.setdefault(name, {"scale": _scale(scales, name)})[factor] = decode(arrays, factor, wire)
    return modules


def take_dense(content: RecordDict, key: str) -> dict[str, Tensor]:
    """{name: tensor} in float32: the tensors trained in full that payload `key` carries, in the sender's order."""
    wire = wire_format(content, key)
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
    return {name: decode(encode(tensor, "", form, _dense_label(name)), "", form) for name, tensor in dense.items()}


def balanced(module: GlobalModule, first: int) -> GlobalModule:
    """The module with each component from index `first` on split evenly between B's column and
    A's row, their norms within a factor of 2: b_i divided and a_i multiplied by the power of two
    nearest sqrt(||b_i|| / ||a_i||), which leaves every product b_ji a_il as it was (short of
    float32's own underflow)."""
    b_norm, a_norm = module.B.double().norm(dim=0), module.A.double().norm(dim=1)
    both = (b_norm > 0) & (a_norm > 0)
    ratio = torch.where(both, b_norm, 1) / torch.where(both, a_norm, 1)
    shift = (ratio.log2() / 2).round().to(torch.int32)
    shift[:first] = 0
    return replace(module, B=torch.ldexp(module.B, -shift), A=torch.ldexp(module.A, shift[:, None]))


def round_trip(modules: Mapping[str, GlobalModule], wire: str, split_used: int | None = None) -> dict[str, GlobalModule]:
    """The modules as a node receives them: encoded in the wire format and decoded to float32.

    `split_used`: how many leading components the receiver uses as separate B and A (a warm start
    begins from them); it uses the rest only through B @ A, so in float16 and bfloat16 those are
    `balanced` first. None: it uses all of them as they are (an adapter a client continues from).
    `put` sends the result exactly.
    """
    if split_used is not None and wire in ("float16", "bfloat16"):
        modules = {name: balanced(module, split_used) for name, module in modules.items()}
    return {
        name: replace(
            module,
            A=decode(encode(module.A, "A", wire, _factor_label(name, "A")), "A", wire),
            B=decode(encode(module.B, "B", wire, _factor_label(name, "B")), "B", wire),
        )
        for name, module in modules.items()
    }


@dataclass(frozen=True)
class UpdateCost:
    """What a merged update's payload costs, in bytes as Flower counts them: `fixed_bytes` whatever
    its ranks (each array's header and key, the tensors trained in full, the scales record), plus
    per component kept of an m x n module, (m + n) * `value_bytes` + `component_overhead_bytes`."""

    value_bytes: int
    component_overhead_bytes: int
    fixed_bytes: int

    def budget_options(self, instruction_bytes: int) -> dict[str, int]:
        """The aggregator's download-budget options for this payload, sent in an instruction record of `instruction_bytes`."""
        return {
            "wire_bytes": self.value_bytes,
            "component_overhead_bytes": self.component_overhead_bytes,
            "fixed_download_bytes": self.fixed_bytes + instruction_bytes,
        }


def update_cost(
    shapes: Mapping[str, tuple[int, int]], dense_shapes: Mapping[str, tuple[int, ...]], wire: str, factors: str = "AB"
) -> UpdateCost:
    """The cost of a merged update of these modules and tensors trained in full in this wire format;
    `factors` as `put` sends them ("B": FFA-LoRA's, whose A is derived from the seed)."""
    suffixes = ("", ROW_SCALE) if wire == "int8" else ("",)
    arrays = sum(ARRAY_HEADER_BYTES + len(f"{name}.{factor}{suffix}") for name in shapes for factor in factors for suffix in suffixes)
    dense_bytes = VALUE_BYTES[dense_format(wire)]
    dense = sum(
        math.prod(shape) * dense_bytes + ARRAY_HEADER_BYTES + len(f"{DENSE_PREFIX}{name}") for name, shape in dense_shapes.items()
    )
    scales = _scales(wire, dict.fromkeys(shapes, 0.0)).count_bytes()
    # int8: one float32 scale for the component's column of B, one for its row of A.
    overhead = len(factors) * ROW_SCALE_BYTES if wire == "int8" else 0
    return UpdateCost(VALUE_BYTES[wire], overhead, arrays + dense + scales)
