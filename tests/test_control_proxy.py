"""The deployment of README "Run on several machines": the SuperLink on a loopback port, and nginx
(deploy/nginx-fleet-only.conf) on the sites' port passing the Fleet API alone. A party holding
`ca.crt` and the sites' address, but not the server's shell, is refused every Control API command;
the SuperNodes, which reach the SuperLink only through the proxy, train a federation to the end.

Real processes on loopback, as tests/test_deployment.py: TLS, registered node keys, a private
FLWR_HOME per party, everything stopped by PID. The test starts nginx itself, from the binary the
Makefile's set-up installs. It takes 53 s on the shared 2-core machine at load 2, 109 s at load 14.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import ssl
import subprocess
from pathlib import Path

import pytest
import tomli_w

from deployment import CONNECTION, PROJECT, RENDER_NGINX_CONF, Deployment, still_running
from federations import federation_config
from florist.federation.datasets import federated_data
from florist.reporting.run_directory import read_rounds

SITES = 2
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


def test_a_party_with_the_ca_and_the_public_port_is_refused_every_control_command_while_the_sites_train_through_the_proxy(tiny_model_dir, tmp_path):
    extra = [f"federation.num_clients={SITES}", "federation.ranks=[2, 4]", "federation.rounds=1"]
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *extra)
    config_file = tmp_path / "florist.toml"
    config_file.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
    data = site_files(config, tmp_path / "sites")
    with Deployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        proxy = deployment.start_fleet_proxy()
        for site in range(SITES):
            deployment.add_supernode(f"site{site}", {"partition-id": site, "data": str(data[site]), "model": str(tiny_model_dir)})
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

    for name, (returncode, output) in refused.items():
        assert returncode != 0 and "403 Forbidden" in output, f"flwr {name} through the proxy: {output[-1000:]}"
    assert served[0] == 0 and f"{run_id}" in served[1], served[1][-1000:]
    for path, ((through_proxy, body), (direct, _)) in probes.items():
        assert through_proxy == 403 and "nginx" in body, f"{path} through the proxy: {through_proxy} {body[:200]}"
        assert direct != 403, f"{path} at the SuperLink itself: {direct}"
    assert fleet_by_get[0] == 403

    # Nothing the outsider tried took effect: one run, completed; only the sites' keys registered.
    assert status == "finished:completed", log[-4000:]
    assert [int(run["run-id"]) for run in runs] == [run_id]
    site_ids = {node.node_id for node in deployment.supernodes.values() if node.node_id}
    assert {int(node["node-id"]) for node in registered} == site_ids
    # The sites trained through the proxy: every round's replies came over its port, and no request
    # outside /v1/fleet/ was ever passed on.
    rounds = read_rounds(tmp_path / "run")
    assert [record["round"] for record in rounds] == [0, 1]
    assert {client["node"] for client in rounds[1]["clients"]} == site_ids
    assert rounds[1]["evaluation"]["test_loss"] != rounds[0]["evaluation"]["test_loss"]
    assert ("POST /v1/fleet/push-messages HTTP/1.1", 200) in requests
    assert all(request.split()[1].startswith("/v1/fleet/") for request, code in requests if code != 403)
    leftover = still_running(processes)
    assert not leftover, f"processes outlived the deployment: {leftover}"


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
