"""A replayed cell: a finished run's round-1 client adapters, aggregated with another method and evaluated.

Valid only where the clients' uploads do not depend on the server's method (`grid.replayable`). The
aggregate goes through the server's own strategy and model code, so the replayed cell's global model,
bytes and evaluation are those its own one-round federation would record.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from florist.config import RunConfig
from florist.reporting.run_directory import read_rounds


class Replayer:
    """Replays cells one after another; the server model (and MMLU) loads once for all of them."""

    def __init__(self):
        self.server = None
        self.mmlu = None
        self.key = None

    def __call__(self, config: RunConfig, source: Path, log) -> bool:
        try:
            self._replay(config, source, log)
            return True
        except Exception:  # the cell fails, with its traceback in its log; the grid goes on
            traceback.print_exc(file=log)
            return False

    def _replay(self, config: RunConfig, source: Path, log) -> None:
        from florist.federation.datasets import federated_data
        from florist.federation.reports import ClientReport, RoundReport
        from florist.federation.server_app import communication, mmlu_questions, round_record
        from florist.federation.server_model import ServerModel
        from florist.federation.strategy import LoraStrategy
        from florist.lora.adapters import read_adapters
        from florist.reporting.run_directory import RunDirectory

        if not (source / "summary.json").exists():
            raise RuntimeError(f"source run {source} has not finished; its cell must run first")
        key = config.model_dump_json(include={"model", "data", "evaluation"})
        if key != self.key:  # every cell of a grid shares them, so the model loads once
            self.server, self.mmlu, self.key = ServerModel(config), mmlu_questions(config), key
        clients_dir = source / "clients" / "round1"
        index = json.loads((clients_dir / "clients.json").read_text())
        adapters = read_adapters([clients_dir / c["adapter"] for c in index], [c["weight"] for c in index])
        source_round = next(r for r in read_rounds(source) if r["round"] == 1)
        clients = sorted(source_round["clients"], key=lambda c: c["partition"])

        strategy = LoraStrategy(config, self.server.shapes, self.server.base_norms, self.server.identity)
        start = time.perf_counter()
        aggregate = strategy.aggregator.aggregate(adapters)
        seconds = time.perf_counter() - start
        # The strategy's own step from an aggregate to what the nodes hold (the download's wire round
        # trip, FlexLoRA's per-client truncations): the model evaluated and the bytes counted are the run's.
        strategy._advance(aggregate, [c["partition"] for c in clients])
        strategy.partition_of.update({c["node"]: c["partition"] for c in clients})

        run = RunDirectory.create(config)
        run.record_round(round_record(0, None, {}, None, {}))
        evaluation_start = time.perf_counter()
        self.server.set_state(*strategy.global_modules())
        data = federated_data(config)
        evaluation = self.server.evaluate(data.test, self.mmlu, data.validation)
        report = RoundReport(
            1,
            bytes_down={c["node"]: c["bytes_down"] for c in clients},
            bytes_up={c["node"]: c["bytes_up"] for c in clients},
            sampled=source_round["sampled"],
            clients=[ClientReport(**c) for c in clients],
            aggregation_seconds=seconds,
            ranks={name: module.rank for name, module in aggregate.modules.items()},
            energy={name: module.energy for name, module in aggregate.modules.items()},
        )
        timing = {"evaluation_seconds": time.perf_counter() - evaluation_start}
        run.record_round(round_record(1, report, evaluation, None, timing))
        summary = {
            "base": {},
            "final": evaluation,
            "rounds": 1,
            "method": config.aggregation.method,
            "communication": communication(run.rounds, strategy.final_download_bytes()),
            "replayed_from": str(source),
        }
        run.write_json("summary.json", summary)
        print(f"replayed {source}: aggregation {seconds:.4f} s, evaluation {json.dumps(evaluation)}", file=log, flush=True)
