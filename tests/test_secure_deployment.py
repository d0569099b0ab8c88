"""A secure florist-secure round (privacy.secure_aggregation) on Flower's deployment engine: a SuperLink
and three SuperNodes on loopback (tests/deployment.py: TLS, node keys, its own FLWR_HOME, free ports),
each site signing its secure-sum keys with its SuperNode's node key and answering through its resident worker (the node's protocol state goes to the worker and back
with every message; and a ClientApp process that imports torch for each of the four stages would miss
the deadlines on a loaded machine), site 2 dying as it uploads its masked sketches."""

from __future__ import annotations

import json

import torch
from flwr.app import Error, Message

from deployment import Deployment, still_running
from federations import federation_config
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


def test_a_site_killed_after_masking_leaves_the_rounds_sum_correct_over_the_others(tiny_model_dir, site_data, tmp_path, server_task):
    """Site 2 trains, shares its keys and masks its sketches, then dies while it uploads them
    (tests/sites/dying: the reply half-sent, then SIGTERM). The collect stage ends at its deadline
    without it; sites 0 and 1 send the shares of its mask key, and the round's update is the one
    the clear sum of sites 0 and 1 gives (the same federation inline, site 2 failing), to
    within the quantisation (relative 1e-3: the sums agree to ~1e-5 of their values)."""
    config_file = write_config(federation_config(tiny_model_dir, tmp_path / "run", "florist-secure", *SETTINGS, *SECURE), tmp_path / "florist.toml")
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        # Each site signs its secure-sum keys with its SuperNode's key and trusts the three node keys.
        keys = [deployment.node_key(f"site{site}") for site in range(3)]
        peers = tmp_path / "peers.pub"
        peers.write_text("".join(key.with_name(key.name + ".pub").read_text() for key in keys))
        for site in range(3):
            _, socket_path = deployment.start_site_worker(f"site{site}")
            policy = {"worker-socket": str(socket_path), "secure-sum-key": str(keys[site]), "secure-sum-peers": str(peers)}
            env = None
            if site == 2:
                pythonpath = f"{DYING_SITE}:{SITE_CODE}:{deployment.env['PYTHONPATH']}"
                env = dict(deployment.env, PYTHONPATH=pythonpath, FLORIST_TEST_DIE_AT_REPLY=str(MASKED_INPUT_REPLY))
            deployment.add_supernode(f"site{site}", site_config(site, site_data, tiny_model_dir, **policy), env=env)
        deployment.wait_for_nodes()
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
    given = [f"data.source={json.dumps(str(site_data))}", 'data.partition="given"']
    reference = federation_config(tiny_model_dir, tmp_path / "reference", "florist-secure", *SETTINGS, *given)
    threads = site_config(0, site_data, tiny_model_dir)["threads"]
    grid = LocalGrid(build_client_app(reference), {node: {"partition-id": p, "threads": threads} for node, p in ((1, 0), (2, 1), (3, 2))})
    grid.nodes[3].tamper = lambda instruction, reply: Message(Error(code=1, reason="site 2 is gone"), reply_to=instruction)
    expected = read_rounds(serve(reference, grid))[1]
    assert expected["secure"]["sites_summed"] == 2 and record["ranks"] == expected["ranks"]
    ours, theirs = deltas(tmp_path / "run"), deltas(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    for name, delta in theirs.items():
        assert (ours[name] - delta).norm() <= 1e-3 * delta.norm(), name
    leftover = still_running(processes)
    assert not leftover, f"processes outlived the deployment: {leftover}"
