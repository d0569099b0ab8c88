"""The deployment of README "Run on several machines": the SuperLink on a loopback port, and nginx
(deploy/nginx-fleet-only.conf) on the sites' port passing the Fleet API alone. A party holding
`ca.crt` and the sites' address, but not the server's shell, is refused every Control API command;
the SuperNodes, which reach the SuperLink only through the proxy, train a federation to the end.

The same federation's sites quantise, or not, as their own node configs choose: one holds its base
in nf4, one in int8, one in full precision. They agree with the full-precision server on the base
(its unquantised digest), train two rounds of FLoRIST (the second on the first's global update),
and the final adapter loads with peft on the full-precision base.

Real processes on loopback, as tests/test_deployment.py: TLS, registered node keys, a private
FLWR_HOME per party, everything stopped by PID. The test starts nginx itself, from the binary the
Makefile's set-up installs.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deployment import CONNECTION, PROJECT, RENDER_NGINX_CONF, Deployment, still_running
from federations import CLIENT_RANKS, federation_config
from florist.federation.datasets import federated_data
from florist.reporting.run_directory import read_rounds

QUANTIZATIONS = ("nf4", "int8", "none")
"""Each site's `quantization` node config, by site."""
ROUNDS = 2
RUN_TIMEOUT_SECONDS = 600
OUTSIDER = "outsider"


def site_files(config, directory: Path) -> list[Path]:
    """Each site's own training file: its part of the run's split of the embedded task."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for site, examples in enumerate(federated_data(config).clients):
        files.append(directory / f"client_{site}.json")
        files[-1].write_text(json.dumps([dataclasses.asdict(example) for example in examples]))
    return files


def outsider_home(deployment: Deployment, port: int) -> dict[str, str]:
    """The environment of a party with only `ca.crt` and an address: a FLWR_HOME of its own whose one
    connection points at 127.0.0.1:`port`."""
    home = deployment.root / f"outsider-home-{port}"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{OUTSIDER}"\n\n'
        f'[superlink.{OUTSIDER}]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{deployment.certificates.ca}"\n'
    )
    return {**deployment.env, "FLWR_HOME": str(home)}


def attempt(env: dict[str, str], *arguments: str) -> tuple[int, str]:
    """A `flwr` command, run to its end: its exit status and output."""
    done = subprocess.run(["flwr", *arguments], env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def post(deployment: Deployment, port: int, path: str, method: str = "POST") -> tuple[int, str]:
    """One empty protobuf request over TLS, the path sent exactly as given; status and body."""
    context = ssl.create_default_context(cafile=str(deployment.certificates.ca))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        connection.request(method, path, body=b"", headers={"content-type": "application/protobuf", "accept": "application/protobuf"})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


@dataclass
class ProxiedRun:
    """What the federation behind the proxy left: its run, what the outsider got, and the proxy's log."""

    deployment: Deployment
    run_id: int
    status: str
    log: str
    run_dir: Path
    refused: dict[str, tuple[int, str]]
    served: tuple[int, str]
    probes: dict[str, tuple[tuple[int, str], tuple[int, str]]]
    fleet_by_get: tuple[int, str]
    runs: list[dict]
    registered: list[dict]
    requests: list[tuple[str, int]]
    leftover: list


@pytest.fixture(scope="module")
def proxied(tiny_model_dir, tmp_path_factory) -> ProxiedRun:
    """Three quantising sites train through the proxy while an outsider tries every Control API
    command through it; every process is stopped before the tests look."""
    root = tmp_path_factory.mktemp("proxied")
    config = federation_config(tiny_model_dir, root / "run", "florist", f"federation.rounds={ROUNDS}")
    config_file = root / "florist.toml"
    config_file.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
    data = site_files(config, root / "sites")
    with Deployment(root / "deployment") as deployment:
        deployment.start_superlink()
        proxy = deployment.start_fleet_proxy()
        for site, quantization in enumerate(QUANTIZATIONS):
            node_config = {"partition-id": site, "data": str(data[site]), "model": str(tiny_model_dir), "quantization": quantization}
            deployment.add_supernode(f"site{site}", node_config)
        deployment.wait_for_nodes()
        run_id = deployment.submit({"config-file": str(config_file)})  # the operator, on the server

        outsider = outsider_home(deployment, proxy.port)
        intruder = deployment.node_key("intruder")
        commands = {
            "ls": ["ls", OUTSIDER],
            "run": ["run", str(PROJECT), OUTSIDER],
            "stop": ["stop", str(run_id), OUTSIDER],
            "supernode register": ["supernode", "register", f"{intruder}.pub", OUTSIDER],
        }
        refused = {name: attempt(outsider, *arguments) for name, arguments in commands.items()}
        # What the proxy withholds: the same party at the SuperLink's own port is served.
        served = attempt(outsider_home(deployment, deployment.port), "ls", OUTSIDER)
        probes = {
            path: (post(deployment, proxy.port, path), post(deployment, deployment.port, path))
            for path in ("/v1/control/list-runs", "/v1/control/list-nodes", "/v1/runtime/acquire-task")
        }
        fleet_by_get = post(deployment, proxy.port, "/v1/fleet/get-run", method="GET")

        status = deployment.wait(run_id, RUN_TIMEOUT_SECONDS)
        log = deployment.log(run_id)
        runs = json.loads(deployment.flwr("ls", CONNECTION, "--format", "json"))["runs"]
        registered = json.loads(deployment.flwr("supernode", "list", CONNECTION, "--format", "json"))["nodes"]
        requests = proxy.requests()
        processes = deployment.processes()
    return ProxiedRun(deployment, run_id, status, log, root / "run", refused, served, probes, fleet_by_get,
                      runs, registered, requests, still_running(processes))


