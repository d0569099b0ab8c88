"""A secure FLoRIST round's cost against a plain one, without a model (issue 21's "Cost" evidence).

K synthetic clients at SmolLM2-135M's q_proj and v_proj shapes (30 layers; the grid's heterogeneous
ranks 4, 4, 8, 8, 16, 16, 32, 64, repeated to K), float32 factors whose spectra decay like 0.7^i
and whose directions are a basis all clients share, each client's own perturbation added (relative
size `OWN`): updates that agree on a common subspace, as clients fine-tuning one model on related
data do. Every client has weight 1 (DP's sketches are at weight 1; the plain aggregate is then
weighted alike). For each K it measures, in CPU seconds (time.process_time: robust to other
processes on a shared machine) and bytes:

- plain: FLoRIST's aggregation at tau 0.9 of the K clients' factors (the server's work), each
  client's float32 upload and the aggregate's float32 download;
- florist-secure with the sums in the clear: every site's sketching (`client_sketch`), the server's
  sum and reconstruction (`SketchSum`), at the automatic per-module widths (twice the rank plain
  FLoRIST kept in each module, at least MIN_SKETCH_WIDTH: what the round after this one would
  use), float32 uploads;
- the SecAgg+ protocol (federation/secure_sum) over those sketch uploads, run in process through
  its Flower records by benchmarks/secure_sum.py's `run_protocol`: per stage, all nodes' CPU
  seconds together and the server's, and one node's bytes up and down. Its cost is linear in the
  vector's length (one ChaCha20 mask per other node), and at 100 nodes the whole sketch would take
  hours of one core: `--protocol-layers` runs it over the sketches of the first layers only.

One thread (`torch.set_num_threads(1)`), nodes one after another in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secure_round_cost.py --clients 8 100 --protocol-layers 30 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secure_round_cost.py --clients 8 --width 128
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from secure_sum import HIDDEN, KV, LAYERS, STAGES, run_protocol

from florist.aggregation import ClientAdapter, LoraFactors, make_aggregator
from florist.aggregation.sketch import SecureFLoRIST, automatic_widths, client_sketch, widths as sketch_widths
from florist.federation.secure_sum import Quantizer

RANKS = (4, 4, 8, 8, 16, 16, 32, 64)
SHARED_RANK = 64
OWN = 0.5
"""Each client's own directions against the shared basis (relative Frobenius size before orthonormalising)."""
TAU = 0.9
SCALE = 2.0
BITS = 20


def shapes(layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    """(out, in) of q_proj and v_proj in the first `layers` layers."""
    return {f"{layer}.{name}": (out, HIDDEN) for layer in range(layers) for name, out in (("q_proj", HIDDEN), ("v_proj", KV))}


def orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix)[0]


def clients(count: int, seed: int = 0) -> list[ClientAdapter]:
    generator = torch.Generator().manual_seed(seed)
    modules = shapes()
    shared = {
        name: (orthonormal(torch.randn(m, SHARED_RANK, generator=generator, dtype=torch.float64)), orthonormal(torch.randn(n, SHARED_RANK, generator=generator, dtype=torch.float64)))
        for name, (m, n) in modules.items()
    }
    adapters = []
    for k, rank in zip(range(count), itertools.cycle(RANKS)):
        factors = {}
        norm = 0.01 * (0.5 + torch.rand((), generator=generator, dtype=torch.float64).item())
        spectrum = 0.7 ** torch.arange(rank, dtype=torch.float64)
        root = (norm * spectrum / spectrum.norm()).sqrt()
        for name, (m, n) in modules.items():
            left, right = shared[name]
            own_left = OWN * torch.randn(m, rank, generator=generator, dtype=torch.float64) / m**0.5
            own_right = OWN * torch.randn(n, rank, generator=generator, dtype=torch.float64) / n**0.5
            b = orthonormal(left[:, :rank] + own_left) * root / SCALE
            a = (orthonormal(right[:, :rank] + own_right) * root).T
            factors[name] = LoraFactors(A=a.float().contiguous(), B=b.float().contiguous(), scale=SCALE)
        adapters.append(ClientAdapter(factors, 1.0))
    return adapters


def cpu(work):
    start = time.process_time()
    value = work()
    return value, time.process_time() - start


def factor_bytes(modules) -> int:
    """float32 bytes of factors on the wire: (m + n) * rank per module."""
    return 4 * sum(f.A.numel() + f.B.numel() for f in modules.values())


