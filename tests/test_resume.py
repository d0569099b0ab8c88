"""A real `florist run` process killed (SIGKILL) after its first round, then `florist run --resume`:
the result equals the same federation run without interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import tomli_w
import torch

from florist.federation.client_app import build_client_app
from florist.federation.server_app import serve
from florist.lora.adapters import read_adapter
from florist.reporting.run_directory import read_rounds

from federations import federation_config
from local_grid import LocalGrid

ROUNDS = 3
EXTRA = [f"federation.rounds={ROUNDS}", "federation.workers=1", "evaluation.every_round=true", "training.deterministic=true"]


def florist(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "florist"), *args]


def wait_for_round(run_dir: Path, server_round: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_rounds(run_dir)) > server_round:
            return
        if process.poll() is not None:
            raise AssertionError(f"florist run ended (exit {process.returncode}) before round {server_round}")
        time.sleep(0.2)
    raise AssertionError(f"no round {server_round} within {timeout} s")


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started (Ray's too), by PID."""
    family = [process.pid]
    try:
        family += [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass




def test_a_killed_server_resumes_and_ends_as_the_uninterrupted_run(tiny_model_dir, tmp_path, server_task):
    config = federation_config(tiny_model_dir, tmp_path / "killed", "florist", *EXTRA)
    config_file = tmp_path / "federation.toml"
    config_file.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
    run_dir = Path(config.output.run_dir)
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(florist("run", "--config", str(config_file)), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_round(run_dir, 1, process)
    finally:
        kill_everything(process)
    recorded = read_rounds(run_dir)
    assert 1 <= recorded[-1]["round"] < ROUNDS and not (run_dir / "summary.json").exists()

    resumed = subprocess.run(florist("run", "--resume", str(run_dir)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} after round" in resumed.stdout + resumed.stderr

    # The same federation without interruption (in this process: the engine does not change the numbers).
    reference = federation_config(tiny_model_dir, tmp_path / "whole", "florist", *EXTRA)
    nodes = {100 + k: {"partition-id": k} for k in range(reference.federation.num_clients)}
    whole = serve(reference, LocalGrid(build_client_app(reference), nodes))

    ours, theirs = read_rounds(run_dir), read_rounds(whole)
    assert [r["round"] for r in ours] == list(range(ROUNDS + 1))
    assert recorded == ours[: len(recorded)]  # the rounds recorded before the kill are kept as they were
    for a, b in zip(ours, theirs):
        assert a["evaluation"] == b["evaluation"], a["round"]
        assert a.get("ranks") == b.get("ranks")
        assert [c["train_loss"] for c in a.get("clients", [])] == [c["train_loss"] for c in b.get("clients", [])]
    _, final = read_adapter(run_dir / "final" / "adapter")
    _, expected = read_adapter(whole / "final" / "adapter")
    for name, module in expected.modules.items():
        assert torch.equal(final.modules[name].A, module.A) and torch.equal(final.modules[name].B, module.B), name
