"""Wire formats in both directions, client-side truncation, and the run's byte count."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from florist.aggregation import GlobalModule, LoraFactors, truncate_update
from florist.config import load_config
from florist.federation import payload
from florist.federation.client_app import build_client_app
from florist.federation.delivery import GlobalUpdate, update_digest
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
    # What a download budget counts for these modules at these ranks is what the payload's records hold.
    cost = payload.update_cost({name: f.shape for name, f in modules.items()}, {}, wire)
    per_component = {name: sum(f.shape) * cost.value_bytes + cost.component_overhead_bytes for name, f in modules.items()}
    records = sent + content["adapter:scales"].count_bytes()
    assert records == cost.fixed_bytes + sum(per_component[name] * f.rank for name, f in modules.items())

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
    shapes = {name: f.shape for name, f in modules.items()}
    dense_shapes = {name: tuple(t.shape) for name, t in dense.items()}
    assert payload.update_cost(shapes, dense_shapes, wire).fixed_bytes - payload.update_cost(shapes, {}, wire).fixed_bytes == sent - alone


@pytest.mark.parametrize("shape", [(7,), (151936,), (4096, 64), (64, 4096), (1, 1), (0, 151936), (151936, 0), (3, 5, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int16, np.int8])
def test_flowers_bytes_for_an_array_are_its_values_its_key_and_one_header_size(shape, dtype):
    """ARRAY_HEADER_BYTES, measured on an empty array, is what Flower's count_bytes adds to any
    array's values and key: biases, factors at any rank, an lm_head of a 151936-token vocabulary."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.B:rowscale"
    counted = ArrayRecord({key: torch.from_numpy(np.zeros(shape, dtype=dtype))}).count_bytes()
    values = math.prod(shape) * np.dtype(dtype).itemsize
    assert counted == values + len(key) + payload.ARRAY_HEADER_BYTES
    assert npy_bytes(shape, dtype) == values + payload.ARRAY_HEADER_BYTES  # numpy's own .npy file