def measure(count: int, protocol_layers: int, width: int | None = None) -> dict:
    """One K's costs; `width` None: the automatic per-module sketch widths."""
    adapters = clients(count)
    plain, plain_seconds = cpu(lambda: make_aggregator("florist", tau=TAU).aggregate(adapters))
    kept = {name: m.rank for name, m in plain.modules.items()}
    widths = automatic_widths(shapes(), kept, max(RANKS)) if width is None else dict.fromkeys(shapes(), width)
    sides = {name: sketch_widths(shape, widths[name]) for name, shape in shapes().items()}
    seed = 7
    sketches, site_seconds = [], []
    for adapter in adapters:
        upload, seconds = cpu(lambda: client_sketch(adapter.modules, adapter.weight, seed, sides))
        sketches.append(upload)
        site_seconds.append(seconds)
    aggregator = SecureFLoRIST(tau=TAU)
    total = aggregator.sum_of_sketches(seed, shapes())

    def server():
        for upload in sketches:
            total.add(upload)
        return total.result()

    secure, server_seconds = cpu(server)
    kept = set(shapes(protocol_layers))
    subset = {node + 1: {key: value for key, value in upload.items() if key.split(":")[0] in kept or ":" not in key} for node, upload in enumerate(sketches)}
    largest = max(value.abs().max().item() for upload in subset.values() for value in upload.values())
    clip_range = 2.0 ** torch.tensor(largest).log2().ceil().item()
    protocol = run_protocol(subset, Quantizer(clip_range, BITS), clock=time.process_time)
    total_dense = {name: m.B.double() @ m.A.double() for name, m in plain.modules.items()}
    error = sum((s.B.double() @ s.A.double() - total_dense[name]).square().sum() for name, s in secure.modules.items()) ** 0.5
    reference = sum(d.square().sum() for d in total_dense.values()) ** 0.5
    return {
        "clients": count,
        "width": f"{min(widths.values())}-{max(widths.values())} (mean {statistics.mean(widths.values()):.1f})",
        "plain_rank": sum(m.rank for m in plain.modules.values()),
        "secure_rank": sum(m.rank for m in secure.modules.values()),
        "secure_vs_plain": float(error / reference),
        "plain_server_s": plain_seconds,
        "plain_up_mb": statistics.mean(factor_bytes(a.modules) for a in adapters) / 1e6,
        "plain_down_mb": factor_bytes(plain.modules) / 1e6,
        "site_s_mean": statistics.mean(site_seconds),
        "secure_server_s": server_seconds,
        "secure_up_mb": 4 * sum(v.numel() for v in sketches[0].values()) / 1e6,
        "secure_down_mb": factor_bytes(secure.modules) / 1e6,
        "protocol_layers": protocol_layers,
        "protocol_values": protocol["values"],
        "protocol": protocol["stages"],
        "protocol_error": protocol["max_error"],
        "protocol_bound": protocol["bound"],
        "clip_range": clip_range,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--protocol-layers", type=int, nargs="+", default=[LAYERS], help="layers whose sketches the protocol sums, per --clients entry (one value: for all)")
    parser.add_argument("--width", type=int, help="sketch width l instead of the automatic one (the CPU grid's round 2 used 128)")
    args = parser.parse_args()
    layers = args.protocol_layers * len(args.clients) if len(args.protocol_layers) == 1 else args.protocol_layers
    if len(layers) != len(args.clients):
        parser.error(f"--protocol-layers: give one value or one per --clients entry ({len(args.clients)}), got {len(layers)}")
    torch.set_num_threads(1)
    results = []
    for count, layer_count in zip(args.clients, layers):
        results.append(measure(count, layer_count, args.width))
        print(f"clients {count}:", flush=True)
        print_tables(results[-1:])


def print_tables(results: list[dict]) -> None:
    print("| clients | sketch widths l | ranks kept, plain / secure | secure vs plain (rel. Frobenius) | plain server CPU s | site sketch CPU s (mean) | secure server CPU s | upload MB, plain / secure | download MB, plain / secure |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['width']} | {r['plain_rank']} / {r['secure_rank']} | {r['secure_vs_plain']:.2e} | {r['plain_server_s']:.2f} | "
            f"{r['site_s_mean']:.3f} | {r['secure_server_s']:.2f} | {r['plain_up_mb']:.3f} / {r['secure_up_mb']:.3f} | {r['plain_down_mb']:.3f} / {r['secure_down_mb']:.3f} |"
        )
    print()
    print("SecAgg+ over the sketches (all nodes' CPU s together; one node's bytes, the most of any):")
    print()
    print("| clients | layers (values) | stage | nodes CPU s (all) | node CPU s (mean) | server CPU s | node up MB | node down MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for stage in STAGES:
            cost = r["protocol"][stage]
            print(
                f"| {r['clients']} | {r['protocol_layers']} ({r['protocol_values']:,}) | {stage} | {cost['node_seconds']:.2f} | {cost['node_seconds'] / r['clients']:.3f} | "
                f"{cost['server_seconds']:.2f} | {max(cost['up'].values()) / 1e6:.4f} | {max(cost['down'].values()) / 1e6:.4f} |"
            )
        print(f"| {r['clients']} | | max error / bound (range ±{r['clip_range']:g}, {BITS} bits) | {r['protocol_error']:.2e} / {r['protocol_bound']:.2e} | | | | |", flush=True)


if __name__ == "__main__":
    main()
