"""`florist aggregate`: combine K PEFT LoRA adapters into one with any aggregation method."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.table import Table
from rich.text import Text

from florist.aggregation import CRITERIA, METHODS, Aggregate, AggregationError, Aggregator, ClientAdapter, make_aggregator
from florist.lora.adapters import adapter_bytes, find_duplicate, read_adapters, read_config, write_adapter
from florist.printing import make_console

EPILOG = """\
Each DIR is a directory written by PeftModel.save_pretrained (adapter_config.json and
adapter_model.safetensors), all LoRA on the same base model and the same modules; ranks,
alphas and rsLoRA may differ. The output is one standard PEFT LoRA adapter whose update is
the method's aggregate (per-module ranks through rank_pattern/alpha_pattern). Tensors the
adapters train in full (biases with bias="lora_only" or "all", modules_to_save such as lm_head)
are written as the clients' weighted mean, whatever the method (--factors-only refuses them).
An adapter given twice (the same directory, or an identical copy) is refused unless
--allow-duplicates.

flexlora gives every client a truncation at its own rank; with one output directory that is
only well defined when all adapters share their ranks, so adapters of different ranks need
--rank R, which writes the rank-R truncation of the exact aggregate."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aggregate",
        help="aggregate PEFT LoRA adapters into one",
        description="Aggregate K PEFT LoRA adapters into one adapter.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--method", required=True, choices=list(METHODS), help="aggregation method")
    parser.add_argument("--tau", type=float, help="florist: share of spectral energy kept per module, in (0, 1] (default 0.9)")
    parser.add_argument(
        "--download-budget-mb", type=float, metavar="MB",
        help=(
            "florist, instead of --tau: MiB of tensor values in the output adapter, in the adapters' dtype (its LoRA factors "
            "and tensors trained in full; not the safetensors header or adapter_config.json), spent on ranks across all modules"
        ),
    )
    parser.add_argument(
        "--budget-criterion", choices=CRITERIA,
        help="florist with a budget: how components are ranked (default per-byte: energy share within the module per byte of it)",
    )
    parser.add_argument("--min-rank", type=int, help="florist with a budget: the rank every module gets (default 1)")
    parser.add_argument("--max-rank", type=int, help="florist: cap on any module's rank")
    parser.add_argument("--rank", type=int, help="flexlora: the single output rank (required when the adapters' ranks differ)")
    parser.add_argument("--weights", help="comma-separated client weights, e.g. example counts 1579,685,... (default: equal)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="output adapter directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="aggregate an adapter given twice (the same directory, or an identical copy) twice; refused otherwise",
    )
    parser.add_argument(
        "--factors-only",
        action="store_true",
        help="refuse adapters with tensors trained in full (biases, modules_to_save) instead of averaging them",
    )
    parser.add_argument("adapters", nargs="+", type=Path, metavar="DIR", help="client adapter directories")
    parser.set_defaults(func=run)


def parse_weights(text: str | None, count: int) -> list[float]:
    """`--weights` as numbers >= 0 with a positive sum, one per adapter; equal when not given."""
    if text is None:
        return [1.0] * count
    weights = []
    for item in text.split(","):
        try:
            weight = float(item)
        except ValueError:
            raise ValueError(f"--weights: {item.strip()!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--weights: {item.strip()} is not a finite number >= 0")
        weights.append(weight)
    if len(weights) != count:
        raise ValueError(f"--weights has {len(weights)} values for {count} adapters")
    if sum(weights) <= 0:
        raise ValueError(f"--weights sum to {sum(weights)}; at least one must be positive")
    return weights