def florist_like(m: int, n: int, spectrum: torch.Tensor, seed: int) -> GlobalModule:
    """B = U S, A = V^T in float32, as FLoRIST's global update is split."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(spectrum), generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(spectrum), generator=generator, dtype=torch.float64))[0]
    return GlobalModule(A=v.T.float().contiguous(), B=(u * spectrum).float(), scale=2.0, singular_values=spectrum.float())


def component_errors(received: GlobalModule, sent: GlobalModule) -> torch.Tensor:
    """Per component i, ||b'_i a'_i - b_i a_i||_F / ||b_i a_i||_F, in float64."""
    got = received.B.double().mT[:, :, None] * received.A.double()[:, None, :]
    want = sent.B.double().mT[:, :, None] * sent.A.double()[:, None, :]
    return (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)


@pytest.mark.parametrize("wire, unit", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_a_merged_update_keeps_components_a_million_times_below_its_largest_in_the_half_formats(wire, unit):
    """Singular values from 1 down to 1e-6, in B as FLoRIST splits them: float16 holds the smallest
    columns (entries ~1e-7) in its subnormals, which cost the last component 14% of its product.
    Balanced, each component's product is within twice the format's unit roundoff."""
    spectrum = torch.logspace(0, -6, 13, dtype=torch.float64)
    module = florist_like(64, 48, spectrum, seed=3)
    received = payload.round_trip({"q": module}, wire, split_used=0)["q"]
    errors = component_errors(received, module)
    assert errors.max().item() <= 2 * unit * (1 + unit), errors
    assert torch.equal(received.singular_values, module.singular_values) and received.scale == module.scale
    # The same update kept as the method split it (an adapter clients continue from) is sent as it is.
    as_is = payload.round_trip({"q": module}, wire)["q"]
    assert torch.equal(as_is.B, module.B.to(getattr(torch, wire)).float())


def test_balancing_moves_powers_of_two_between_b_and_a_and_changes_no_product():
    """Components from `first` on end with norms within a factor of 2 of each other (their
    geometric mean, sqrt(s_i)); every product b_ji a_il is the same float; components before
    `first` are untouched."""
    spectrum = torch.tensor([1e4, 3.0, 1e-3, 2e-7, 0.0], dtype=torch.float64)
    module = florist_like(40, 24, spectrum, seed=8)
    module = replace(module, A=module.A * torch.tensor([1.0, 1e-3, 5.0, 1e6, 1.0])[:, None])
    for first in (0, 2):
        result = payload.balanced(module, first)
        b_norm, a_norm = result.B.double().norm(dim=0), result.A.double().norm(dim=1)
        assert torch.equal(result.B[:, :first], module.B[:, :first]) and torch.equal(result.A[:first], module.A[:first])
        live = b_norm[first:4] / a_norm[first:4]
        assert ((live >= 0.5) & (live <= 2)).all(), live
        assert torch.equal(result.B[:, 4], module.B[:, 4]) and torch.equal(result.A[4], module.A[4])  # nothing to balance
        products = result.B.double().mT[:, :, None] * result.A.double()[:, None, :]
        assert torch.equal(products, module.B.double().mT[:, :, None] * module.A.double()[:, None, :])


@pytest.mark.parametrize("wire", payload.WIRE_FORMATS)
@pytest.mark.parametrize("split_used", [None, 0, 3])
def test_what_the_server_keeps_is_what_a_node_decodes_to_the_bit(wire, split_used):
    """The chain's digests are computed on both sides: the server keeps `round_trip`'s values and
    sends them with `put`, and the node must decode exactly those values, in every format (a rank-1
    module among them, whose B a digest once could not read for its transposed strides)."""
    spectrum = torch.logspace(1, -7, 9, dtype=torch.float64)
    modules = {"q": florist_like(32, 24, spectrum, seed=1), "v": florist_like(16, 24, spectrum[:6] * 300, seed=2), "o": florist_like(8, 24, spectrum[:1], seed=3)}
    kept = payload.round_trip(modules, wire, split_used)
    content = RecordDict()
    payload.put(content, "update:1", kept, wire)
    received = payload.take_global(content, "update:1").modules
    assert update_digest(GlobalUpdate(received)) == update_digest(GlobalUpdate({n: GlobalModule(A=m.A, B=m.B, scale=m.scale) for n, m in kept.items()}))
    if split_used == 3 and wire in ("float16", "bfloat16"):
        plain = payload.round_trip(modules, wire)
        for name, module in kept.items():
            assert torch.equal(module.B[:, :3], plain[name].B[:, :3]) and torch.equal(module.B, plain[name].B) == (module.rank <= 3)


@pytest.mark.parametrize(
    "wire, value, refusal",
    [
        ("float16", 65520.0, "layers.0.q_proj.B cannot travel in float16: it holds values beyond float16's largest finite value 65504"),
        ("float16", -1e6, "layers.0.q_proj.B cannot travel in float16: it holds values beyond float16's largest finite value 65504"),
        ("bfloat16", 3.4e38, "layers.0.q_proj.B cannot travel in bfloat16: it holds values beyond bfloat16's largest finite value 3.38953e+38"),
        ("float32", float("inf"), "layers.0.q_proj.B cannot travel: it holds non-finite values"),
        ("int8", float("nan"), "layers.0.q_proj.B cannot travel: it holds non-finite values"),
    ],
)
def test_a_value_that_would_arrive_as_inf_is_refused_naming_its_factor(wire, value, refusal):
    module = decaying(8, 6, 2, seed=0)
    module.B[3, 1] = value
    for send in (
        lambda: payload.put(RecordDict(), "adapter", {"layers.0.q_proj": module}, wire),
        lambda: payload.round_trip({"layers.0.q_proj": GlobalModule(A=module.A, B=module.B)}, wire),
    ):
        with pytest.raises(ValueError) as refused:
            send()
        assert str(refused.value) == refusal
    # The largest value float16 holds still travels, as itself.
    module.B[3, 1] = 65504.0
    assert payload.round_trip({"m": GlobalModule(A=module.A, B=module.B)}, "float16")["m"].B[3, 1].item() == 65504.0


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_a_tensor_trained_in_full_that_would_arrive_as_inf_is_refused_by_name(wire):
    head = torch.ones(4, 6)
    head[2, 2] = 3.4e38
    modules = {"m": decaying(8, 6, 2, seed=0)}
    message = f"tensor trained in full lm_head.weight cannot travel in {wire}: it holds values beyond {wire}'s largest finite value"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        payload.put(RecordDict(), "adapter", modules, wire, dense={"lm_head.weight": head})
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        payload.round_trip_dense({"lm_head.weight": head}, wire)


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
