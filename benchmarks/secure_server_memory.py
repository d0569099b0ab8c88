"""`florist plan`'s server memory for florist-secure against the peak a round's aggregation reaches.

Each width runs in a fresh Python process: it reads its resident set (the baseline), then adds
`--sites` float32 sketch uploads of the embedded model's q_proj and v_proj (30 layers) at that width
into aggregation/sketch.py's SketchSum, one at a time as a round receives them, and reconstructs
the global update at tau 0.9. The measured peak is the process's high-water mark (VmHWM) above the
baseline, with glibc's mmap threshold lowered so that freed large blocks go back to the kernel.
The planned peak is planning/memory.py's `secure_aggregation_memory` (replies held, work, result).

    python benchmarks/secure_server_memory.py --widths 8 64 128 576
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from rich.table import Table

from florist.printing import make_console

MIB = 2**20
SHAPES = {f"model.layers.{layer}.self_attn.{name}": shape for layer in range(30) for name, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576)))}
"""SmolLM2-135M's adapted modules at the default target modules (q_proj, v_proj): (out, in)."""


def measure(width: int, sites: int) -> dict:
    """In this (fresh) process: the peak resident memory above the baseline of one round's sum of
    `sites` uploads and its reconstruction."""
    import time

    import torch

    from florist.aggregation.sketch import SecureFLoRIST, sketch_key, sketch_shapes
    from florist.federation.resources import proc_status_kib, reset_peak_rss, set_mmap_threshold

    set_mmap_threshold(64 * 2**10)
    generator = torch.Generator().manual_seed(0)
    uploads_shapes = {sketch_key(name, part): part_shape for name, shape in SHAPES.items() for part, part_shape in sketch_shapes(shape, width).items()}
    baseline = proc_status_kib("VmRSS")
    if not reset_peak_rss():
        raise OSError("/proc/self/clear_refs cannot be written: no peak to measure")
    start = time.perf_counter()
    total = SecureFLoRIST(tau=0.9).sum_of_sketches(7, SHAPES)
    for _ in range(sites):
        upload = {key: torch.randn(shape, generator=generator) for key, shape in uploads_shapes.items()}
        upload["weight"] = torch.tensor(1.0, dtype=torch.float64)
        total.add(upload)
        del upload
    aggregate = total.result()
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    return {"peak_bytes": (peak - baseline) * 1024, "seconds": seconds, "rank": sum(m.rank for m in aggregate.modules.values())}


def planned(width: int) -> dict:
    from florist.planning.memory import secure_aggregation_memory

    memory = secure_aggregation_memory(SHAPES, dict.fromkeys(SHAPES, width))
    return {"planned_bytes": memory.peak, "planned_parts": memory.parts()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 64, 128, 576])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.25)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a width: measure it in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.sites)))
        return 0
    rows = []
    for width in args.widths:
        child = subprocess.run([sys.executable, __file__, "--sites", str(args.sites), "--one", str(width)], capture_output=True, text=True, check=True)
        row = {"width": width, **json.loads(child.stdout.splitlines()[-1]), **planned(width)}
        row["error"] = row["planned_bytes"] / row["peak_bytes"] - 1
        rows.append(row)
    table = Table(title=f"florist-secure's server: a round of {args.sites} sites, measured against `florist plan` (embedded model, q_proj and v_proj)")
    for column in ("width l", "held MiB", "work MiB", "result MiB", "planned MiB", "measured MiB", "plan - measured", "seconds"):
        table.add_column(column, justify="right")
    for row in rows:
        parts = row["planned_parts"]
        table.add_row(
            str(row["width"]), f"{parts['received'] / MIB:.0f}", f"{parts['work'] / MIB:.0f}", f"{parts['result'] / MIB:.0f}",
            f"{row['planned_bytes'] / MIB:.0f}", f"{row['peak_bytes'] / MIB:.0f}", f"{row['error']:+.1%}", f"{row['seconds']:.1f}",
        )
    make_console().print(table)
    misses = [str(row["width"]) for row in rows if abs(row["error"]) > args.tolerance]
    if misses:
        print(f"beyond {args.tolerance:.0%}: widths {', '.join(misses)}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
