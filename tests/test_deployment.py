"""Flower's deployment engine on loopback: a SuperLink and three SuperNodes as separate processes,
TLS and SuperNode authentication on, each SuperNode with its own data file, the job submitted
with `flwr run` as an operator would, and its run directory checked against the same federation
run in simulation.

The apps are driven only through the run config's `config-file` and the nodes' `--node-config`
(each site's data, the base model it pins, its threads and its policy),
so these tests hold while the apps' internals change.

Each federation costs minutes of CPU on the 2-core machine (every message starts a ClientApp
process that imports torch), so tests share one where their scenarios allow: `deployed` serves the
first run, the resident workers' check and the resumed run; the hostile and the policy-refusing
node join one federation (BENCHMARKS.md, "The deployment tests' wall time").
"""

from __future__ import annotations

import io
import json
import shutil
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.cli.build import build_fab_from_disk
from safetensors.torch import load_file

from deployment import PROJECT, Deployment, Started, still_running
from federations import ROUNDS, federation_config
from florist.reporting.run_directory import read_rounds
from loopback_sites import RUN_TIMEOUT_SECONDS, SITE_CODE, SITES, site_config, wait_for_records, write_config





@dataclass
class DeployedRun:
    deployment: Deployment
    run_id: int
    status: str
    run_dir: Path
    server_log: str
    workers: dict[int, Started]
    """The resident worker of each site that has one, by site."""

    def failure(self) -> str:
        """Why the run did not complete, for an assertion's message."""
        details = self.deployment.run_info(self.run_id).get("status-details")
        return f"{self.status}: {details}\n{self.server_log[-4000:]}"






WORKER_SITES = (1, 2)
"""The sites of `deployed` whose SuperNode names a resident worker (`florist site-worker`) in its
node config; site 0 trains in the ClientApp process Flower starts for each message."""


@pytest.fixture(scope="module")
def deployed(tiny_model_dir, site_data, tmp_path_factory) -> DeployedRun:
    """The module's deployment, after its first run has ended; still up, so that later tests can
    run on it (test_a_killed_server_resumes_...). Every process it started is checked stopped at
    the module's end."""
    root = tmp_path_factory.mktemp("deployment")
    config = write_config(federation_config(tiny_model_dir, root / "run", "florist"), root / "florist.toml")
    deployment = Deployment(root)
    processes = []
    try:
        deployment.start_superlink()
        workers = {}
        for site in range(SITES):
            worker = {}
            if site in WORKER_SITES:
                workers[site], socket_path = deployment.start_site_worker(f"site{site}")
                worker = {"worker-socket": str(socket_path)}
            deployment.add_supernode(f"site{site}", site_config(site, site_data, tiny_model_dir, **worker))
        deployment.wait_for_nodes()
        run_id = deployment.submit({"config-file": str(config)})
        status = deployment.wait(run_id, RUN_TIMEOUT_SECONDS)
        yield DeployedRun(deployment, run_id, status, root / "run", deployment.log(run_id), workers)
        processes = deployment.processes()
    finally:
        deployment.stop()
    leftover = still_running(processes)
    assert not leftover, f"processes outlived the deployment: {leftover}"




def test_flwr_run_completes_every_round_on_the_three_supernodes(deployed):
    assert deployed.status == "finished:completed", deployed.failure()
    rounds = read_rounds(deployed.run_dir)
    assert [record["round"] for record in rounds] == list(range(ROUNDS + 1))
    node_ids = {node.node_id for node in deployed.deployment.supernodes.values()}
    assert len(node_ids) == SITES and node_ids <= deployed.deployment.online_nodes()
    for record in rounds[1:]:
        assert [client["partition"] for client in record["clients"]] == list(range(SITES))
        assert {client["node"] for client in record["clients"]} == node_ids
    assert (deployed.run_dir / "summary.json").is_file()
    assert f"round {ROUNDS}" in deployed.server_log
    # The sites trained on their own files: the recorded configuration names no split of a source.
    recorded = tomllib.loads((deployed.run_dir / "config.toml").read_text())["data"]
    assert (recorded["source"], recorded["test_source"]) == ("node-local", "embedded")


