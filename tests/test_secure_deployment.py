"""Secure florist-secure runs (privacy.secure_aggregation) on Flower's deployment engine: a SuperLink
and three SuperNodes on loopback (tests/deployment.py: TLS, node keys, its own FLWR_HOME, free ports),
each site signing its secure-sum keys with its SuperNode's node key and answering through its resident worker (the node's protocol state goes to the worker and back
with every message; and a ClientApp process that imports torch for each of the four stages would miss
the deadlines on a loaded machine): site 2 dying as it uploads its masked sketches, and the three
sites' federated evaluation masked."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Error, Message

from deployment import Deployment, still_running
from federations import federation_config
from florist.config import RunConfig
from florist.federation.client_app import build_client_app
from florist.federation.server_app import serve
from florist.lora.adapters import read_adapter
from florist.reporting.run_directory import read_rounds
from local_grid import LocalGrid
from loopback_sites import DYING_SITE, RUN_TIMEOUT_SECONDS, SITE_CODE, site_config, write_config

TIMEOUT = 60
"""federation.round_timeout: each stage's deadline. The collect stage waits it out for the dying site."""
SETTINGS = [
    "federation.rounds=1", "federation.round_retries=0", f"federation.round_timeout={TIMEOUT}",
    "evaluation.base=false", "evaluation.server=false",
]
SECURE = ["privacy.secure_aggregation=true", "privacy.secure_clip_range=64"]
MASKED_INPUT_REPLY = 3
"""A site's replies in a secure round: its keys (with training), its shares, its masked input, its unmasking shares."""


def deltas(run_dir) -> dict[str, torch.Tensor]:
    _, adapter = read_adapter(run_dir / "final" / "adapter")
    return {name: module.scale * module.B.double() @ module.A.double() for name, module in adapter.modules.items()}


def start_signing_sites(deployment: Deployment, site_data, tiny_model_dir, tmp_path, dying: int | None = None) -> None:
    """Three SuperNodes, each with its resident worker, signing its secure-sum keys with its node key
    and trusting the three node keys; site `dying` dies as it sends its masked input."""
    keys = [deployment.node_key(f"site{site}") for site in range(3)]
    peers = tmp_path / "peers.pub"
    peers.write_text("".join(key.with_name(key.name + ".pub").read_text() for key in keys))
    for site in range(3):
        _, socket_path = deployment.start_site_worker(f"site{site}")
        policy = {"worker-socket": str(socket_path), "secure-sum-key": str(keys[site]), "secure-sum-peers": str(peers)}
        env = None
        if site == dying:
            pythonpath = f"{DYING_SITE}:{SITE_CODE}:{deployment.env['PYTHONPATH']}"
            env = dict(deployment.env, PYTHONPATH=pythonpath, FLORIST_TEST_DIE_AT_REPLY=str(MASKED_INPUT_REPLY))
        deployment.add_supernode(f"site{site}", site_config(site, site_data, tiny_model_dir, **policy), env=env)
    deployment.wait_for_nodes()


def inline_reference(tiny_model_dir, site_data, run_dir, *settings: str) -> tuple[RunConfig, LocalGrid]:
    """The same three sites in this process (local_grid.py), reading the sites' files, the sums in the clear."""
    given = [f"data.source={json.dumps(str(site_data))}", 'data.partition="given"']
    reference = federation_config(tiny_model_dir, run_dir, "florist-secure", *settings, *given)
    threads = site_config(0, site_data, tiny_model_dir)["threads"]
    return reference, LocalGrid(build_client_app(reference), {node: {"partition-id": p, "threads": threads} for node, p in ((1, 0), (2, 1), (3, 2))})


