"""Wire formats in both directions, client-side truncation, and the run's byte count."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from florist.aggregation import GlobalModule, LoraFactors, truncate_update
from florist.config import load_config
from florist.federation import payload
from florist.federation.client_app import build_client_app
from florist.federation.server_app import serve
from florist.reporting.run_directory import read_rounds

from federations import federation_config
from local_grid import LocalGrid


def npy_bytes(shape: tuple[int, ...], dtype) -> int:
    """What Flower counts for one array: its .npy serialisation (header plus raw data)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype))
    return buffer.tell()


def decaying(m: int, n: int, rank: int, seed: int, scale: float = 1.0) -> LoraFactors:
    """Factors whose components decay like 0.7^i and span four decades of magnitude in B's rows."""
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(m, rank, generator=generator) * torch.logspace(-2, 2, m)[:, None]
    a = torch.randn(rank, n, generator=generator) * (0.7 ** torch.arange(rank, dtype=torch.float32))[:, None]
    return LoraFactors(A=a, B=b, scale=scale)


@pytest.mark.parametrize("wire", payload.WIRE_FORMATS)
def test_every_wire_format_counts_its_exact_bytes_and_decodes_within_its_precision(wire):
    modules = {"layers.0.q_proj": decaying(48, 32, 6, seed=1, scale=0.5), "layers.0.v_proj": decaying(16, 32, 3, seed=2)}
    content = RecordDict()
    sent = payload.put(content, "adapter", modules, wire)
    dtypes = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int8": np.int8}
    expected = 0
    for name, f in modules.items():
        for factor, tensor in (("A", f.A), ("B", f.B)):
            expected += npy_bytes(tuple(tensor.shape), dtypes[wire]) + len(f"{name}.{factor}")
            if wire == "int8":  # one float32 scale per LoRA component
                expected += npy_bytes((f.rank,), np.float32) + len(f"{name}.{factor}{payload.ROW_SCALE}")
    assert sent == expected == content["adapter"].count_bytes()
    data_bytes = sum((f.B.shape[0] + f.A.shape[1]) * f.rank for f in modules.values()) * payload.VALUE_BYTES[wire]
    assert data_bytes < sent

    received = payload.take(content, "adapter")
    # int8 rounds each component to 1/254 of its largest entry; the half formats to their mantissa.
    tolerance = {"float32": 0.0, "float16": 2**-11, "bfloat16": 2**-8, "int8": 1 / 254}[wire]
    for name, f in modules.items():
        assert received[name]["scale"] == f.scale
        for factor, tensor in (("A", f.A), ("B", f.B)):
            got = received[name][factor]
            assert got.dtype == torch.float32 and got.shape == tensor.shape
            rows = tensor.mT if factor == "B" else tensor
            error = (got - tensor).abs()
            bound = tolerance * (rows.abs().amax(1, keepdim=True).mT if factor == "B" else rows.abs().amax(1, keepdim=True))
            if wire == "int8":
                assert (error <= bound + 1e-12).all()
            else:
                assert (error <= tolerance * tensor.abs() + 1e-30).all()
    if wire == "bfloat16":
        assert torch.equal(received["layers.0.q_proj"]["A"], modules["layers.0.q_proj"].A.bfloat16().float())
    round_trip = payload.round_trip({n: GlobalModule(A=f.A, B=f.B, scale=f.scale) for n, f in modules.items()}, wire)
    for name in modules:
        assert torch.equal(round_trip[name].A, received[name]["A"]) and torch.equal(round_trip[name].B, received[name]["B"])


@pytest.mark.parametrize("wire, travels_as", [("float32", np.float32), ("float16", np.float16), ("bfloat16", np.int16), ("int8", np.float32)])
def test_tensors_trained_in_full_travel_beside_the_factors_in_a_float_format(wire, travels_as):
    """A bias and an lm_head in the same payload as the factors: in the wire format, and in float32 when
    the factors are int8 (per-row int8 is a LoRA component's format)."""
    generator = torch.Generator().manual_seed(5)
    dense = {"layers.0.q_proj.base_layer.bias": torch.randn(48, generator=generator), "lm_head.weight": torch.randn(100, 32, generator=generator)}
    modules = {"layers.0.q_proj": decaying(48, 32, 4, seed=1)}
    content = RecordDict()
    sent = payload.put(content, "adapter", modules, wire, dense=dense)
    alone = payload.put(RecordDict(), "adapter", modules, wire)
    assert sent - alone == sum(npy_bytes(tuple(t.shape), travels_as) + len(payload.DENSE_PREFIX + n) for n, t in dense.items())
    assert list(payload.take(content, "adapter")) == list(modules)  # the factors' reader skips them
    received = payload.take_dense(content, "adapter")
    assert list(received) == list(dense)
    expected = payload.round_trip_dense(dense, wire)
    for name, tensor in dense.items():
        assert received[name].dtype == torch.float32 and torch.equal(received[name], expected[name])
        assert torch.equal(received[name], tensor.to(torch.float32 if wire == "int8" else getattr(torch, wire)).float())
    assert payload.take_global(content, "adapter").dense.keys() == dense.keys()


