"""Running a grid: every unfinished cell in turn, a federation in its own process, a replay in this one."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from florist.bench.reproduce.grid import CONFIG, Cell, replayable
from florist.bench.reproduce.replay import Replayer
from florist.config import load_config

# Ray hides the GPU from workers that ask for none (as `florist run` asks): keep it visible, so that
# --paper-scale clients train on CUDA. Ray also starts its workers at niceness 15, where on a shared
# machine the clients (the bulk of a cell's work) starve: keep them at the server's priority.
CELL_ENV = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_worker_niceness": "0"}


def child_cpu_seconds() -> float:
    """CPU time of finished child processes: on a shared machine it says what a cell costs better than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_federation_cell(command: Sequence[str], log, timeout: float) -> bool:
    """`florist run` in its own session, killed with every process it started (Ray's) after `timeout` s.

    Ray's raylet can die while starting on a saturated machine (a dashboard agent that does not come up
    in time), and the simulation then waits forever: the timeout turns that into a failed cell.
    """
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=CELL_ENV, start_new_session=True)
    try:
        return process.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        log.write(f"\nreproduce: cell stopped after {timeout:.0f} s\n")
        return False
    finally:
        if process.poll() is None:  # timed out, or this process was interrupted
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_grid(cells: Sequence[Cell], out: Path, scale: Sequence[str], cell_timeout: float = 3600) -> list[Cell]:
    """Run every unfinished cell in turn; returns the cells that failed (their logs say why).

    Only the grid's first cell evaluates the base model: it is the same for every cell. Timings go to
    OUT/timings.jsonl, one line per cell run.
    """
    failed = []
    replay = Replayer()
    for index, cell in enumerate(cells, 1):
        target = cell.path(out)
        if (target / "summary.json").exists():
            continue
        shutil.rmtree(target, ignore_errors=True)  # a half-finished run directory is redone from scratch
        overrides = [*scale, *cell.overrides(out, evaluate_base=index == 1)]
        config = load_config(CONFIG, overrides)  # a bad override fails here, in one line, before the cell runs
        replayed = replayable(cell.row, config.federation.rounds)
        log = out / "logs" / cell.setting / cell.label / f"seed{cell.seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        kind = f"replaying {cell.source.label}'s clients" if replayed else "federated run"
        print(f"[{index}/{len(cells)}] {cell.setting} {cell.label} seed {cell.seed} ({config.model.name}, {kind}) ...", flush=True)
        # A replayed cell runs in this process, a federated one in a child.
        cpu_seconds = time.process_time if replayed else child_cpu_seconds
        start, cpu_start = time.perf_counter(), cpu_seconds()
        with open(log, "w") as stream:
            if replayed:
                ok = replay(config, cell.source.path(out), stream)
            else:
                command = [sys.executable, "-m", "florist.cli", "run", "--config", str(CONFIG)]
                ok = run_federation_cell([*command, *(part for item in overrides for part in ("--set", item))], stream, cell_timeout)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
        status = "done" if ok and (target / "summary.json").exists() else f"FAILED, see {log}"
        print(f"    {status} in {seconds:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        timing = {"cell": str(target.relative_to(out)), "seconds": seconds, "cpu_seconds": cpu, "ok": status == "done"}
        with open(out / "timings.jsonl", "a") as stream:
            stream.write(json.dumps(timing) + "\n")
        if status != "done":
            failed.append(cell)
    return failed