def test_a_party_with_the_ca_and_the_public_port_is_refused_every_control_command_while_the_sites_train_through_the_proxy(proxied):
    run_id, deployment = proxied.run_id, proxied.deployment
    for name, (returncode, output) in proxied.refused.items():
        assert returncode != 0 and "403 Forbidden" in output, f"flwr {name} through the proxy: {output[-1000:]}"
    assert proxied.served[0] == 0 and f"{run_id}" in proxied.served[1], proxied.served[1][-1000:]
    for path, ((through_proxy, body), (direct, _)) in proxied.probes.items():
        assert through_proxy == 403 and "nginx" in body, f"{path} through the proxy: {through_proxy} {body[:200]}"
        assert direct != 403, f"{path} at the SuperLink itself: {direct}"
    assert proxied.fleet_by_get[0] == 403

    # Nothing the outsider tried took effect: one run, completed; only the sites' keys registered.
    assert proxied.status == "finished:completed", proxied.log[-4000:]
    assert [int(run["run-id"]) for run in proxied.runs] == [run_id]
    site_ids = {node.node_id for node in deployment.supernodes.values() if node.node_id}
    assert {int(node["node-id"]) for node in proxied.registered} == site_ids
    # The sites trained through the proxy: every round's replies came over its port, and no request
    # outside /v1/fleet/ was ever passed on.
    rounds = read_rounds(proxied.run_dir)
    assert [record["round"] for record in rounds] == list(range(ROUNDS + 1))
    for record in rounds[1:]:
        assert {client["node"] for client in record["clients"]} == site_ids
    assert rounds[-1]["evaluation"]["test_loss"] != rounds[0]["evaluation"]["test_loss"]
    assert ("POST /v1/fleet/push-messages HTTP/1.1", 200) in proxied.requests
    assert all(request.split()[1].startswith("/v1/fleet/") for request, code in proxied.requests if code != 403)
    assert not proxied.leftover, f"processes outlived the deployment: {proxied.leftover}"


def test_an_nf4_an_int8_and_a_full_precision_site_train_every_round_of_florist(proxied, tiny_model_dir):
    assert proxied.status == "finished:completed", proxied.log[-4000:]
    rounds = read_rounds(proxied.run_dir)
    assert [record["round"] for record in rounds] == list(range(ROUNDS + 1))
    for record in rounds[1:]:
        # Every site's reply was accepted: none was refused as a mismatch of the base model.
        assert [client["partition"] for client in record["clients"]] == list(range(len(CLIENT_RANKS))), record.get("events")
    assert rounds[-1]["evaluation"]["test_loss"] != rounds[0]["evaluation"]["test_loss"]

    # final/model is saved in full precision, and the last global adapter loads with peft on the unquantised base.
    saved = json.loads((proxied.run_dir / "final" / "model" / "config.json").read_text())
    assert saved.get("quantization_config") is None
    final = load_file(proxied.run_dir / "final" / "model" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in final.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pristine = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, proxied.run_dir / "final" / "adapter").merge_and_unload().state_dict()
    changed = [name for name in pristine if not torch.equal(merged[name], pristine[name])]
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)


NAMES = {"LISTEN": "203.0.113.10:9093", "SUPERLINK": "127.0.0.1:9091", "SUPERLINK_NAME": "superlink.example.org",
         "CERTIFICATE": "/srv/server.pem", "KEY": "/srv/server.key", "CA": "/srv/ca.crt", "STATE": "/srv/nginx"}


def render(**names: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RENDER_NGINX_CONF), *(f"{name}={value}" for name, value in names.items())],
                          capture_output=True, text=True, timeout=30)


def test_the_template_is_filled_in_with_every_name_and_each_value_where_it_belongs():
    done = render(**NAMES)
    assert done.returncode == 0, done.stderr
    assert "@" not in done.stdout
    lines = [line.strip() for line in done.stdout.splitlines()]
    for expected in ("listen 203.0.113.10:9093 ssl;", "server 127.0.0.1:9091;", "proxy_ssl_name superlink.example.org;",
                     "ssl_certificate /srv/server.pem;", "ssl_certificate_key /srv/server.key;",
                     "proxy_ssl_trusted_certificate /srv/ca.crt;", "pid /srv/nginx/nginx.pid;"):
        assert expected in lines, expected


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ({**NAMES, "CA": None}, "CA is missing"),
        ({**NAMES, "PORT": "9093"}, "unknown name PORT"),
        ({**NAMES, "KEY": "server.key"}, "KEY=server.key is not an absolute path"),
        ({**NAMES, "LISTEN": ""}, "LISTEN is empty"),
        ({**NAMES, "STATE": "/srv/my nginx"}, "STATE=/srv/my nginx: spaces"),
        ({**NAMES, "SUPERLINK": "127.0.0.1:9091; include /etc/passwd"}, "SUPERLINK=127.0.0.1:9091; include"),
        ({**NAMES, "SUPERLINK_NAME": "$host"}, "SUPERLINK_NAME=$host: spaces"),
        ({**NAMES, "LISTEN": "9093}"}, "LISTEN=9093}: spaces"),
    ],
)
def test_a_missing_unknown_or_malformed_name_is_refused_in_one_line_naming_it(names, message):
    done = render(**{name: value for name, value in names.items() if value is not None})
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
