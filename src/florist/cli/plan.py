"""`florist plan`: the memory and bytes a run configuration needs, before anyone trains."""

from __future__ import annotations

import argparse

from florist.cli.run import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate each site's peak memory, the bytes of a round and the server's aggregation memory",
        description="Print the memory plan of a run configuration from the model's config.json alone (no weights are "
        "loaded): per site the peak of a training step on a batch of full-length sequences, the bytes it sends and "
        "receives per round; for the server its model and a round's aggregation.",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from florist.config import load_config
    from florist.planning.plan import plan_run
    from florist.planning.table import plan_tables
    from florist.printing import make_console

    config = load_config(args.config, args.overrides)
    console = make_console()
    for table in plan_tables(plan_run(config), config.aggregation.method):
        console.print(table)
    return 0
