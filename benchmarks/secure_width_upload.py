"""florist-secure's upload per client with one sketch width against per-module widths, COMPUTED from
the kept ranks a finished run recorded (issue 21): not a new run.

The input (benchmarks/results/secure/kept_ranks_seed0.json) holds, for each round of the secure grid's
seed-0 cell (heterogeneous ranks, tau 0.9, SmolLM2-135M q_proj and v_proj, 30 layers), the width the
run used, its bytes up, the clients' ranks and each module's kept rank. For each round it gives a
client's float32 sketch upload:

- one width (the run's rule, checked against the recorded width; the run's recorded bytes beside it,
  of the sketches as they were then, before a module with m < n was sketched as its transpose):
  twice the largest rank kept in any module last round, at least MIN_SKETCH_WIDTH (round 1: the
  widest client rank);
- per-module widths (`aggregation.sketch.automatic_widths`): twice the rank THAT module kept.

Each against a mean client's float32 adapter, (m + n) times the mean client rank, summed over modules.
The kept ranks are the run's own: with narrower sketches a real run's kept ranks, and so the next
widths, may differ (a sketch narrower than what tau would keep caps the rank at its width).

    .venv/bin/python benchmarks/secure_width_upload.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from florist.aggregation.sketch import automatic_widths, sketch_entries

HIDDEN, KV = 576, 192
"""SmolLM2-135M's hidden size and its key/value width: q_proj is HIDDEN x HIDDEN, v_proj KV x HIDDEN."""
FLOAT32 = 4
DEFAULT = Path(__file__).parent / "results" / "secure" / "kept_ranks_seed0.json"


def module_shape(name: str) -> tuple[int, int]:
    return {"q_proj": (HIDDEN, HIDDEN), "v_proj": (KV, HIDDEN)}[name.rsplit(".", 1)[1]]


def upload_bytes(shapes: dict[str, tuple[int, int]], widths: dict[str, int]) -> int:
    """A client's float32 sketches (the weight and cut scalars aside)."""
    return FLOAT32 * sketch_entries(shapes, widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=Path, default=DEFAULT)
    args = parser.parse_args()
    rounds = json.loads(args.ranks.read_text())["rounds"]
    shapes = {name: module_shape(name) for name in rounds[0]["ranks"]}
    print("| round | one width (recorded) | its upload MB (recorded per client) | per-module widths: min / mean / max | upload MB | mean adapter MB | one width / adapter | per-module / adapter |")
    print("|---|---|---|---|---|---|---|---|")
    kept = None
    for record in rounds:
        first = max(record["client_ranks"])
        per_module = automatic_widths(shapes, kept, first)
        single = automatic_widths(shapes, None if kept is None else dict.fromkeys(shapes, max(kept.values())), first)
        assert max(single.values()) == record["sketch_width"], (record["round"], single, record["sketch_width"])
        adapter = FLOAT32 * statistics.mean(record["client_ranks"]) * sum(m + n for m, n in shapes.values())
        one, ours = upload_bytes(shapes, single), upload_bytes(shapes, per_module)
        recorded = record["up_bytes"] / len(record["client_ranks"])
        values = list(per_module.values())
        print(
            f"| {record['round']} | {record['sketch_width']} | {one / 1e6:.2f} ({recorded / 1e6:.2f}) | {min(values)} / {statistics.mean(values):.1f} / {max(values)} "
            f"| {ours / 1e6:.2f} | {adapter / 1e6:.2f} | {one / adapter:.2f}x | {ours / adapter:.2f}x |"
        )
        kept = record["ranks"]


if __name__ == "__main__":
    main()
