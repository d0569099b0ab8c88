"""The Frobenius norms of the clients' own LoRA updates in a finished run that saved them
(`output.save_client_adapters = true`), and how many a DP clip would scale (issue 21).

Client-level DP clips each site's whole update (all modules together) to `privacy.clip_norm`; the
secure grid's DP rows use 1.0, set from the norm of the round's MEAN update before any client's own
norm was measured. This reads each round's saved client adapters (RUN/clients/round<k>/clients.json
and its adapter directories), measures every client's update norm from its factors' Gram matrices
(`florist.aggregation.norms.adapter_norm`, the function the sites clip with), and prints, per round,
the clients' norms by rank and the share a clip of C would scale, for each --clip.

    .venv/bin/python benchmarks/client_update_norms.py RUN [--clip 1.0 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from florist.aggregation.norms import adapter_norm
from florist.lora.adapters import read_adapter


def round_norms(round_dir: Path) -> list[tuple[int, int, float]]:
    """(partition, rank, update norm) of every client a round saved."""
    listed = json.loads((round_dir / "clients.json").read_text())
    norms = []
    for entry in listed:
        _, client = read_adapter(round_dir / entry["adapter"], entry["weight"], factors_only=True)
        rank = max(factors.A.shape[0] for factors in client.modules.values())
        norms.append((entry["partition"], rank, adapter_norm(client.modules)))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory whose clients/ holds the saved client adapters")
    parser.add_argument("--clip", type=float, nargs="+", default=[1.0], help="clip norms C to count against")
    args = parser.parse_args()
    rounds = sorted((args.run / "clients").glob("round*"), key=lambda path: int(path.name.removeprefix("round")))
    if not rounds:
        raise SystemExit(f"{args.run / 'clients'}: no saved client adapters (run with output.save_client_adapters=true)")
    header = "| round | clients | norm by client (rank: norm) | median | min | max | " + " | ".join(f"scaled at C={c:g}" for c in args.clip) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for round_dir in rounds:
        norms = round_norms(round_dir)
        values = [norm for _, _, norm in norms]
        by_client = ", ".join(f"r{rank}: {norm:.3g}" for _, rank, norm in sorted(norms))
        clipped = " | ".join(f"{sum(v > c for v in values)}/{len(values)}" for c in args.clip)
        print(
            f"| {round_dir.name.removeprefix('round')} | {len(values)} | {by_client} | {statistics.median(values):.3g} "
            f"| {min(values):.3g} | {max(values):.3g} | {clipped} |"
        )


if __name__ == "__main__":
    main()
