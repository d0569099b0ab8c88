"""`florist bench run`'s accounting of a run's wall time: what it reports, never how fast."""

from __future__ import annotations

import json

import pytest

from florist.bench.federation import STAGES, federation_figures, stage_seconds
from florist.cli import main


def client(train_seconds: float, tokens: int = 1000) -> dict:
    return {"train_seconds": train_seconds, "train_tokens": tokens, "peak_rss_mib": 2000.0}


def round_record(wall: float, evaluation: float, clients: list[dict] | None = None, aggregation: float = 0.0, served_at: float = 1000.0) -> dict:
    record = {"wall_seconds": wall, "evaluation_seconds": evaluation, "server_peak_rss_mib": 1500.0, "unix_time": served_at + wall}
    record["evaluation"] = {"exact_match": 0.5, "test_loss": 1.0}
    if clients is not None:
        record.update(clients=clients, aggregation_seconds=aggregation)
    return record


# A run started at unix time 990: the server started at 1000, loaded its model for 2 s and evaluated the
# base for 8 s. Three rounds on 2 workers; the first round also paid 6 s of worker start-up, every round
# 1.5 s of messages; the last round ends with a 5 s final evaluation; 4 s of saving after it.
ROUNDS = [
    round_record(10.0, 8.0),
    round_record(10 + 6 + 20 + 0.5 + 1.5, 0.0, [client(10), client(30)], aggregation=0.5),
    round_record(38 + 20 + 0.5 + 1.5, 0.0, [client(25), client(15)], aggregation=0.5),
    round_record(60 + 20 + 0.5 + 1.5 + 5, 5.0, [client(20), client(20)], aggregation=0.5),
]
STARTED, FINISHED = 990.0, 1000.0 + 87.0 + 4.0


def test_every_second_of_the_run_is_in_exactly_one_stage():
    stages = stage_seconds(ROUNDS, STARTED, FINISHED, workers=2)
    assert list(stages) == list(STAGES)
    assert stages == pytest.approx(
        {"start-up": 10 + 2 + 6, "training": 60, "evaluation": 13, "aggregation": 1.5, "messaging": 4.5, "finishing": 4}
    )
    assert sum(stages.values()) == pytest.approx(FINISHED - STARTED)


def test_figures_report_shares_throughput_and_precision():
    precision = {"dtype": "fp32", "reason": "auto: the CPU lacks avx512_bf16 and amx_bf16"}
    figures = federation_figures(ROUNDS, STARTED, FINISHED, 2, precision)
    assert figures["total_seconds"] == pytest.approx(101)
    assert figures["share_outside_training"] == pytest.approx(1 - 60 / 101)
    assert sum(figures["stage_share"].values()) == pytest.approx(1.0)
    assert figures["training_tokens_per_second_per_worker"] == pytest.approx(6000 / 120)
    assert figures["precision"] == "fp32" and "avx512_bf16" in figures["precision_reason"]
    assert figures["base_evaluation_seconds"] == 8.0 and figures["final_evaluation_seconds"] == 5.0


def test_bench_run_on_the_tiny_model_writes_its_figures(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "figures.json"
    overrides = [
        f"model.name={json.dumps(str(tiny_model_dir))}",
        "data.examples_per_category=4",
        "data.test_per_category=1",
        "data.min_client_examples=2",
        "federation.num_clients=2",
        "federation.ranks=[2]",
        "federation.rounds=2",
        "training.local_steps=1",
        "evaluation.max_new_tokens=2",
        f"output.run_dir={json.dumps(str(tmp_path / 'run'))}",
    ]
    assert main(["bench", "run", *(f"--set={item}" for item in overrides), "--json", str(output)]) == 0
    figures = json.loads(output.read_text())
    assert sum(figures["stage_seconds"].values()) == pytest.approx(figures["total_seconds"], rel=1e-6)
    assert all(seconds >= 0 for seconds in figures["stage_seconds"].values())
    assert figures["precision"] in ("fp32", "bf16") and figures["machine"]["cores"] >= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"]["dtype"] == figures["precision"]


def test_a_secure_sum_federation_is_refused_before_it_runs():
    from florist.bench.federation import bench_federation
    from florist.config import load_config

    config = load_config(None, ['aggregation.method="florist-secure"', "privacy.secure_aggregation=true"])
    with pytest.raises(ValueError, match="^privacy.secure_aggregation: a secure-sum run records no site's train seconds"):
        bench_federation(config)
