"""`florist bench`: a group of benchmarks, one sub-subcommand each."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from florist.cli import reproduce
from florist.cli.run import add_config_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    _register_aggregate(benchmarks)
    _register_run(benchmarks)
    reproduce.register(benchmarks)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _tau(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"tau must be in (0, 1], got {value}")
    return number


def _register_aggregate(benchmarks) -> None:
    from florist.bench.aggregate import PRESETS, RANK_SETTINGS

    parser = benchmarks.add_parser(
        "aggregate",
        help="time every aggregation method on synthetic adapters at real model shapes",
        description="Median time, peak extra memory, FLOPs, download per client and rank sent for every "
        "aggregation method, each in a fresh process, on synthetic adapters with decaying spectra.",
    )
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="llama-7b")
    parser.add_argument("--ranks", choices=[*RANK_SETTINGS, "both"], default="hetero")
    parser.add_argument("--tau", type=_tau, default=0.9)
    parser.add_argument("--repeats", type=_positive, default=5, help="timed runs per method (median reported)")
    parser.add_argument(
        "--flexlora-modules", type=_positive, default=2, help="FlexLoRA is timed on the first N modules and extrapolated"
    )
    parser.add_argument(
        "--flexlora-repeats", type=_positive, default=1, help="timed FlexLoRA runs (each holds seconds-long dense SVDs)"
    )
    parser.add_argument(
        "--threads", type=_positive, help="torch threads per measurement (default: torch's, one per core); "
        "on a shared machine 1 avoids threads waiting on each other"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic adapters")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.set_defaults(func=_aggregate)


def _command_line(args: argparse.Namespace) -> str:
    options = ("preset", "ranks", "tau", "repeats", "flexlora_modules", "flexlora_repeats", "threads", "seed")
    return "florist bench aggregate " + " ".join(
        f"--{name.replace('_', '-')} {getattr(args, name)}" for name in options if getattr(args, name) is not None
    )


def _aggregate(args: argparse.Namespace) -> int:
    from florist.bench.aggregate import PRESETS, RANK_SETTINGS, Case, machine, method_runs, render, run_case, write_json

    import torch

    console = Console()
    threads = args.threads or torch.get_num_threads()
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    rank_settings = list(RANK_SETTINGS) if args.ranks == "both" else [args.ranks]
    runs = method_runs(args.tau, args.repeats, args.flexlora_modules, args.flexlora_repeats)
    report = {
        "command": _command_line(args),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(threads),
        "cases": [],
    }
    for preset in presets:
        for ranks in rank_settings:
            case = run_case(Case(preset, ranks, args.tau, args.seed), runs, threads, progress=lambda line: console.log(line))
            report["cases"].append(case)
            console.print(render(case))
    if args.json:
        write_json(args.json, report)
    return 0


def _register_run(benchmarks) -> None:
    parser = benchmarks.add_parser(
        "run",
        help="run a federation and report where its wall-clock time goes",
        description="Runs `florist run` (default: the default federation) and reports seconds per round, client "
        "training tokens per second, peak memory per process and the share of wall time outside client training.",
    )
    add_config_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from florist.bench.federation import bench_federation
    from florist.config import load_config
    from florist.reporting.run_directory import write_atomically

    run_dir, figures = bench_federation(load_config(args.config, args.overrides))
    figures = {"run_dir": str(run_dir), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **figures}
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        write_atomically(args.json, text + "\n")
    return 0