def _aggregator(args: argparse.Namespace) -> Aggregator:
    """The method with its options; options of other methods are refused rather than ignored."""
    given = {
        "--tau": args.tau,
        "--max-rank": args.max_rank,
        "--rank": args.rank,
        "--download-budget-mb": args.download_budget_mb,
        "--budget-criterion": args.budget_criterion,
        "--min-rank": args.min_rank,
    }
    budget = {"--download-budget-mb", "--budget-criterion", "--min-rank"}
    applies = {"florist": {"--tau", "--max-rank", *budget}, "flexlora": {"--rank"}}.get(args.method, set())
    for flag, value in given.items():
        if value is not None and flag not in applies:
            raise ValueError(f"{flag} does not apply to --method {args.method}")
    if args.download_budget_mb is None and (args.budget_criterion is not None or args.min_rank is not None):
        raise ValueError("--budget-criterion and --min-rank apply to --download-budget-mb only")
    if args.method == "florist":
        options = {"tau": args.tau, "max_rank": args.max_rank, "download_budget_mb": args.download_budget_mb}
        if args.download_budget_mb is not None:
            options.update(min_rank=args.min_rank or 1)
            if args.budget_criterion:
                options.update(budget_criterion=args.budget_criterion)
        return make_aggregator("florist", **options)
    if args.method == "flexlora" and args.rank is not None:
        if args.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {args.rank}")
        return make_aggregator("flexlora", ranks=[args.rank] * len(args.adapters))
    return make_aggregator(args.method)


def _require_common_ranks(clients: Sequence[ClientAdapter]) -> None:
    for module in clients[0].modules:
        ranks = [client.modules[module].rank for client in clients]
        if len(set(ranks)) > 1:
            raise ValueError(
                f"flexlora: module {module} has ranks {ranks} across adapters, so there is no one client rank "
                "to write; pass --rank R"
            )


def _refuse_duplicates(paths: Sequence[Path], clients: Sequence[ClientAdapter]) -> None:
    duplicate = find_duplicate(paths, clients)
    if duplicate is not None:
        path, earlier, how = duplicate
        raise ValueError(
            f"{path} is {how} {earlier}: aggregating both would count that adapter twice; "
            "pass --allow-duplicates if that is what you want"
        )


def _aggregate(aggregator: Aggregator, clients: Sequence[ClientAdapter], paths: Sequence[Path]) -> Aggregate:
    try:
        return aggregator.aggregate(clients)
    except AggregationError as error:
        if error.client is None:
            raise
        raise ValueError(f"{paths[error.client]}: {error}") from None


def _report(aggregate: Aggregate, clients: Sequence[ClientAdapter], bytes_read: int, bytes_written: int, out: Path) -> None:
    table = Table("module", "client ranks", "rank kept", "energy kept")
    for name, module in aggregate.modules.items():
        ranks = ", ".join(str(client.modules[name].rank) for client in clients)
        energy = "-" if module.energy is None else f"{100 * module.energy:.2f}%"
        table.add_row(Text(name), ranks, str(module.rank), energy)
    for name in aggregate.dense:
        table.add_row(Text(name), "trained in full", "weighted mean", "-")
    console = make_console()
    console.print(table)
    # Paths are data, not rich markup; one unwrapped line keeps the summary greppable.
    summary = f"read {len(clients)} adapters: {bytes_read:,} bytes; wrote {out}: {bytes_written:,} bytes"
    console.print(Text(summary), soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    aggregator = _aggregator(args)
    weights = parse_weights(args.weights, len(args.adapters))
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; choose another --out or pass --overwrite")
    clients = read_adapters(args.adapters, weights, factors_only=args.factors_only)
    if not args.allow_duplicates:
        _refuse_duplicates(args.adapters, clients)
    if args.method == "flexlora" and args.rank is None:
        _require_common_ranks(clients)
    if args.download_budget_mb is not None:
        # The budget counts the values the adapter file holds, in the adapters' dtype, which it keeps.
        first = clients[0]
        value_bytes = next(iter(first.modules.values())).A.element_size()
        dense_bytes = sum(tensor.numel() * tensor.element_size() for tensor in first.dense.values())
        aggregator = replace(aggregator, wire_bytes=value_bytes, fixed_download_bytes=dense_bytes)
    aggregate = _aggregate(aggregator, clients, args.adapters)
    config = read_config(args.adapters[0])
    written = write_adapter(args.out, aggregate.modules, config, overwrite=args.overwrite, dense=aggregate.dense)
    _report(aggregate, clients, sum(adapter_bytes(path) for path in args.adapters), written, args.out)
    return 0
