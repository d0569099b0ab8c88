"""The ServerApp: the strategy's rounds, server-side evaluation, and the run directory."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.table import Table

from florist.config import RunConfig
from florist.evaluation.mmlu import load_mmlu_file, load_mmlu_hub
from florist.federation.datasets import federated_data
from florist.federation.resources import peak_rss_mib
from florist.federation.server_model import ServerModel
from florist.federation.settings import config_from_run_config
from florist.federation.strategy import LoraStrategy, RoundReport
from florist.reporting.plots import plot_run
from florist.reporting.run_directory import RunDirectory

console = Console(stderr=True)


def mmlu_questions(config: RunConfig):
    source = config.evaluation.mmlu
    if not source:
        return None
    return load_mmlu_file(source) if Path(source).exists() else load_mmlu_hub()


def round_record(report: RoundReport | None, server_round: int, evaluation: dict, timing: dict) -> dict:
    """One line of metrics.jsonl."""
    record: dict = {"round": server_round, **timing}
    if report is not None:
        clients = report.clients
        record.update(
            train_loss=sum(c.train_loss * c.examples for c in clients) / sum(c.examples for c in clients),
            aggregation_seconds=report.aggregation_seconds,
            clients=[vars(c) for c in clients],
            ranks=report.ranks,
            energy=report.energy,
            total_rank=sum(report.ranks.values()),
        )
    record["evaluation"] = evaluation
    return record


def show_round(record: dict) -> None:
    table = Table(title=f"round {record['round']}", title_justify="left")
    for column in ("client", "rank", "examples", "loss", "train s", "down KiB", "up KiB"):
        table.add_column(column, justify="right")
    for c in record.get("clients", []):
        table.add_row(
            str(c["partition"]), str(c["rank"]), str(c["examples"]), f"{c['train_loss']:.3f}",
            f"{c['train_seconds']:.1f}", f"{c['bytes_down'] / 1024:.0f}", f"{c['bytes_up'] / 1024:.0f}",
        )
    console.print(table)
    if "total_rank" in record:
        console.print(f"aggregation {record['aggregation_seconds']:.3f} s, total rank kept {record['total_rank']}")
    if record["evaluation"]:
        shown = {k: round(v, 4) for k, v in record["evaluation"].items() if isinstance(v, float)}
        console.print(f"evaluation: {shown}")


def serve(config: RunConfig, grid: Grid) -> Path:
    """Run every round, evaluate, and write the run directory; returns its path."""
    start = time.perf_counter()
    run = RunDirectory.create(config)
    console.print(f"run directory: {run.path}")
    data = federated_data(config)
    mmlu = mmlu_questions(config)
    server = ServerModel(config)
    run.write_json("precision.json", server.precision.as_record())
    strategy = LoraStrategy(config, server.in_features)
    rounds = config.federation.rounds

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        report = strategy.reports[-1] if server_round else None
        if report is not None and config.output.save_client_adapters:
            partitions = [client.partition for client in report.clients]
            server.save_clients(run.path / "clients" / f"round{server_round}", strategy.received, partitions)
        evaluation, evaluation_start = {}, time.perf_counter()
        wanted = config.evaluation.base if server_round == 0 else config.evaluation.every_round
        if wanted or server_round == rounds:
            adapter = None if strategy.merges or strategy.current is None else strategy.current.modules
            server.set_state(strategy.updates, adapter)
            evaluation = server.evaluate(data.test, mmlu, data.validation)
        timing = {
            "evaluation_seconds": time.perf_counter() - evaluation_start,
            "wall_seconds": time.perf_counter() - start,
            "server_peak_rss_mib": peak_rss_mib(),
        }
        record = round_record(report, server_round, evaluation, timing)
        run.record_round(record)
        show_round(record)
        return MetricRecord({k: v for k, v in evaluation.items() if isinstance(v, (int, float))})

    strategy.start(grid, ArrayRecord(), num_rounds=rounds, evaluate_fn=evaluate_round)

    if strategy.merges:
        merged, adapter = strategy.updates[:-1], strategy.updates[-1]
    else:
        merged, adapter = [], strategy.current.modules
    if config.output.save_model:
        server.save(run.path / "final", merged, adapter)
    plot_run(run.rounds, run.path / "plots")
    base, final = run.rounds[0]["evaluation"], run.rounds[-1]["evaluation"]
    run.write_json("summary.json", {"base": base, "final": final, "rounds": rounds, "method": config.aggregation.method})
    return run.path


def build_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to `config`, or reading it from the run config when None (flwr run)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(config or config_from_run_config(context.run_config), grid)

    return app


app = build_server_app()
