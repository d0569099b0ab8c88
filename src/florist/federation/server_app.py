"""The ServerApp: rounds, evaluation, checkpoints and the run directory."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from florist.config import RunConfig
from florist.evaluation.mmlu import load_mmlu
from florist.federation import checkpoint
from florist.federation.console import show_round
from florist.federation.datasets import FederatedData, federated_data
from florist.federation.reports import EvaluationReport, RoundReport, TauSelection
from florist.federation.resources import peak_rss_mib
from florist.federation.secure import privacy_summary
from florist.federation.rounds import evaluate_stage, select_stage, train_stage
from florist.federation.server_model import ServerModel
from florist.federation.settings import as_deployed, config_from_run_config, resume_from_run_config
from florist.federation.strategy import LoraStrategy
from florist.reporting.plots import plot_run
from florist.reporting.run_directory import RunDirectory


def mmlu_questions(config: RunConfig):
    return load_mmlu(config.evaluation.mmlu) if config.evaluation.mmlu else None


def round_record(
    server_round: int,
    report: RoundReport | None,
    evaluation: dict,
    federated: EvaluationReport | None,
    timing: dict,
    selection: TauSelection | None = None,
) -> dict:
    """One line of metrics.jsonl."""
    record: dict = {"round": server_round, **timing}
    stages = [stage for stage in (report, selection, federated) if stage is not None]
    record["communication"] = {
        "down_bytes": sum(sum(stage.bytes_down.values()) for stage in stages),
        "up_bytes": sum(sum(stage.bytes_up.values()) for stage in stages),
    }
    if report is not None:
        record.update(
            train_loss=report.train_loss,
            aggregation_seconds=report.aggregation_seconds,
            sampled=report.sampled,
            quorum=report.quorum,
            attempts=report.attempts,
            clients=[vars(c) for c in report.clients],
            events=[vars(e) for e in report.events],
            ranks=report.ranks,
            energy=report.energy,
            total_rank=sum(report.ranks.values()),
        )
        if report.secure:
            record["secure"] = report.secure
        if report.totals:
            record["totals"] = report.totals
    if selection is not None:
        record["tau_selection"] = selection.record()
    record["evaluation"] = evaluation
    if federated is not None:
        record["federated_evaluation"] = federated.record()
    return record


class Server:
    """One federation's server side: the model, the strategy, the run directory."""

    def __init__(self, config: RunConfig, resume: Path | None, fresh_node_ids: bool = False):
        """`fresh_node_ids`: the engine gives its nodes new ids at every start (see `LoraStrategy.restore`)."""
        if resume is not None:
            config = config.model_copy(update={"output": config.output.model_copy(update={"run_dir": str(resume)})})
        self.config = config
        self.model = ServerModel(config)
        self.strategy = LoraStrategy(config, self.model.shapes, self.model.base_norms, self.model.identity, self.model.dense_shapes)
        self.data: FederatedData | None = federated_data(config) if config.evaluation.server else None
        self.mmlu = mmlu_questions(config) if config.evaluation.server else None
        state = None
        if resume is not None:
            checkpoint.check_resumable(resume, config)
            state = checkpoint.load_state(resume, self.model.shapes, self.model.dense_shapes, self.strategy.merges)
        if state is None:
            self.run = RunDirectory.create(config) if resume is None else RunDirectory.reopen(resume, config, [])
            self.first_round = 0
        else:
            self.strategy.restore(state, fresh_node_ids)
            self.run = RunDirectory.reopen(resume, config, state.metrics)
            self.first_round = state.round + 1
            print(f"resuming {resume} after round {state.round}", flush=True)
        self.start = time.perf_counter()

    def evaluation_wanted(self, server_round: int) -> bool:
        evaluation = self.config.evaluation
        if server_round == 0:
            return evaluation.base
        return evaluation.every_round or server_round == self.config.federation.rounds

    def evaluate(self, grid: Grid, server_round: int) -> tuple[dict, EvaluationReport | None]:
        """Server-side scores on the data the server holds, and the nodes' federated scores."""
        if not self.evaluation_wanted(server_round):
            return {}, None
        federated = None
        if self.config.evaluation.federated:
            federated = evaluate_stage(grid, self.strategy, self.config.federation, server_round)
        evaluation = {}
        if self.data is not None:
            self.model.set_state(*self.strategy.global_modules())
            evaluation = self.model.evaluate(self.data.test, self.mmlu, self.data.validation)
        return evaluation, federated

    def complete(
        self,
        server_round: int,
        report: RoundReport | None,
        evaluation: dict,
        federated: EvaluationReport | None,
        seconds: float,
        selection: TauSelection | None = None,
    ) -> None:
        """Checkpoint first, then the metrics line: a crash between them loses nothing recorded."""
        timing = {
            "evaluation_seconds": seconds,
            "wall_seconds": time.perf_counter() - self.start,
            "unix_time": time.time(),
            "server_peak_rss_mib": peak_rss_mib(),
        }
        record = round_record(server_round, report, evaluation, federated, timing, selection)
        if server_round and server_round == self.first_round:
            record["resumed"] = True
        self.run.claim()
        if report is not None and self.config.output.save_client_adapters:
            partitions = [client.partition for client in report.clients]
            self.model.save_clients(self.run.path / "clients" / f"round{server_round}", self.strategy.received, partitions)
        checkpoint.save_state(self.run.path, self.strategy.server_state(server_round, [*self.run.rounds, record]))
        self.run.record_round(record)
        show_round(record)

    def finish(self) -> Path:
        merged, adapter = self.strategy.global_modules()
        if adapter is None:
            merged, adapter = merged[:-1], merged[-1]
        if self.config.output.save_model:
            self.model.save(self.run.path / "final", merged, adapter)
        plot_run(self.run.rounds, self.run.path / "plots")
        base, final = (_scores(self.run.rounds[index]) for index in (0, -1))
        summary = {
            "base": base,
            "final": final,
            "rounds": self.config.federation.rounds,
            "method": self.config.aggregation.method,
            "precision": self.model.precision.as_record(),
            "communication": communication(self.run.rounds, self.strategy.final_download_bytes()),
        }
        privacy = privacy_summary(self.run.rounds)
        if privacy is not None:
            summary["privacy"] = privacy
        self.run.write_json("summary.json", summary)
        return self.run.path


