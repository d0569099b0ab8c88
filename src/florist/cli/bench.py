"""`florist bench`: a group of benchmarks, one sub-subcommand each."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from florist.cli import reproduce
from florist.cli.arguments import positive_count
from florist.cli.run import add_config_arguments
from florist.printing import make_console


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    _register_aggregate(benchmarks)
    _register_run(benchmarks)
    reproduce.register(benchmarks)


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
    parser.add_argument("--repeats", type=positive_count, default=5, help="timed runs per method (median reported)")
    parser.add_argument(
        "--flexlora-modules", type=positive_count, default=2, help="FlexLoRA is timed on the first N modules and extrapolated"
    )
    parser.add_argument(
        "--flexlora-repeats", type=positive_count, default=1, help="timed FlexLoRA runs (each holds seconds-long dense SVDs)"
    )
    parser.add_argument(
        "--threads", type=positive_count, help="torch threads per measurement (default: torch's, one per core); "
        "on a shared machine 1 avoids threads waiting on each other"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic adapters")
    parser.add_argument(
        "--clients", type=_client_counts, help="comma-separated client counts, e.g. 8,32,100,300: instead of every "
        "method on the rank setting's 8 clients, FLoRIST as a server streams each count of clients (the setting "
        "cycled), beside the exact batched route and FlexLoRA timed on --flexlora-modules modules"
    )
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--plot", type=Path, help="with --clients: also plot seconds and memory against the client count (PNG)")
    parser.set_defaults(func=_aggregate)


def _client_counts(value: str) -> list[int]:
    try:
        counts = [int(item) for item in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients wants comma-separated whole numbers, got {value!r}") from None
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"--clients must all be >= 1, got {value}")
    return counts


def _command_line(args: argparse.Namespace) -> str:
    options = ("preset", "ranks", "tau", "repeats", "flexlora_modules", "flexlora_repeats", "threads", "seed", "clients")

    def text(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return "florist bench aggregate " + " ".join(
        f"--{name.replace('_', '-')} {text(getattr(args, name))}" for name in options if getattr(args, name) is not None
    )


def _aggregate(args: argparse.Namespace) -> int:
    from florist.bench.aggregate import (
        PRESETS,
        RANK_SETTINGS,
        Case,
        machine,
        method_runs,
        plot_scaling,
        render,
        run_case,
        scaling_runs,
        write_json,
    )

    import torch

    if args.plot and not args.clients:
        raise ValueError("--plot needs --clients: it draws time and memory against the client count")
    console = make_console()
    threads = args.threads or torch.get_num_threads()
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    rank_settings = list(RANK_SETTINGS) if args.ranks == "both" else [args.ranks]
    if args.clients:
        runs = scaling_runs(args.tau, args.repeats, args.flexlora_modules, args.flexlora_repeats)
    else:
        runs = method_runs(args.tau, args.repeats, args.flexlora_modules, args.flexlora_repeats)
    report = {
        "command": _command_line(args),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(threads),
        "cases": [],
    }
    for preset in presets:
        for ranks in rank_settings:
            for clients in args.clients or [None]:
                case = Case(preset, ranks, args.tau, args.seed, clients)
                case = run_case(case, runs, threads, progress=lambda line: console.print(f"{datetime.now():%H:%M:%S} {line}"))
                report["cases"].append(case)
                console.print(render(case))
                if args.json:  # after every case, so a long run keeps what it measured
                    write_json(args.json, report)
    if args.plot:
        plot_scaling(report, args.plot)
    return 0


def _register_run(benchmarks) -> None:
    parser = benchmarks.add_parser(
        "run",
        help="run a federation and report where its wall-clock time goes",
        description="Runs `florist run` (default: the default federation) and reports the share of wall time in "
        "each stage (start-up, training, evaluation, aggregation, messaging, finishing), client training tokens per "
        "second per worker, the training precision, peak memory per process and the machine.",
    )
    add_config_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from florist.bench.federation import bench_federation
    from florist.config import load_config
    from florist.files import write_atomically

    run_dir, figures = bench_federation(load_config(args.config, args.overrides))
    figures = {"run_dir": str(run_dir), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **figures}
    table = Table(title=f"{figures['total_seconds']:.0f} s in all", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for stage, seconds in figures["stage_seconds"].items():
        table.add_row(stage, f"{seconds:.1f}", f"{figures['stage_share'][stage]:.1%}")
    console = make_console()
    console.print(table)
    machine = figures["machine"]
    console.print(
        f"outside training {figures['share_outside_training']:.1%}; "
        f"{figures['training_tokens_per_second_per_worker']:.0f} training tokens/s per worker in {figures['precision']} "
        f"({figures['precision_reason']}); {machine['cpu']}, {machine['cores']} cores, flags {' '.join(machine['cpu_flags'])}; "
        f"load {figures['load_average_before'][0]:.1f} -> {figures['load_average_after'][0]:.1f}"
    )
    if args.json:
        write_atomically(args.json, json.dumps(figures, indent=2) + "\n")
    return 0
