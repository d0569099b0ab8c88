"""Benchmark of a whole federation: where the wall-clock time goes, throughput and memory.

It runs `florist run` with a configuration (default: the packaged default) and reads the
figures back from the run directory's metrics.jsonl, so they are the ones users see.
"""

from __future__ import annotations

import time
from pathlib import Path

from florist.config import RunConfig
from florist.federation.simulation import run_federation
from florist.reporting.run_directory import read_rounds


def federation_figures(rounds: list[dict], total_seconds: float, workers: int) -> dict:
    """Figures of one finished run from its round records and the command's wall-clock time.

    Client training time is the time inside the optimiser loop; with `workers` clients training
    at once, a round's training occupies sum(train seconds) / workers of wall-clock time. All
    the rest (start-up, model loading, messages, aggregation, evaluation) is outside it.
    """
    trained = [r for r in rounds if r.get("clients")]
    clients = [c for r in trained for c in r["clients"]]
    train_seconds = sum(c["train_seconds"] for c in clients)
    training_wall = train_seconds / workers
    walls = [r["wall_seconds"] for r in rounds]
    round_seconds = [after - before for before, after in zip(walls, walls[1:])]
    return {
        "total_seconds": total_seconds,
        "rounds": len(trained),
        "seconds_per_round": round_seconds,
        "seconds_per_round_without_evaluation": [
            s - r["evaluation_seconds"] for s, r in zip(round_seconds, rounds[1:])
        ],
        "client_train_seconds": train_seconds,
        "client_tokens_per_second": sum(c["train_tokens"] for c in clients) / train_seconds,
        "training_wall_seconds": training_wall,
        "evaluation_seconds": sum(r["evaluation_seconds"] for r in rounds),
        "aggregation_seconds": sum(r["aggregation_seconds"] for r in trained),
        "share_outside_training": 1 - training_wall / total_seconds,
        "client_peak_rss_mib": max(c["peak_rss_mib"] for c in clients),
        "server_peak_rss_mib": max(r["server_peak_rss_mib"] for r in rounds),
    }


def bench_federation(config: RunConfig) -> tuple[Path, dict]:
    start = time.perf_counter()
    run_dir = run_federation(config)
    total = time.perf_counter() - start
    workers = min(config.federation.workers, config.federation.num_clients)
    return run_dir, federation_figures(read_rounds(run_dir), total, workers)