def comparable(record: dict) -> dict:
    """A metrics record as two runs of one federation on any engine must agree on: every node id
    (the engines assign their own) replaced by its site's partition, without wall-clock and memory
    readings (seconds, rss, unix_time), and with lists in a canonical order (replies are listed as they arrived)."""
    site = {str(client["node"]): f"site{client['partition']}" for client in record.get("clients", [])}

    def canonical(value):
        if isinstance(value, dict):
            return {site.get(key, key): canonical(item) for key, item in value.items()
                    if not any(word in key for word in ("seconds", "rss", "time"))}
        if isinstance(value, list):
            return sorted((canonical(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
        if isinstance(value, int) and not isinstance(value, bool):
            return site.get(str(value), value)
        if isinstance(value, str):
            for node, name in site.items():
                value = value.replace(node, name)
        return value

    return canonical(record)


def test_deployment_gives_the_simulations_result(deployed, simulated):
    assert deployed.status == "finished:completed", deployed.failure()
    assert_same_run(deployed.run_dir, simulated)


def assert_same_run(run_dir: Path, simulated: Path) -> None:
    """`run_dir` holds the simulation's rounds, summary and final weights."""
    deployed_rounds, simulated_rounds = read_rounds(run_dir), read_rounds(simulated)
    assert len(deployed_rounds) == len(simulated_rounds) == ROUNDS + 1
    for deployed_round, simulated_round in zip(deployed_rounds, simulated_rounds, strict=True):
        assert comparable(deployed_round) == comparable(simulated_round)
    # The rounds did train: the check above compares changing numbers, not two copies of the base.
    assert deployed_rounds[-1]["evaluation"]["test_loss"] != deployed_rounds[0]["evaluation"]["test_loss"]

    summaries = [json.loads((path / "summary.json").read_text()) for path in (run_dir, simulated)]
    assert summaries[0] == summaries[1]
    for weights in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        deployed_tensors = load_file(run_dir / "final" / weights)
        simulated_tensors = load_file(simulated / "final" / weights)
        assert deployed_tensors.keys() == simulated_tensors.keys()
        for name, tensor in deployed_tensors.items():
            torch.testing.assert_close(tensor, simulated_tensors[name], rtol=1e-5, atol=1e-6, msg=f"{weights}: {name}")


def test_sites_with_resident_workers_end_the_run_as_in_process(deployed, simulated):
    """Sites 1 and 2 of `deployed` name a resident worker in their node config: every ClientApp
    process Flower starts for them hands its message to it. The run ends as the simulation (and so
    as site 0, in process, computes), and each worker, one process from first to last, trained its
    site in every round."""
    assert deployed.status == "finished:completed", deployed.failure()
    assert {site: worker.alive for site, worker in deployed.workers.items()} == {site: True for site in WORKER_SITES}
    for site, worker in deployed.workers.items():
        trained = [line for line in worker.output().splitlines() if line.startswith("round ") and f" client {site}: rank " in line]
        assert [int(line.split()[1]) for line in trained] == list(range(1, ROUNDS + 1)), worker.output()[-3000:]
    # Site 0 trained in the processes Flower started, not in a worker.
    assert "round 1 client 0: rank " in deployed.deployment.supernodes["site0"].started.output()
    assert_same_run(deployed.run_dir, simulated)


def test_a_killed_server_resumes_from_its_last_round_and_ends_as_the_uninterrupted_run(tiny_model_dir, deployed, simulated, tmp_path):
    """On the SuperLink and SuperNodes of `deployed`, after its run: a new run's ServerApp is
    SIGKILLed during round 2, and a run resuming its directory ends as the simulation."""
    config = write_config(federation_config(tiny_model_dir, tmp_path / "run", "florist"), tmp_path / "florist.toml")
    run_dir = tmp_path / "run"
    deployment = deployed.deployment
    first = deployment.submit({"config-file": str(config)})
    wait_for_records(deployment, first, run_dir, 2)
    deployment.kill_serverapp()  # the server crashes during round 2
    recorded = read_rounds(run_dir)
    assert [r["round"] for r in recorded] == [0, 1] and not (run_dir / "summary.json").exists()
    second = deployment.submit({"config-file": str(config), "resume": str(run_dir)})
    status = deployment.wait(second, RUN_TIMEOUT_SECONDS)
    assert status == "finished:completed", deployment.log(second)[-4000:]
    assert deployment.status(first) != "finished:completed"
    log = deployment.log(second)
    assert f"resuming {run_dir} after round 1" in log
    ours, theirs = read_rounds(run_dir), read_rounds(simulated)
    assert ours[:2] == recorded and ours[2].pop("resumed") is True
    for a, b in zip(ours, theirs, strict=True):
        assert comparable(a) == comparable(b)
    for weights in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        resumed, uninterrupted = load_file(run_dir / "final" / weights), load_file(simulated / "final" / weights)
        for name, tensor in resumed.items():
            torch.testing.assert_close(tensor, uninterrupted[name], rtol=1e-5, atol=1e-6, msg=f"{weights}: {name}")


def test_unregistered_node_key_is_refused_and_every_process_is_stopped(tmp_path):
    with pytest.raises(RuntimeError, match="the test fails here"), Deployment(tmp_path) as deployment:
        deployment.start_superlink()
        deployment.add_supernode("registered", {"partition-id": 0, "num-partitions": 1})
        intruder = deployment.add_supernode("intruder", {"partition-id": 0, "num-partitions": 1}, register=False)
        returncode = intruder.started.popen.wait(timeout=120)
        deployment.wait_for_nodes()
        processes = deployment.processes()
        online = deployment.online_nodes()
        raise RuntimeError("the test fails here")

    assert returncode != 0
    assert "Failed to activate SuperNode" in intruder.started.output()
    assert "No SuperNode found with the given public key" in deployment.superlink.output()
    assert online == {deployment.supernodes["registered"].node_id}
    # The SuperLink, the registered SuperNode and the superexec each of them started.
    assert len(processes) >= 4
    leftover = still_running(processes)
    assert not leftover, f"processes outlived a failing test: {leftover}"


def fab_files(project: Path) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project))).namelist()


