"""`florist run`: one federation from a TOML configuration plus overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a federated fine-tuning (default: the embedded model and task, FLoRIST at tau 0.9)",
        description="Federate LoRA fine-tuning on Flower's simulation engine and write a run directory.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its last complete round, with its own configuration (--set may change rounds, "
        "timeouts and evaluation)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also show the workers' output and third-party warnings (hidden by default)"
    )
    parser.set_defaults(func=_run)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeatable --set SECTION.KEY=VALUE, for every command that runs a federation."""
    parser.add_argument("--config", help="TOML configuration file (default: the packaged default.toml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one configuration value, e.g. --set aggregation.tau=0.8 (repeatable)",
    )


def _run(args: argparse.Namespace) -> int:
    from florist.config import load_config
    from florist.federation.simulation import resume_config, run_federation

    if args.resume:
        if args.config:
            raise ValueError("--resume takes the run's own configuration; give --set overrides, not --config")
        resume = Path(args.resume)
        run_dir = run_federation(resume_config(resume, args.overrides), resume, verbose=args.verbose)
    else:
        run_dir = run_federation(load_config(args.config, args.overrides), verbose=args.verbose)
    summary = json.loads((run_dir / "summary.json").read_text())
    base, final = summary["base"], summary["final"]
    print(f"\nrun directory: {run_dir}")
    for key in sorted(set(base) & set(final)):
        if isinstance(base[key], float) and "/" not in key:
            print(f"  {key:<24} base {base[key]:8.4f}  ->  federated {final[key]:8.4f}")
    return 0
