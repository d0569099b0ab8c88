"""Benchmark of a whole federation: where the wall-clock time goes, throughput, precision and memory.

It runs `florist run` with a configuration (default: the packaged default) and reads the
figures back from the run directory (metrics.jsonl, summary.json), so they are the ones users see.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from florist.config import RunConfig
from florist.federation.simulation import run_federation
from florist.models import BF16_CPU_FLAGS, cpu_flags
from florist.reporting.run_directory import read_rounds

STAGES = ("start-up", "training", "evaluation", "aggregation", "messaging", "finishing")
SHOWN_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", *BF16_CPU_FLAGS, "amx_tile")


def stage_seconds(rounds: list[dict], started: float, finished: float, workers: int) -> dict[str, float]:
    """Wall-clock seconds of each stage of a run that began at `started` and ended at `finished` (unix times).

    - training: the clients' optimiser loops, sum(train seconds) / workers, as if the workers were never idle;
    - evaluation and aggregation: the server's timings;
    - start-up: from the command to the server's first round record, less the base model's evaluation,
      plus the first round's excess over later rounds' messaging (the workers' imports and model loads
      happen when the first messages arrive);
    - messaging: what else the rounds took: messages, the clients' per-message work (merging the
      global update, wrapping the LoRA, the reply) and workers waiting for the round's last client;
    - finishing: after the last round record (the final model saved, plots, shutting Ray down).
    """
    trained = [r for r in rounds if r.get("clients")]
    first, last = rounds[0], rounds[-1]
    training = [sum(c["train_seconds"] for c in r["clients"]) / workers for r in trained]
    aggregation = [r["aggregation_seconds"] for r in trained]
    spans = [after["wall_seconds"] - before["wall_seconds"] for before, after in zip(rounds, rounds[1:])]
    messaging = [
        span - r["evaluation_seconds"] - train - aggregate
        for span, r, train, aggregate in zip(spans, rounds[1:], training, aggregation)
    ]
    first_round_start_up = max(0.0, messaging[0] - sorted(messaging[1:])[len(messaging[1:]) // 2]) if len(messaging) > 1 else 0.0
    messaging[0] -= first_round_start_up
    served_from = last["unix_time"] - last["wall_seconds"]
    return {
        "start-up": served_from - started + first["wall_seconds"] - first["evaluation_seconds"] + first_round_start_up,
        "training": sum(training),
        "evaluation": sum(r["evaluation_seconds"] for r in rounds),
        "aggregation": sum(aggregation),
        "messaging": sum(messaging),
        "finishing": finished - last["unix_time"],
    }


def federation_figures(rounds: list[dict], started: float, finished: float, workers: int, precision: dict) -> dict:
    """Figures of one finished run from its round records, precision record and the command's start and end.

    Client training time is the time inside the optimiser loop; with `workers` clients training
    at once, a round's training occupies sum(train seconds) / workers of wall-clock time. All
    the rest is outside it.
    """
    trained = [r for r in rounds if r.get("clients")]
    clients = [c for r in trained for c in r["clients"]]
    train_seconds = sum(c["train_seconds"] for c in clients)
    total = finished - started
    stages = stage_seconds(rounds, started, finished, workers)
    walls = [r["wall_seconds"] for r in rounds]
    round_seconds = [after - before for before, after in zip(walls, walls[1:])]
    return {
        "total_seconds": total,
        "precision": precision.get("dtype"),
        "precision_reason": precision.get("reason"),
        "stage_seconds": stages,
        "stage_share": {stage: seconds / total for stage, seconds in stages.items()},
        "share_outside_training": 1 - stages["training"] / total,
        "rounds": len(trained),
        "seconds_per_round": round_seconds,
        "client_train_seconds": train_seconds,
        "training_tokens_per_second_per_worker": sum(c["train_tokens"] for c in clients) / train_seconds,
        "base_evaluation_seconds": rounds[0]["evaluation_seconds"],
        "final_evaluation_seconds": rounds[-1]["evaluation_seconds"],
        "client_peak_rss_mib": max(c["peak_rss_mib"] for c in clients),
        "server_peak_rss_mib": max(r["server_peak_rss_mib"] for r in rounds),
        "exact_match": {"base": rounds[0]["evaluation"].get("exact_match"), "final": rounds[-1]["evaluation"].get("exact_match")},
        "test_loss": {"base": rounds[0]["evaluation"].get("test_loss"), "final": rounds[-1]["evaluation"].get("test_loss")},
    }


def machine() -> dict:
    """What the figures depend on: the CPU and its bf16 flags, the cores, the software, the load."""
    flags = cpu_flags()
    model = next(
        (line.partition(":")[2].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return {
        "cpu": model,
        "cpu_flags": [flag for flag in SHOWN_CPU_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def bench_federation(config: RunConfig) -> tuple[Path, dict]:
    if config.privacy.secure_aggregation:
        # Its rounds record only totals, none of one site's train seconds, which the stages are built from.
        raise ValueError("privacy.secure_aggregation: a secure-sum run records no site's train seconds; benchmark the federation without it")
    load_before = os.getloadavg()
    started = time.time()
    run_dir = run_federation(config)
    finished = time.time()
    workers = config.federation.parallel_clients  # one with the inline engine
    precision = json.loads((run_dir / "summary.json").read_text())["precision"]
    figures = federation_figures(read_rounds(run_dir), started, finished, workers, precision)
    return run_dir, {
        **figures,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
