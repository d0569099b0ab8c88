"""Running a grid: every unfinished cell, a federation in its own process (several at once on a big
machine), a replay in this one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from florist.bench.reproduce.cells import recorded_cells
from florist.bench.reproduce.grid import CONFIG, Cell, replayable
from florist.bench.reproduce.replay import Replayer
from florist.config import load_config

# Ray hides the GPU from workers that ask for none (as `florist run` asks): keep it visible, so that
# --paper-scale clients train on CUDA. Ray also starts its workers at niceness 15, where on a shared
# machine the clients (the bulk of a cell's work) starve: keep them at the server's priority.
CELL_ENV = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_worker_niceness": "0"}


class FederatedCell:
    """`florist run` for one cell in its own session, killed with every process it started (Ray's)
    after `timeout` s.

    Ray's raylet can die while starting on a saturated machine (a dashboard agent that does not come up
    in time), and the simulation then waits forever: the timeout turns that into a failed cell.
    """

    def __init__(self, command: Sequence[str], log: IO[str], timeout: float, cores: Collection[int] | None = None):
        self.log = log
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.cpu_seconds = 0.0
        # taskset pins the cell before it starts; a preexec_fn would run Python in a child forked from
        # this process, whose torch threads (from a replay) may hold a lock the child then waits on.
        pinned = [] if cores is None else ["taskset", "--cpu-list", ",".join(map(str, cores))]
        self.process = subprocess.Popen(
            [*pinned, *command], stdout=log, stderr=subprocess.STDOUT, env=CELL_ENV, start_new_session=True
        )

    def poll(self) -> bool | None:
        """None while it runs; once it has ended, whether it succeeded. Its CPU time, its waited-for
        children's included, is then in `cpu_seconds`: on a shared machine it says what a cell costs
        better than wall time, and other cells running beside it do not blur it."""
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid:
            self.process.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_seconds = usage.ru_utime + usage.ru_stime
            return self.process.returncode == 0
        if time.monotonic() > self.deadline:
            self.log.write(f"\nreproduce: cell stopped after {self.timeout:.0f} s\n")
            self.stop()
            return False
        return None

    def stop(self) -> None:
        if self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Job:
    cell: Cell
    log: IO[str]
    started: float
    federated: FederatedCell
    share: int
    """Which share of the cores it runs on."""


def run_grid(cells: Sequence[Cell], out: Path, scale: Sequence[str], cell_timeout: float = 3600, jobs: int = 1) -> list[Cell]:
    """Run every unfinished cell (no summary.json, not in OUT/results.json), up to `jobs` federated
    cells at once; returns the cells that failed (their logs say why).

    A replayed cell runs in this process once its source has finished. Only the grid's first cell
    evaluates the base model, and only while none has finished: it is the same for every cell. Timings go to OUT/timings.jsonl, one line
    per cell run.
    """
    failed: list[Cell] = []
    running: list[Job] = []
    # A grid's results.json carries its finished cells to another machine without their run directories.
    recorded = {(r["setting"], r["row"], r["seed"]) for r in recorded_cells(out)}
    replay = Replayer()
    # Cells running side by side each get their own cores: their torch threads would otherwise fight
    # over all of them (a cell's clients size their threads to the cores they may use).
    shares = core_shares(jobs) if jobs > 1 else [None]

    def record(cell: Cell, ok: bool, seconds: float, cpu: float, log: Path) -> None:
        done = ok and (cell.path(out) / "summary.json").exists()
        status = "done" if done else f"FAILED, see {log}"
        print(f"    {cell.setting} {cell.label} seed {cell.seed}: {status} in {seconds:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        timing = {"cell": str(cell.path(out).relative_to(out)), "seconds": seconds, "cpu_seconds": cpu, "ok": done}
        with open(out / "timings.jsonl", "a") as stream:
            stream.write(json.dumps(timing) + "\n")
        if not done:
            failed.append(cell)

    def wait_until(condition) -> None:
        while True:
            for job in list(running):
                ok = job.federated.poll()
                if ok is not None:
                    running.remove(job)
                    job.log.close()
                    record(job.cell, ok, time.perf_counter() - job.started, job.federated.cpu_seconds, Path(job.log.name))
            if condition():
                return
            time.sleep(0.2)

    # The base model is the same in every cell: evaluated once, in the first cell of a grid with none finished.
    fresh = not recorded and not any((cell.path(out) / "summary.json").exists() for cell in cells)
    try:
        for index, cell in enumerate(cells, 1):
            target = cell.path(out)
            if (target / "summary.json").exists() or (cell.setting, cell.label, cell.seed) in recorded:
                continue
            shutil.rmtree(target, ignore_errors=True)  # a half-finished run directory is redone from scratch
            overrides = [*scale, *cell.overrides(out, evaluate_base=fresh and index == 1)]
            config = load_config(CONFIG, overrides)  # a bad override fails here, in one line, before the cell runs
            replayed = replayable(cell.row, config.federation.rounds)
            log = out / "logs" / cell.setting / cell.label / f"seed{cell.seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            kind = f"replaying {cell.source.label}'s clients" if replayed else "federated run"
            if replayed:
                wait_until(lambda: all(job.cell != cell.source for job in running))
            else:
                wait_until(lambda: len(running) < jobs)
            print(f"[{index}/{len(cells)}] {cell.setting} {cell.label} seed {cell.seed} ({config.model.name}, {kind}) ...", flush=True)
            start = time.perf_counter()
            if replayed:
                cpu_start = time.process_time()
                with open(log, "w") as stream:
                    ok = replay(config, cell.source.path(out), stream)
                record(cell, ok, time.perf_counter() - start, time.process_time() - cpu_start, log)
            else:
                command = [sys.executable, "-m", "florist.cli", "run", "--config", str(CONFIG)]
                command += [part for item in overrides for part in ("--set", item)]
                stream = open(log, "w")
                share = next(k for k in range(len(shares)) if all(job.share != k for job in running))
                running.append(Job(cell, stream, start, FederatedCell(command, stream, cell_timeout, shares[share]), share))
        wait_until(lambda: not running)
    finally:
        for job in running:  # interrupted: nothing started here outlives it
            job.federated.stop()
    return failed


def core_shares(jobs: int) -> list[list[int]]:
    """This process's cores dealt into `jobs` shares of consecutive cores (shared round the shares
    when there are fewer cores than jobs)."""
    cores = sorted(os.sched_getaffinity(0))
    size = max(1, len(cores) // jobs)
    return [cores[(k * size) % len(cores):][:size] for k in range(jobs)]
