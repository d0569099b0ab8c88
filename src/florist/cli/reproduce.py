"""`florist bench reproduce`: the paper's Dolly comparison as a resumable grid of runs, and its report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from florist.cli.arguments import positive_count, positive_seconds


def register(benchmarks) -> None:
    from florist.bench.reproduce.grid import GRIDS, PAPER_MODEL

    parser = benchmarks.add_parser(
        "reproduce",
        help="the FLoRIST paper's Dolly comparison, resumable, and its report",
        description="Runs every unfinished cell of a grid (setting x row x seed) under OUT/<setting>/<row>/seed<k>, "
        "then writes results.md, results.json and plots in OUT. Run the same command again to resume.",
    )
    parser.add_argument(
        "--grid", choices=sorted(GRIDS), default="full",
        help="full: issue 4's one-round grid; scale: issue 10's 3-round comparison; rounds: clients continuing from the global adapter or starting fresh, CPU-sized; quick: a pipeline check",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="results root (resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the grid's, 0 1 2; quick: 0)")
    parser.add_argument("--rows", nargs="+", metavar="LABEL", help="only these rows of the grid (their directory names; default: all)")
    parser.add_argument("--paper-scale", action="store_true", help="the paper's scale on a GPU: TinyLlama-1.1B, whole clients, bf16")
    parser.add_argument("--model", default=PAPER_MODEL, help=f"model of --paper-scale (default {PAPER_MODEL})")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the cells that exist")
    parser.add_argument(
        "--cell-timeout", type=positive_seconds, default=3600, help="seconds after which a federated cell is stopped and counted failed"
    )
    parser.add_argument(
        "--jobs", type=positive_count, default=1,
        help="federated cells run at once (default 1; on a GPU machine several share the GPU, with "
        "--set federation.engine=\"inline\" each in one process)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="a setting changed in every cell after the grid's scale (repeatable), e.g. federation.engine=\"inline\"",
    )
    parser.set_defaults(func=_reproduce)


def _reproduce(args: argparse.Namespace) -> int:
    from florist.bench.reproduce.grid import GRIDS, PAPER_SCALE
    from florist.bench.reproduce.report import write_report
    from florist.bench.reproduce.running import run_grid

    grid = GRIDS[args.grid]
    try:
        cells = grid.cells(args.seeds, args.rows)
    except ValueError as error:
        print(f"--rows: {error}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    failed = []
    if not args.report:
        paper = (*PAPER_SCALE, f"model.name={json.dumps(args.model)}") if args.paper_scale else ()
        failed = run_grid(cells, out, [*grid.scale, *paper, *args.overrides], args.cell_timeout, args.jobs)
    print(f"report: {write_report(out, len(grid.cells(args.seeds)))}")
    if failed:
        print(f"{len(failed)} cells failed; run the same command again to retry them", file=sys.stderr)
    return 1 if failed else 0
