"""The `florist` command: one thin module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ("run", "plan", "aggregate", "bench", "site-worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florist", description="Federated LoRA fine-tuning with FLoRIST.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"florist.cli.{name.replace('-', '_')}").register(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as error:
        # Bad input is the user's to fix: one line, no traceback (FLORIST_DEBUG=1 shows it).
        if os.environ.get("FLORIST_DEBUG"):
            raise
        print(f"florist: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
