"""A real `florist run` process killed (SIGKILL) after its first round, then `florist run --resume`:
the result equals the same federation run without interruption. And a private florist-secure run
summed by the secure-sum protocol, killed after its first round and resumed: the privacy ledger is
the uninterrupted run's; an edited ledger in the checkpoint is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
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




def killed_after_round_one(config, tmp_path: Path) -> tuple[Path, list[dict]]:
    """A real `florist run` of `config`, killed with SIGKILL once round 1 is recorded: its run
    directory and the rounds it recorded (at least round 1, not the last; no summary)."""
    config_file = tmp_path / "killed.toml"
    config_file.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
    run_dir = Path(config.output.run_dir)
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(florist("run", "--config", str(config_file)), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_round(run_dir, 1, process)
        finally:
            kill_everything(process)
    recorded = read_rounds(run_dir)
    assert 1 <= recorded[-1]["round"] < config.federation.rounds and not (run_dir / "summary.json").exists()
    return run_dir, recorded


def test_a_killed_server_resumes_and_ends_as_the_uninterrupted_run(tiny_model_dir, tmp_path, server_task):
    run_dir, recorded = killed_after_round_one(federation_config(tiny_model_dir, tmp_path / "killed", "florist", *EXTRA), tmp_path)

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


# -- florist-secure with differential privacy: the privacy ledger across a stop and a resume -------

DP = ['federation.engine="inline"', "federation.rounds=3", "privacy.dp=true", "privacy.clip_norm=0.5", "privacy.target_epsilon=8"]


class Stopped(Exception):
    pass


def stopped_after_round_one(tiny_model_dir, run_dir: Path, monkeypatch) -> None:
    """A florist-secure run with DP, stopped as its round 2 begins (its checkpoint holds round 1)."""
    from florist.federation.secure import SecureRounds
    from florist.federation.simulation import run_federation

    begin = SecureRounds.train_round

    def train_round(self, server_round, report):
        if server_round == 2:
            raise Stopped(f"stopped before round {server_round}")
        return begin(self, server_round, report)

    with monkeypatch.context() as patched:
        patched.setattr(SecureRounds, "train_round", train_round)
        with pytest.raises(Stopped):
            run_federation(federation_config(tiny_model_dir, run_dir, "florist-secure", *DP))
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1]


def test_a_private_secure_sum_run_killed_after_round_one_reports_the_epsilon_of_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """A real `florist run` (DP, the sketches summed by the secure-sum protocol) killed with SIGKILL
    once round 1 is checkpointed, then resumed in a new process."""
    from florist.federation.simulation import run_federation

    config = federation_config(tiny_model_dir, tmp_path / "killed", "florist-secure", *DP, "privacy.secure_aggregation=true")
    run_dir, recorded = killed_after_round_one(config, tmp_path)
    resumed = subprocess.run(florist("run", "--resume", str(run_dir)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = run_federation(federation_config(tiny_model_dir, tmp_path / "whole", "florist-secure", *DP, "privacy.secure_aggregation=true"))

    ours, theirs = read_rounds(run_dir), read_rounds(whole)
    assert [r["round"] for r in ours] == [r["round"] for r in theirs] == [0, 1, 2, 3]
    assert ours[: len(recorded)] == recorded  # the rounds recorded before the kill are kept as they were
    spent = [r["secure"]["privacy"] for r in ours[1:]]
    assert spent == [r["secure"]["privacy"] for r in theirs[1:]]  # per round: multiplier, rate, round and run epsilon
    assert spent[-1]["run_epsilon"] > spent[0]["run_epsilon"] > 0  # the resumed rounds add to round 1's spending
    assert all("keys_signed" in r["secure"] for r in ours[1:])  # every round summed by the protocol
    summary, expected = (json.loads((path / "summary.json").read_text()) for path in (run_dir, whole))
    assert summary["privacy"] == expected["privacy"] and summary["privacy"]["rounds"] == 3
    assert summary["privacy"]["epsilon"] <= 8 * 1.001


@pytest.fixture(scope="module")
def stopped_private_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One stopped run that each tampering case copies (a refused resume trains nothing)."""
    run_dir = tmp_path_factory.mktemp("private") / "stopped"
    with pytest.MonkeyPatch.context() as monkeypatch:
        stopped_after_round_one(tiny_model_dir, run_dir, monkeypatch)
    return run_dir


@pytest.mark.parametrize(
    ("tamper", "key"),
    [
        (lambda privacy: privacy.update(run_epsilon=privacy["run_epsilon"] / 2), "secure.privacy.run_epsilon"),
        (lambda privacy: privacy.update(noise_multiplier=privacy["noise_multiplier"] * 2), "secure.privacy.noise_multiplier"),
        (lambda privacy: privacy.update(delta=1e-3), "secure.privacy.delta"),
        (lambda privacy: privacy.clear(), "secure.privacy.noise_multiplier is None"),
    ],
)
def test_a_tampered_privacy_ledger_in_the_checkpoint_is_refused_in_one_line(tiny_model_dir, tmp_path, stopped_private_run, tamper, key):
    from florist.federation.simulation import run_federation

    run_dir = tmp_path / "stopped"
    shutil.copytree(stopped_private_run, run_dir)
    state_path = run_dir / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    tamper(state["metrics"][1]["secure"]["privacy"])
    state_path.write_text(json.dumps(state))
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError) as refused:
        run_federation(federation_config(tiny_model_dir, run_dir, "florist-secure", *DP), resume=run_dir)
    message = str(refused.value)
    assert message.startswith(f"checkpoint/state.json round 1: {key}") and "\n" not in message
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before and not (run_dir / "summary.json").exists()