def test_a_payload_in_an_unknown_format_or_missing_its_scales_is_refused():
    content = RecordDict()
    payload.put(content, "adapter", {"m": decaying(4, 4, 2, seed=0)}, "int8")
    scales = dict(content["adapter:scales"])
    scales[payload.FORMAT_KEY] = "int4"
    from flwr.app import ConfigRecord

    content["adapter:scales"] = ConfigRecord(scales)
    with pytest.raises(ValueError, match="unknown wire format 'int4'"):
        payload.take(content, "adapter")
    with pytest.raises(ValueError, match="unknown wire format"):
        payload.put(RecordDict(), "adapter", {"m": decaying(4, 4, 2, seed=0)}, "fp8")


@pytest.mark.parametrize("tau", [1.0, 0.99, 0.9, 0.5])
def test_client_side_truncation_is_the_best_approximation_at_its_energy(tau):
    f = decaying(64, 40, 12, seed=3, scale=0.25)
    dense = f.scale * f.B.double() @ f.A.double()
    s = torch.linalg.svdvals(dense)
    energy = s.square().cumsum(0) / s.square().sum()
    expected_rank = int((energy < tau * (1 - 1e-12)).sum()) + 1 if tau < 1 else torch.linalg.matrix_rank(dense).item()
    kept = truncate_update(f, tau)
    assert kept.rank == expected_rank and kept.scale == 1.0
    error = torch.linalg.matrix_norm(kept.B.double() @ kept.A.double() - dense)
    optimal = s[expected_rank:].square().sum().sqrt()  # Eckart-Young
    assert error <= optimal * (1 + 1e-5) + 1e-6 * s[0]


def test_bad_wire_settings_are_refused_before_anything_runs():
    for override, message in [
        ('wire.download="int4"', "wire.download: Input should be 'float32', 'bfloat16', 'float16' or 'int8'"),
        ("wire.client_tau=0", "wire.client_tau: Input should be greater than 0"),
        ("wire.client_tau=1.5", "wire.client_tau: Input should be less than or equal to 1"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            load_config(None, [override])
    with pytest.raises(ValueError, match="wire.client_tau below 1 would change FFA-LoRA's shared frozen A"):
        load_config(None, ["wire.client_tau=0.9", 'aggregation.method="ffa"'])




def run(tiny_model_dir, tmp_path, name: str, *extra: str):
    config = federation_config(tiny_model_dir, tmp_path / name, "florist", "federation.round_timeout=60", *extra)
    nodes = {100 + k: {"partition-id": k} for k in range(3)}
    path = serve(config, LocalGrid(build_client_app(config), nodes))
    return path, read_rounds(path), json.loads((path / "summary.json").read_text())


def test_smaller_wires_and_client_truncation_cut_the_bytes_counted_both_ways(tiny_model_dir, tmp_path, server_task):
    _, full, full_summary = run(tiny_model_dir, tmp_path, "fp32")
    _, half, _ = run(tiny_model_dir, tmp_path, "bf16", 'wire.download="bfloat16"', 'wire.upload="bfloat16"')
    _, cut, _ = run(tiny_model_dir, tmp_path, "truncated", "wire.client_tau=0.5")
    for record in full[1:]:
        assert record["communication"]["up_bytes"] == sum(c["bytes_up"] for c in record["clients"])
        assert record["communication"]["down_bytes"] == sum(c["bytes_down"] for c in record["clients"])
    # Each array's data halves; its .npy header and key do not. The tiny model's q_proj is 32 x 32 and
    # its v_proj 16 x 32, in 2 layers: (m + n) summed over modules is 224 per LoRA component.
    components = sum(c["rank"] for c in full[1]["clients"])
    saved = full[1]["communication"]["up_bytes"] - half[1]["communication"]["up_bytes"]
    assert saved == 224 * components * (4 - 2)
    # Client-side truncation at tau 0.5 sends fewer components than the configured ranks.
    for record in cut[1:]:
        for client, reference in zip(record["clients"], full[1]["clients"]):
            assert client["bytes_up"] < reference["bytes_up"]
    # The totals are what the rounds sent; the final model's download, which none sent, stands beside them.
    totals = full_summary["communication"]
    down = sum(r["communication"]["down_bytes"] for r in full)
    up = sum(r["communication"]["up_bytes"] for r in full)
    assert totals["download_mib"] == down / 2**20 and totals["upload_mib"] == up / 2**20
    assert totals["total_mib"] == (down + up) / 2**20
    # Without federated evaluation no node received the last update: its download is left unsent.
    last_update = full[-1]["clients"][0]["bytes_down"]  # round 2 sent update 1, of the same shapes
    assert totals["unsent_final_download_mib"] > 0 and math.isfinite(last_update)
