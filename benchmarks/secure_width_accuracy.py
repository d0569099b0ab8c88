"""Secure FLoRIST's sketch width rules on REAL client adapters (issue 21): upload against accuracy.

Reads the client adapters a plain FLoRIST run saved (output.save_client_adapters: RUN/clients/roundR/K/,
a PEFT directory per client, and clients.json with each one's weight; RUN/metrics.jsonl has each
client's examples and the ranks plain FLoRIST kept) and, for each round and width rule, sketches
every client, sums the sketches and reconstructs as florist-secure's server does
(`client_sketch`, `SketchSum`), at the run's tau. Each rule sizes a module's (l, l') from k, the rank
plain FLoRIST kept in that module the PREVIOUS round; round 1, where no rank was kept, sizes l at the
widest client rank (today's rule) and l' by the rule:

    l = 2k,     l' = 2l       florist-secure's automatic widths (`automatic_widths`, `widths`)
    l = 2k,     l' = l + p
    l = k + p,  l' = l + p    randomized SVD's fixed oversampling (Tropp et al. 2017)
    l = k + p,  l' = 2l
    l = k,      l' = 2l
    l' = 2l, l the widest whose upload is at most 3x a mean client's adapter (every round, whatever k)
    two passes, l = k + 8: not florist-secure's single pass, a second round trip (`two_pass_modules`);
      upload l (m + n) over both trips

all at least MIN_SKETCH_WIDTH and at most what the module's sides allow (`widths`). Reported per rule
and round, over every module together (and the worst module): a client's upload, sum of m l + l' n,
over a mean client's adapter, sum of r (m + n) (the same dtype for both); the ranks kept, secure
against plain; and relative errors ||dW - D||_F / ||dW||_F over all modules of: the secure
reconstruction, plain FLoRIST at tau (its truncation error) and the Eckart-Young optimum at the rank
the secure one kept. `extra` is (secure - plain) / plain: how much the sketch adds to tau's own
truncation error. Mean over the test matrices' seeds [worst]. Float64 throughout: the error of the
sketch, not of float32 uploads (a few 1e-7, BENCHMARKS.md).

    .venv/bin/python benchmarks/secure_width_accuracy.py /work/runs/secure-g/heterogeneous/florist-tau0.90/seed0 \
        > benchmarks/results/secure_width_accuracy.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from florist.aggregation import make_aggregator
from florist.aggregation.sketch import MIN_SKETCH_WIDTH, SecureFLoRIST, SketchSum, automatic_widths, client_sketch, sketching_matrices, widths
from florist.aggregation.types import ClientAdapter, GlobalModule
from florist.lora.adapters import read_adapters


@dataclass(frozen=True)
class Rule:
    label: str
    multiple: int
    """l = multiple * k + oversampling (0: l is the widest a 3x upload allows, whatever k)."""
    oversampling: int = 0
    co_oversampling: int | None = None
    """l' = l + this; None: l' = 2l."""
    two_pass: bool = False
    """Not florist-secure's single pass: a second round trip in which each client sends Q^T (its
    update) for the Q of the first pass's summed range sketch (l' unused)."""

    def sides(self, shapes: dict[str, tuple[int, int]], kept: dict[str, int] | None, first: int, mean_rank: float) -> dict[str, tuple[int, int]]:
        def width(name: str) -> int:
            m, n = shapes[name]
            if self.multiple == 0:  # m l + 2 l n <= 3 r (m + n)
                return math.floor(3 * mean_rank * (m + n) / (m + 2 * n))
            return first if kept is None else self.multiple * kept[name] + self.oversampling

        sides = {}
        for name, (m, n) in shapes.items():
            sketch = min(max(MIN_SKETCH_WIDTH, width(name)), m, n)
            sides[name] = (sketch, min(2 * sketch if self.co_oversampling is None else sketch + self.co_oversampling, m))
        return sides


RULES = (
    Rule("l=2k, l'=2l (today)", 2),
    Rule("l=2k, l'=l+8", 2, co_oversampling=8),
    Rule("l=k+4, l'=l+4", 1, 4, 4),
    Rule("l=k+8, l'=l+8", 1, 8, 8),
    Rule("l=k+16, l'=l+16", 1, 16, 16),
    Rule("l=k+8, l'=2l", 1, 8),
    Rule("l=k, l'=2l", 1),
    Rule("l'=2l, l widest within 3x", 0),
    Rule("two passes, l=k+8", 1, 8, two_pass=True),
)


def read_round(run: Path, server_round: int, examples: dict[int, int]) -> list[ClientAdapter]:
    """The round's clients, each weighted by its examples (the run's metrics), checked against the
    weight the run saved beside it."""
    directory = run / "clients" / f"round{server_round}"
    listing = json.loads((directory / "clients.json").read_text())
    for entry in listing:
        if entry["weight"] != examples[entry["partition"]]:
            raise SystemExit(f"{directory}/clients.json: partition {entry['partition']} weighs {entry['weight']}, metrics.jsonl gives {examples[entry['partition']]} examples")
    return read_adapters([directory / entry["adapter"] for entry in listing], [examples[entry["partition"]] for entry in listing])


def dense_update(clients: list[ClientAdapter], name: str) -> torch.Tensor:
    total = sum(c.weight for c in clients)
    return sum((c.weight / total) * c.modules[name].scale * (c.modules[name].B.double() @ c.modules[name].A.double()) for c in clients)


def secure_modules(clients, seed: int, shapes, sides, tau: float):
    total = SketchSum(SecureFLoRIST(tau=tau), seed, shapes)
    for client in clients:
        total.add(client_sketch(client.modules, client.weight, seed, sides, torch.float64))
    return total.result().modules


def two_pass_modules(updates: dict[str, torch.Tensor], seed: int, sides, tau: float) -> dict[str, GlobalModule]:
    """Two-pass randomized SVD from sums (Halko, Martinsson and Tropp 2011): Q = orth(dW Omega) from the
    first pass's summed range sketches, then the summed Q^T dW (l x n) and its SVD. Computed from dW
    itself: the sums are dW's sketches up to rounding. tau's share is of dW's energy as the range
    sketch estimates it, (n / l) ||dW Omega||_F^2 (unbiased for Omega of l orthonormal columns)."""
    aggregator, modules = SecureFLoRIST(tau=tau), {}
    for name, dw in updates.items():
        omega, _ = sketching_matrices(seed, name, tuple(dw.shape), (sides[name][0], sides[name][0]))
        y = dw @ omega
        q = torch.linalg.qr(y)[0]
        u, s, vh = torch.linalg.svd(q.mT @ dw, full_matrices=False)
        missed = (y.square().sum() * dw.shape[1] / y.shape[1] - s.square().sum()).clamp(min=0)
        rank = int(aggregator.rank_rule(tuple(dw.shape))(torch.cat([s, missed.sqrt()[None]])[None])[0])
        modules[name] = GlobalModule(A=vh[:rank], B=(q @ u[:, :rank]) * s[:rank], singular_values=s)
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a plain FLoRIST run directory that saved its client adapters")
    parser.add_argument("--seeds", type=int, default=5, help="test-matrix seeds per round and rule")
    parser.add_argument("--modules", type=Path, help="also write every module's numbers here (JSON lines)")
    args = parser.parse_args()
    # One thread: on 2 shared cores, torch's second thread waiting on a busy core made it 60x slower.
    torch.set_num_threads(1)
    records = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    tau = float(next(line.split("=")[1] for line in (args.run / "config.toml").read_text().splitlines() if line.startswith("tau ")))
    rounds = [r for r in records if r.get("clients")]
    module_rows = []
    print(f"tau {tau}, {args.seeds} seeds; mean [worst] over seeds")
    print()
    print("| round | rule | upload / mean adapter | ranks kept, secure / plain (sum) | modules below plain's rank | secure error | plain tau error | optimum at secure's rank | extra over plain | worst module: extra | secure vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    kept = None
    start = time.perf_counter()
    for record in rounds:
        server_round = record["round"]
        examples = {c["partition"]: c["examples"] for c in record["clients"]}
        clients = read_round(args.run, server_round, examples)
        shapes = {name: f.shape for name, f in clients[0].modules.items()}
        first = max(f.rank for c in clients for f in c.modules.values())
        plain = make_aggregator("florist", tau=tau).aggregate(clients).modules
        plain_ranks = {name: module.rank for name, module in plain.items()}
        if record.get("ranks") and record["ranks"] != plain_ranks:
            raise SystemExit(f"round {server_round}: plain FLoRIST keeps other ranks than the run recorded")
        updates = {name: dense_update(clients, name) for name in shapes}
        power = {name: torch.linalg.svdvals(dw).square() for name, dw in updates.items()}
        norm2 = {name: float(p.sum()) for name, p in power.items()}
        plain_error2 = {name: float((plain[name].delta().double() - updates[name]).square().sum()) for name in shapes}
        whole = math.sqrt(sum(norm2.values()))
        adapter = statistics.mean(sum(f.rank * (f.shape[0] + f.shape[1]) for f in c.modules.values()) for c in clients)
        mean_rank = statistics.mean(next(iter(c.modules.values())).rank for c in clients)
        for rule in RULES:
            sides = rule.sides(shapes, kept, first, mean_rank)
            if rule == RULES[0]:  # the library's own rule
                assert sides == {name: widths(shape, width) for (name, shape), width in zip(shapes.items(), automatic_widths(shapes, kept, first).values())}
            upload = sum(m * l + (l if rule.two_pass else lc) * n for (m, n), (l, lc) in ((shapes[name], sides[name]) for name in shapes))
            runs = []
            for seed in range(args.seeds):
                secure = two_pass_modules(updates, seed, sides, tau) if rule.two_pass else secure_modules(clients, seed, shapes, sides, tau)
                rows = {}
                for name, dw in updates.items():
                    d = secure[name].delta().double()
                    rank = secure[name].rank
                    rows[name] = {
                        "rank": rank,
                        "error2": float((d - dw).square().sum()),
                        "optimum2": float(power[name][rank:].sum()),
                        "to_plain2": float((d - plain[name].delta().double()).square().sum()),
                    }
                runs.append(rows)
                for name, row in rows.items():
                    module_rows.append({
                        "round": server_round, "rule": rule.label, "seed": seed, "module": name, "l": sides[name][0], "l_co": sides[name][1],
                        "upload": (shapes[name][0] * sides[name][0] + sides[name][1 - rule.two_pass] * shapes[name][1]) / (mean_rank * sum(shapes[name])),
                        "plain_rank": plain_ranks[name], "secure_rank": row["rank"],
                        "secure_error": math.sqrt(row["error2"] / norm2[name]), "plain_error": math.sqrt(plain_error2[name] / norm2[name]),
                        "optimum_error": math.sqrt(row["optimum2"] / norm2[name]),
                    })

            def overall(key: str) -> list[float]:
                return [math.sqrt(sum(rows[name][key] for name in rows)) / whole for rows in runs]

            secure_error, optimum, to_plain = overall("error2"), overall("optimum2"), overall("to_plain2")
            plain_error = math.sqrt(sum(plain_error2.values())) / whole
            extra = [(e - plain_error) / plain_error for e in secure_error]
            worst = [max((math.sqrt(rows[name]["error2"]) - math.sqrt(plain_error2[name])) / math.sqrt(plain_error2[name]) for name in rows) for rows in runs]
            ranks = [sum(rows[name]["rank"] for name in rows) for rows in runs]
            below = [sum(rows[name]["rank"] < plain_ranks[name] for name in rows) for rows in runs]
            print(
                f"| {server_round} | {rule.label} | {upload / adapter:.2f}x | {statistics.mean(ranks):.0f} / {sum(plain_ranks.values())} "
                f"| {statistics.mean(below):.1f} [{max(below)}] of {len(shapes)} | {statistics.mean(secure_error):.4f} [{max(secure_error):.4f}] | {plain_error:.4f} "
                f"| {statistics.mean(optimum):.4f} | {statistics.mean(extra):+.1%} [{max(extra):+.1%}] | {statistics.mean(worst):+.1%} [{max(worst):+.1%}] "
                f"| {statistics.mean(to_plain):.4f} [{max(to_plain):.4f}] |",
                flush=True,
            )
        kept = plain_ranks
    print()
    print("Per module, by kind, over every round, module and seed: the module's upload over a mean client's adapter")
    print("of it, and its secure error over plain FLoRIST's (tau's truncation error), median [worst].")
    print()
    print("| rule | module | upload / mean adapter | secure error / plain's | rank, secure - plain |")
    print("|---|---|---|---|---|")
    for rule in RULES:
        for kind in sorted({row["module"].rsplit(".", 1)[1] for row in module_rows}):
            rows = [row for row in module_rows if row["rule"] == rule.label and row["module"].endswith(kind)]
            ratios = [row["secure_error"] / row["plain_error"] for row in rows]
            upload = [row["upload"] for row in rows]
            ranks = [row["secure_rank"] - row["plain_rank"] for row in rows]
            print(
                f"| {rule.label} | {kind} | {min(upload):.2f}-{max(upload):.2f}x | {statistics.median(ratios):.2f} [{max(ratios):.2f}] "
                f"| {statistics.mean(ranks):+.1f} [{min(ranks):+d}, {max(ranks):+d}] |"
            )
    print()
    print(f"{time.perf_counter() - start:.0f} s")
    if args.modules:
        args.modules.write_text("".join(json.dumps(row) + "\n" for row in module_rows))


if __name__ == "__main__":
    main()
