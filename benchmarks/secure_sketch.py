"""Secure FLoRIST from summed sketches (issue 21): accuracy against the sketch width l.

For each input and width: the rank florist-secure keeps at tau against plain FLoRIST's (the exact
spectrum's), the share of dW's true energy it keeps, its error ||dW - D||_F / ||dW||_F, and that
error over the Eckart-Young optimum of the same rank (1.00 is the best any rank-p update can do).
Clients' factors are float32, uploads float32; references in float64. Mean over 3 sketch seeds
(the worst of the 3 in brackets where it differs).

    .venv/bin/python benchmarks/secure_sketch.py > benchmarks/results/secure_sketch.md
"""

from __future__ import annotations

import statistics
import time

import torch

from florist.aggregation import ClientAdapter, LoraFactors, make_aggregator

SIDE = 1024
RANKS = [4, 4, 8, 8, 16, 16, 32, 64]
WIDTHS = [4, 8, 16, 32, 64, 152, 160]
TAUS = [0.9, 0.99, 1.0]
SEEDS = [0, 1, 2]


def orthonormal(generator: torch.Generator, size: int, rank: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64))[0]


def client(generator, spectrum: torch.Tensor, scale: float, weight: float, left=None, right=None) -> ClientAdapter:
    root = spectrum.sqrt()
    left = orthonormal(generator, SIDE, len(root)) if left is None else left
    right = orthonormal(generator, SIDE, len(root)) if right is None else right
    B, A = left * root / scale, (right * root).T
    return ClientAdapter({"x": LoraFactors(A=A.float().contiguous(), B=B.float().contiguous(), scale=scale)}, weight)


def decaying(rank: int, norm: float) -> torch.Tensor:
    values = 0.7 ** torch.arange(rank, dtype=torch.float64)
    return norm * values / values.norm()


def heterogeneous(generator) -> list[ClientAdapter]:
    """Norms over three decades, spectra decaying like 0.7^i, scales 16 / r, unequal examples."""
    return [client(generator, decaying(r, 10 ** (-3 * k / 7)), 16 / r, 50.0 + 37 * k) for k, r in enumerate(RANKS)]


def near_duplicates(generator) -> list[ClientAdapter]:
    """Pairs of clients whose directions agree up to 1e-3, unequal scales (rsLoRA-like) and norms."""
    clients = []
    for k, r in enumerate(RANKS):
        if k % 2 and r == RANKS[k - 1]:
            left = clients[-1][1] + 1e-3 * torch.randn(SIDE, r, generator=generator, dtype=torch.float64)
            right = clients[-1][2] + 1e-3 * torch.randn(SIDE, r, generator=generator, dtype=torch.float64)
        else:
            left, right = orthonormal(generator, SIDE, r), orthonormal(generator, SIDE, r)
        clients.append((client(generator, decaying(r, 10 ** (-k / 4)), 2 / r**0.5, 100.0 + 10 * k, left, right), left, right))
    return [c for c, _, _ in clients]


def dense(clients: list[ClientAdapter]) -> torch.Tensor:
    total = sum(c.weight for c in clients)
    return sum((c.weight / total) * c.modules["x"].scale * (c.modules["x"].B.double() @ c.modules["x"].A.double()) for c in clients)


def main() -> None:
    print("| input | l | upload / mean adapter | tau | rank (exact) | true energy kept | error | error / optimum | server s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, build in (("heterogeneous, 3 decades", heterogeneous), ("near-duplicate pairs", near_duplicates)):
        clients = build(torch.Generator().manual_seed(0))
        dw = dense(clients)
        true = torch.linalg.svdvals(dw)
        power = true.square()
        mean_adapter = statistics.mean(2 * SIDE * c.modules["x"].rank for c in clients)
        for width in WIDTHS:
            upload = (SIDE * width + 2 * width * SIDE) / mean_adapter
            for tau in TAUS:
                exact = make_aggregator("florist", tau=tau).aggregate(clients).modules["x"].rank
                ranks, kept, errors, ratios, seconds = [], [], [], [], []
                for seed in SEEDS:
                    start = time.perf_counter()
                    module = make_aggregator("florist-secure", tau=tau, sketch_width=width).aggregate(clients, seed=seed).modules["x"]
                    seconds.append(time.perf_counter() - start)
                    p = module.rank
                    error = (module.delta().double() - dw).norm().item()
                    optimum = power[p:].sum().sqrt().item()
                    ranks.append(p)
                    kept.append((power[:p].sum() / power.sum()).item())
                    errors.append(error / dw.norm().item())
                    ratios.append(error / optimum if optimum > 0 else float("nan") if error > 0 else 1.0)
                rank_text = f"{statistics.mean(ranks):.1f} ({exact})" if len(set(ranks)) > 1 else f"{ranks[0]} ({exact})"
                print(
                    f"| {label} | {width} | {upload:.2f}x | {tau} | {rank_text} | {statistics.mean(kept):.4f} [{min(kept):.4f}] | "
                    f"{statistics.mean(errors):.2e} [{max(errors):.2e}] | {statistics.mean(ratios):.3g} [{max(ratios):.3g}] | "
                    f"{statistics.mean(seconds):.3f} |"
                )


if __name__ == "__main__":
    main()