def test_a_site_killed_after_masking_leaves_the_rounds_sum_correct_over_the_others(tiny_model_dir, site_data, tmp_path, server_task):
    """Site 2 trains, shares its keys and masks its sketches, then dies while it uploads them
    (tests/sites/dying: the reply half-sent, then SIGTERM). The collect stage ends at its deadline
    without it; sites 0 and 1 send the shares of its mask key, and the round's update is the one
    the clear sum of sites 0 and 1 gives (the same federation inline, site 2 failing), to
    within the quantisation (relative 1e-3: the sums agree to ~1e-5 of their values)."""
    config_file = write_config(federation_config(tiny_model_dir, tmp_path / "run", "florist-secure", *SETTINGS, *SECURE), tmp_path / "florist.toml")
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        start_signing_sites(deployment, site_data, tiny_model_dir, tmp_path, dying=2)
        run_id = deployment.submit({"config-file": str(config_file)})
        status = deployment.wait(run_id, RUN_TIMEOUT_SECONDS)
        log = deployment.log(run_id)
        nodes = {name: node.node_id for name, node in deployment.supernodes.items()}
        died = "half-sent" in deployment.supernodes["site2"].started.output()
        processes = deployment.processes()
    assert died and status == "finished:completed", log[-4000:]
    [record] = read_rounds(tmp_path / "run")[1:]
    assert record["secure"]["sites_summed"] == 2 and record["secure"]["keys_signed"] == 3
    assert sorted(client["node"] for client in record["clients"]) == sorted([nodes["site0"], nodes["site1"]])
    assert ("late", nodes["site2"]) in {(e["status"], e["node"]) for e in record["events"]}

    # The reference: the same round inline, summed in the clear, from sites 0 and 1 only.
    reference, grid = inline_reference(tiny_model_dir, site_data, tmp_path / "reference", *SETTINGS)
    grid.nodes[3].tamper = lambda instruction, reply: Message(Error(code=1, reason="site 2 is gone"), reply_to=instruction)
    expected = read_rounds(serve(reference, grid))[1]
    assert expected["secure"]["sites_summed"] == 2 and record["ranks"] == expected["ranks"]
    ours, theirs = deltas(tmp_path / "run"), deltas(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    for name, delta in theirs.items():
        assert (ours[name] - delta).norm() <= 1e-3 * delta.norm(), name
    leftover = still_running(processes)
    assert not leftover, f"processes outlived the deployment: {leftover}"


EVALUATED = [
    "federation.rounds=1", "federation.round_retries=0", f"federation.round_timeout={TIMEOUT}", "evaluation.base=true",
    "evaluation.server=false", "evaluation.federated=true", "privacy.min_category_count=1", "data.validation_fraction=0.3",
]
"""The base model and round 1's evaluated by the sites on a 30% validation carve, every category a site holds sent (a minimum of 1)."""


def test_real_supernodes_mask_their_evaluation_sums_and_the_run_records_the_clear_sums_total(tiny_model_dir, site_data, tmp_path, server_task):
    """The three sites evaluate the base model and round 1's on their validation carves, each
    evaluation's sums masked by the secure-sum protocol across the SuperNode processes. The run's
    combined evaluations are the same run's inline with every site's sums in the clear: counts
    exactly, each mean within 1e-4 (the quantisation's bound over these token counts is ~1e-6).
    (The inline sites also read the test split beside their files, which a SuperNode's data= file
    does not hold: its test metrics are not compared.)"""
    config_file = write_config(federation_config(tiny_model_dir, tmp_path / "run", "florist-secure", *EVALUATED, *SECURE), tmp_path / "florist.toml")
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        start_signing_sites(deployment, site_data, tiny_model_dir, tmp_path)
        run_id = deployment.submit({"config-file": str(config_file)})
        status = deployment.wait(run_id, RUN_TIMEOUT_SECONDS)
        log = deployment.log(run_id)
        processes = deployment.processes()
    assert status == "finished:completed", log[-4000:]
    masked = [record["federated_evaluation"] for record in read_rounds(tmp_path / "run")]
    reference, grid = inline_reference(tiny_model_dir, site_data, tmp_path / "reference", *EVALUATED)
    clear = [record["federated_evaluation"] for record in read_rounds(serve(reference, grid))]
    assert len(masked) == len(clear) == 2  # the base model's, round 1's
    for ours, theirs in zip(masked, clear):
        assert ours["sites_summed"] == 3 and {"val_loss", "val_tokens"} <= ours["combined"].keys() <= theirs["combined"].keys(), ours["combined"]
        for key, value in ours["combined"].items():
            expected = theirs["combined"][key]
            assert value == (expected if isinstance(expected, int) else pytest.approx(expected, rel=1e-4, abs=1e-6)), (key, ours["combined"], theirs["combined"])
    assert masked[0]["combined"] != masked[1]["combined"]  # round 1 trained something
    leftover = still_running(processes)
    assert not leftover, f"processes outlived the deployment: {leftover}"