def communication(rounds: list[dict], unsent_final_download: int) -> dict:
    """The payload bytes the run sent both ways, summed over its rounds (MiB), and beside them, in
    none of the totals, the final global model's download that no round sent (FlowerTune's
    leaderboard adds it to the total: `total_mib + unsent_final_download_mib`)."""
    down = sum(r["communication"]["down_bytes"] for r in rounds)
    up = sum(r["communication"]["up_bytes"] for r in rounds)
    mib = 2**20
    return {
        "download_mib": down / mib,
        "upload_mib": up / mib,
        "total_mib": (down + up) / mib,
        "unsent_final_download_mib": unsent_final_download / mib,
    }


def _scores(record: dict) -> dict:
    """A round's evaluation: the server's own, else the nodes' combined scores."""
    return record["evaluation"] or record.get("federated_evaluation", {}).get("combined", {})


def serve(config: RunConfig, grid: Grid, resume: Path | None = None, fresh_node_ids: bool = False) -> Path:
    """Run every round, evaluate, checkpoint, and write the run directory; returns its path.
    `fresh_node_ids`: the engine gives its nodes new ids at every start (Flower's simulation engine)."""
    server = Server(config, resume, fresh_node_ids)
    print(f"run directory: {server.run.path}", flush=True)
    config, federation = server.config, server.config.federation
    if server.first_round == 0:
        evaluation_start = time.perf_counter()
        evaluation, federated = server.evaluate(grid, 0)
        server.complete(0, None, evaluation, federated, time.perf_counter() - evaluation_start)
    for server_round in range(max(1, server.first_round), federation.rounds + 1):
        first = server_round == max(1, server.first_round)
        report = train_stage(grid, server.strategy, federation, config.training.seed, server_round, first)
        selection = select_stage(grid, server.strategy, federation, report) if config.aggregation.automatic_tau else None
        evaluation_start = time.perf_counter()
        evaluation, federated = server.evaluate(grid, server_round)
        server.complete(server_round, report, evaluation, federated, time.perf_counter() - evaluation_start, selection)
    return server.finish()


def build_server_app(config: RunConfig | None = None, resume: Path | None = None, fresh_node_ids: bool = False) -> ServerApp:
    """A ServerApp bound to `config`, or reading it from the run config when None (flwr run: a
    deployment, whose sites train on their own data); `fresh_node_ids` as in `serve`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is not None:
            serve(config, grid, resume, fresh_node_ids)
        else:
            serve(as_deployed(config_from_run_config(context.run_config)), grid, resume_from_run_config(context.run_config))

    return app


app = build_server_app()