def test_fab_sent_to_the_nodes_holds_the_package_and_nothing_else(tmp_path):
    files = fab_files(PROJECT)
    package = sorted(str(path.relative_to(PROJECT)) for path in (PROJECT / "src" / "florist").rglob("*.py"))
    assert sorted(name for name in files if name.endswith(".py")) == package
    assert "src/florist/configs/default.toml" in files

    # A checkout holding a site's data, run directories and notes: none of them is packed.
    project = tmp_path / "checkout"
    shutil.copytree(PROJECT / "src" / "florist", project / "src" / "florist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", project)
    decoys = ["data/train.jsonl", "runs/20260101-florist/metrics.jsonl", "runs/20260101-florist/config.toml",
              "notes.md", "benchmarks/results/results.json", "site/client_0.json", ".venv/lib/site.py"]
    for decoy in decoys:
        (project / decoy).parent.mkdir(parents=True, exist_ok=True)
        (project / decoy).write_text("{}\n")
    packed = fab_files(project)
    assert not set(decoys) & set(packed)
    assert sorted(name for name in packed if name.endswith(".py")) == package


# ---------------------------------------------------------------------------------------------
# A hostile site, a real SuperNode that runs its own code (sites/hostile/sitecustomize.py), and a
# site whose policy refuses the run.

HOSTILE_SITE = SITE_CODE / "hostile"


def test_a_hostile_supernode_and_one_refusing_by_policy_are_left_out_reply_by_reply_and_the_run_ends_as_without_them(tiny_model_dir, site_data, simulated, tmp_path):
    """Five SuperNodes: the three sites, a fourth running code of its own that breaks each reply it
    sends (its train replies in rounds 1 and 2, its evaluation replies in rounds 0 and 2) in a way
    that used to end the run, and a fifth whose policy allows one local step where the run asks for
    two (training.local_steps). The run completes; each of the hostile node's replies is refused
    with its reason, the server's log prints its "[/]" as text, and metrics.jsonl is strict JSON;
    the fifth refuses every round with the one line naming its key, which the server records as the
    node's failure. The final adapter is the three honest sites' (the simulation of the same
    federation without the other two)."""
    five = ["federation.num_clients=5", "federation.ranks=[2, 4, 8, 4, 4]", "evaluation.federated=true"]
    config = write_config(federation_config(tiny_model_dir, tmp_path / "run", "florist", *five), tmp_path / "florist.toml")
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        for site in range(SITES):
            deployment.add_supernode(f"site{site}", site_config(site, site_data, tiny_model_dir))
        hostile_env = dict(deployment.env, PYTHONPATH=f"{HOSTILE_SITE}:{SITE_CODE}:{deployment.env['PYTHONPATH']}")
        hostile_config = site_config(SITES, site_data, tiny_model_dir) | {"data": str(site_data / "client_0.json")}
        hostile = deployment.add_supernode("hostile", hostile_config, env=hostile_env)
        refusing_config = site_config(SITES + 1, site_data, tiny_model_dir, **{"max-local-steps": 1}) | {"data": str(site_data / "client_0.json")}
        refusing = deployment.add_supernode("refusing", refusing_config)
        deployment.wait_for_nodes()
        run_id = deployment.submit({"config-file": str(config)})
        status = deployment.wait(run_id, RUN_TIMEOUT_SECONDS)
        log = deployment.log(run_id)
        assert status == "finished:completed", log[-4000:]
        refusing_log = refusing.started.output()

    def refuse(constant: str):
        raise ValueError(f"{constant} in metrics.jsonl")

    rounds = [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["round"] for record in rounds] == list(range(ROUNDS + 1))

    def reason(events: list[dict]) -> str:
        [event] = [e for e in events if e["node"] == hostile.node_id]
        assert event["status"] == "rejected", event
        return event["reason"]

    assert reason(rounds[1]["events"]) == "malformed reply: metric chain-length is missing"
    assert "header declares (1048576, 1048576) float32 (4398046511104 bytes)" in reason(rounds[2]["events"])
    assert reason(rounds[0]["federated_evaluation"]["events"]) == "test_loss 1000.0 is outside [0, 700]"
    assert reason(rounds[2]["federated_evaluation"]["events"]).startswith("evaluation reply: status '[/]'")
    assert f"node {hostile.node_id} rejected: evaluation reply: status '[/]'" in log
    refusal = "node config max-local-steps=1: the run asks for training.local_steps 2"
    for record in rounds[1:]:
        assert sorted(client["partition"] for client in record["clients"]) == list(range(SITES))
        assert [(event["status"], event["reason"]) for event in record["events"] if event["node"] == refusing.node_id] == [("failed", refusal)]
    assert f"refused: {refusal}" in refusing_log
    weights = "adapter/adapter_model.safetensors"
    final, honest = load_file(run_dir / "final" / weights), load_file(simulated / "final" / weights)
    assert final.keys() == honest.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, honest[name], rtol=1e-5, atol=1e-6, msg=name)
