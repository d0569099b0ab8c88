"""A real Flower federation on loopback, for tests: a SuperLink and SuperNodes as separate processes
with TLS and SuperNode authentication, driven through the `flwr` CLI as an operator would.

Every process is started in a session of its own and stopped by PID together with every
descendant it spawned (superexec, flwr-serverapp, flwr-clientapp), also when a test fails.
The SuperLink listens on a free port and is checked to be the process we started, so a test
never talks to a SuperLink left behind by someone else; `FLWR_HOME` is private to each
deployment, so neither is Flower's default `local` connection ever used.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import florist

PROJECT = Path(__file__).resolve().parents[1]
"""The Flower app `flwr run` packs: this repository ([tool.flwr.app] in pyproject.toml)."""

VENV_BIN = Path(sys.executable).parent
"""flower-superlink, flower-supernode and flwr, and the flower-superexec, flwr-serverapp and
flwr-clientapp that those start by name, all come from the environment running the tests."""

RENDER_NGINX_CONF = PROJECT / "deploy" / "render-nginx-conf"
"""Fills in deploy/nginx-fleet-only.conf, the proxy the README puts in front of the SuperLink."""

CONNECTION = "florist-test"
PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 5.0


class DeploymentError(RuntimeError):
    """A step of the deployment failed; the message names it and quotes the process's output."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_command(argv: list[str], env: Mapping[str, str], timeout: float = 60.0, cwd: Path | None = None) -> str:
    """Run a short command to completion; its stdout, or a DeploymentError quoting its output."""
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise DeploymentError(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


@dataclass(frozen=True)
class Certificates:
    ca: Path
    certificate: Path
    key: Path


def make_certificates(directory: Path, env: Mapping[str, str]) -> Certificates:
    """A private CA and a server certificate it signs, valid for localhost and 127.0.0.1.

    EC P-384 keys: made in milliseconds where RSA-4096 takes seconds, and accepted by gRPC.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    certificate, key, request = directory / "server.pem", directory / "server.key", directory / "server.csr"
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes"]
    run_command(["openssl", "req", "-x509", *new_key, "-keyout", str(ca_key), "-out", str(ca),
                 "-days", "1", "-subj", "/CN=florist test CA"], env)
    run_command(["openssl", "req", "-new", *new_key, "-keyout", str(key), "-out", str(request), "-subj", "/CN=localhost"], env)
    run_command(["openssl", "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(certificate), "-days", "1", "-extfile", str(extensions)], env)
    return Certificates(ca, certificate, key)


def make_node_key(directory: Path, name: str, env: Mapping[str, str]) -> Path:
    """An OpenSSH ECDSA P-384 key pair, as SuperNode authentication wants; returns the private key
    (the public one is beside it, with .pub appended)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    run_command(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", str(private)], env)
    return private


def federation_keys(directory: Path, count: int) -> tuple[list[Path], Path]:
    """`count` node keys (ssh-keygen, ECDSA P-384) and the peers file of their public halves."""
    keys = [make_node_key(directory, f"site-{index}", os.environ) for index in range(count)]
    peers = directory / "peers.pub"
    peers.write_text("# the federation's node keys\n" + "".join(key.with_name(key.name + ".pub").read_text() for key in keys))
    return keys, peers


def environment(flwr_home: Path) -> dict[str, str]:
    """What every process of the deployment runs with: this environment's executables first on
    PATH, the florist this process imported first on PYTHONPATH (the nodes import the installed
    package, not the FAB's copy), a private FLWR_HOME, and no runtime installation of the app's
    dependencies (it would pull a CUDA torch)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(florist.__file__).parents[1]), env.get("PYTHONPATH")]))
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs the child if the test process dies first (a CI timeout); the
    flwr processes below it watch their parent's PID and exit in turn."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass
class Started:
    """A process this deployment started, and every descendant seen so far (superexec is started
    in a new session, so the process group alone does not reach it)."""

    name: str
    popen: subprocess.Popen
    log: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def track(self) -> None:
        try:
            root = psutil.Process(self.popen.pid)
        except psutil.NoSuchProcess:
            return
        for child in descendants(root):
            self.seen.setdefault(child.pid, child)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(processes: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """Those of `processes` still running after `timeout`."""

    deadline = time.monotonic() + timeout
    remaining = [p for p in processes if running(p)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.1)
        remaining = [p for p in remaining if running(p)]
    return remaining


def stop_process_trees(processes: list[Started], signum: int = signal.SIGTERM) -> None:
    """Stop started processes and every descendant they had, all at once, by PID; SIGKILL what
    outlives the grace period."""
    tree = []
    for started in processes:
        started.track()
        if started.alive:
            tree.append(psutil.Process(started.popen.pid))
        tree += [p for p in started.seen.values() if running(p)]
    _signal_all(tree, signum)
    _signal_all(still_running(tree, STOP_GRACE_SECONDS), signal.SIGKILL)
    for started in processes:
        started.popen.wait(timeout=STOP_GRACE_SECONDS)


@contextmanager
def saturated_cores() -> Iterator[list[subprocess.Popen]]:
    """One busy-looping process per core this process may use, for the duration of the block (a
    site whose machine is busy with other work); each is stopped by its PID, also on failure."""
    burners = []
    try:
        for _ in os.sched_getaffinity(0):
            burners.append(subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            ))
        yield burners
    finally:
        for burner in burners:
            burner.kill()
            burner.wait(timeout=STOP_GRACE_SECONDS)


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class SuperNode:
    name: str
    key: Path
    node_config: dict[str, object]
    port: int
    node_id: int | None
    """Given by the SuperLink at registration; None for a key never registered."""
    env: Mapping[str, str] | None = None
    """The environment its processes run with, when not the deployment's."""
    started: Started | None = None


def node_config_argument(node_config: Mapping[str, object]) -> str:
    """--node-config's syntax: space-separated key=value with TOML values (strings quoted)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in node_config.items())


class Deployment:
    """A SuperLink and its SuperNodes under `root`; use as a context manager, which stops them all."""

    def __init__(self, root: Path, database: bool = True):
        """`database`: the SuperLink keeps its state in a file of its own (registrations survive a
        restart), as the README's set-up does; False keeps it in memory. Flower 1.42 waits at most
        5 s for SQLite's lock, which a CPU-starved machine can exceed (BENCHMARKS.md)."""
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = root / "flwr-home"
        self.env = environment(self.home)
        self.certificates = make_certificates(root / "certificates", self.env)
        self.keys = root / "keys"
        self.database = root / "superlink.db" if database else None
        self.port: int | None = None
        self.superlink: Started | None = None
        self.proxy: FleetProxy | None = None
        self.supernodes: dict[str, SuperNode] = {}
        self.started: list[Started] = []
        self.socket_directories: list[Path] = []

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    # -- processes -------------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Started:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as stream:
            popen = subprocess.Popen(argv, env=env or self.env, cwd=self.root, stdout=stream, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        started = Started(name, popen, log)
        self.started.append(started)
        return started

    def track(self) -> None:
        """Note every descendant of the processes we started, so that stop() reaches them by PID."""
        for started in self.started:
            if started.alive:
                started.track()

    def stop(self) -> None:
        """Stop every process this deployment started, with all their descendants."""
        # The proxy and the SuperLink last, so that SuperNodes stopping can still say goodbye to it.
        last = [self.proxy.started if self.proxy else None, self.superlink]
        stop_process_trees([started for started in self.started if started not in last])
        for started in last:
            if started is not None:
                stop_process_trees([started])
        for directory in self.socket_directories:
            shutil.rmtree(directory, ignore_errors=True)

    def processes(self) -> list[psutil.Process]:
        """Every process started so far and every descendant seen, running or not."""
        self.track()
        roots = [psutil.Process(started.popen.pid) for started in self.started if started.alive]
        return roots + [p for started in self.started for p in started.seen.values()]

    def start_superlink(self, timeout: float = 60.0) -> None:
        self.port = free_port()
        certificates = self.certificates
        self.superlink = self._start(
            "superlink",
            [
                "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
                "--ssl-ca-certfile", str(certificates.ca), "--ssl-certfile", str(certificates.certificate),
                "--ssl-keyfile", str(certificates.key), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                *(["--database", str(self.database)] if self.database else []),
            ],
        )
        wait_until(self._superlink_listening, timeout, f"the SuperLink to listen on 127.0.0.1:{self.port}")
        self._write_connection()

    def _superlink_listening(self) -> bool:
        """True once the port is held by the SuperLink we started; fails if it died (the port taken)."""
        return _listening(self.superlink, self.port, "the SuperLink")

    def start_fleet_proxy(self, timeout: float = 30.0) -> FleetProxy:
        """nginx on a port of its own in front of the SuperLink, configured from the repository's
        template as the README does, with the SuperLink's certificate; SuperNodes started from now
        on connect through it. Its pid file, logs and temporary files stay under root/nginx."""
        executable = shutil.which("nginx", path=os.pathsep.join([self.env["PATH"], "/usr/sbin", "/sbin"]))
        if executable is None:
            raise DeploymentError("nginx is not installed: `make test` installs it (Makefile), or run apt-get install nginx")
        state = self.root / "nginx"
        state.mkdir(parents=True, exist_ok=True)
        port, certificates = free_port(), self.certificates
        configuration = state / "nginx.conf"
        configuration.write_text(run_command([
            str(RENDER_NGINX_CONF), f"LISTEN=127.0.0.1:{port}", f"SUPERLINK=127.0.0.1:{self.port}", "SUPERLINK_NAME=localhost",
            f"CERTIFICATE={certificates.certificate}", f"KEY={certificates.key}", f"CA={certificates.ca}", f"STATE={state}",
        ], self.env))
        started = self._start("nginx", [executable, "-p", str(state), "-e", str(state / "error.log"),
                                        "-c", str(configuration), "-g", "daemon off;"])
        self.proxy = FleetProxy(port, started, state / "access.log")
        wait_until(lambda: _listening(started, port, "nginx", also=state / "error.log"), timeout, f"nginx to listen on 127.0.0.1:{port}")
        return self.proxy

    @property
    def fleet_port(self) -> int:
        """Where SuperNodes connect: the proxy when there is one, else the SuperLink itself."""
        return self.proxy.port if self.proxy else self.port

    def _write_connection(self) -> None:
        """A named connection in this deployment's FLWR_HOME: the only SuperLink the CLI can reach."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certificates.ca}"\n'
        )

    def flwr(self, *arguments: str, timeout: float = 60.0) -> str:
        """A `flwr` CLI command against our SuperLink; its output."""
        if self.superlink is None or not self.superlink.alive:
            raise DeploymentError(f"flwr {arguments[0]}: the SuperLink this deployment started is not running")
        return run_command(["flwr", *arguments], self.env, timeout=timeout, cwd=self.root)

    def node_key(self, name: str) -> Path:
        """The named site's node key, made on first use (a site's node config may name it before its SuperNode starts)."""
        key = self.keys / name
        return key if key.exists() else make_node_key(self.keys, name, self.env)

    def register(self, key: Path) -> int:
        """Register a node's public key with the SuperLink; the node id it will have."""
        reply = self.flwr("supernode", "register", str(key.with_name(key.name + ".pub")), CONNECTION, "--format", "json")
        return int(json.loads(reply)["node-id"])

    def add_supernode(
        self, name: str, node_config: Mapping[str, object], register: bool = True, env: Mapping[str, str] | None = None
    ) -> SuperNode:
        """A new site: its key (registered unless told otherwise), then its SuperNode started, with
        `env` instead of the deployment's environment if given."""
        key = self.node_key(name)
        node_id = self.register(key) if register else None
        node = SuperNode(name, key, dict(node_config), free_port(), node_id, env)
        self.supernodes[name] = node
        self.start_supernode(name)
        return node

    def start_supernode(self, name: str) -> Started:
        """Start (or restart, with the same key and port) the named SuperNode."""
        node = self.supernodes[name]
        node.started = self._start(
            name,
            [
                "flower-supernode", "--superlink", f"127.0.0.1:{self.fleet_port}",
                "--root-certificates", str(self.certificates.ca),
                "--auth-supernode-private-key", str(node.key),
                "--node-config", node_config_argument(node.node_config),
                "--host", "127.0.0.1", "--port", str(node.port),
            ],
            node.env,
        )
        return node.started

    def start_site_worker(self, name: str, env: Mapping[str, str] | None = None, timeout: float = 120.0) -> tuple[Started, Path]:
        """A site's resident worker (`florist site-worker`), listening once this returns, with `env`
        instead of the deployment's environment if given; its socket, in a directory of its own under
        /tmp (mode 0700: mkdtemp's), where the path fits a Unix socket's 107 bytes. Stopped with the
        deployment; the directory removed."""
        directory = Path(tempfile.mkdtemp(prefix=f"florist-{name}-"))
        self.socket_directories.append(directory)
        socket_path = directory / "worker.sock"
        started = self._start(f"{name}-worker", ["florist", "site-worker", "--socket", str(socket_path)], env)

        def listening() -> bool:
            if not started.alive:
                raise DeploymentError(f"the site worker {name} exited:\n{started.output()[-3000:]}")
            return "listening at" in started.output()

        wait_until(listening, timeout, f"the site worker {name} to listen")
        return started, socket_path

    def kill_supernode(self, name: str) -> None:
        """SIGKILL a SuperNode and its ClientApp processes, as a crash or a pulled cable would."""
        stop_process_trees([self.supernodes[name].started], signal.SIGKILL)

    def online_nodes(self) -> set[int]:
        """The ids of the nodes the SuperLink lists as online."""
        listing = json.loads(self.flwr("supernode", "list", CONNECTION, "--format", "json"))
        return {int(node["node-id"]) for node in listing.get("nodes", []) if node.get("status") == "online"}

    def wait_for_nodes(self, names: list[str] | None = None, timeout: float = 60.0) -> None:
        """Wait until the named SuperNodes (default: every registered one) are online; fails at once
        if one of them exits. The SuperLink is asked only once each node's log says it was let in
        ("SuperNode ID: N"): each `flwr supernode list` costs ~1.5 s of CPU, which the starting
        nodes need on a busy machine."""
        nodes = [self.supernodes[name] for name in names] if names else [n for n in self.supernodes.values() if n.node_id]

        def connected() -> bool:
            for node in nodes:
                if not node.started.alive:
                    raise DeploymentError(f"SuperNode {node.name} exited:\n{node.started.output()[-3000:]}")
            if not all(f"SuperNode ID: {node.node_id}" in node.started.output() for node in nodes):
                return False
            return {node.node_id for node in nodes} <= self.online_nodes()

        wait_until(connected, timeout, f"SuperNodes {[node.name for node in nodes]} online", interval=0.5)

    # -- runs --------------------------------------------------------------------------------------

    def submit(self, run_config: Mapping[str, object]) -> int:
        """`flwr run` this project with the run config; the run id."""
        arguments = ["run", str(PROJECT), CONNECTION, "--format", "json"]
        if run_config:
            arguments += ["--run-config", node_config_argument(run_config)]
        reply = json.loads(self.flwr(*arguments, timeout=120.0))
        if not reply.get("success", False) or "run-id" not in reply:
            raise DeploymentError(f"flwr run failed: {reply}")
        return int(reply["run-id"])

    def run_info(self, run_id: int) -> dict:
        """`flwr ls` on one run: status, status-details (a failed run's reason), timestamps, traffic."""
        reply = json.loads(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))
        return reply["runs"][0]

    def status(self, run_id: int) -> str:
        return self.run_info(run_id)["status"]

    def wait(self, run_id: int, timeout: float) -> str:
        """Follow the run's log until it ends, then confirm with `flwr ls`; the final status (e.g.
        finished:completed). `flwr log --stream` returns when the run ends; `flwr ls` is asked
        every 15 s as well, not every second, since each flwr command costs ~1.5 s of CPU."""
        follower = self._start(f"run-{run_id}", ["flwr", "log", str(run_id), CONNECTION, "--stream"])
        asked = time.monotonic()

        def finished() -> str | None:
            nonlocal asked
            self.track()
            if follower.alive and time.monotonic() - asked < 15.0:
                return None
            asked = time.monotonic()
            status = self.status(run_id)
            return status if status.startswith("finished") else None

        try:
            return wait_until(finished, timeout, f"run {run_id} to finish", interval=0.5)
        except DeploymentError as error:
            raise DeploymentError(f"{error}; its log so far:\n{follower.output()[-4000:]}") from None
        finally:
            stop_process_trees([follower])

    def log(self, run_id: int) -> str:
        """The ServerApp's log of a run, as `flwr log` prints it."""
        return self.flwr("log", str(run_id), CONNECTION, "--show")

    def serverapp_processes(self) -> list[psutil.Process]:
        """The flwr-serverapp processes under the SuperLink we started (never anyone else's)."""
        self.track()
        return [p for p in self.superlink.seen.values() if running(p) and _runs("flwr-serverapp", p)]

    def clientapp_processes(self, name: str) -> list[psutil.Process]:
        """The flwr-clientapp processes under the named SuperNode: one per message it is handling."""
        started = self.supernodes[name].started
        started.track()
        return [p for p in started.seen.values() if running(p) and _runs("flwr-clientapp", p)]

    def kill_serverapp(self) -> int:
        """SIGKILL the running ServerApp, as a server crash would; its PID."""
        processes = wait_until(self.serverapp_processes, 60.0, "a running flwr-serverapp")
        _signal_all(processes, signal.SIGKILL)
        still_running(processes, STOP_GRACE_SECONDS)
        return processes[0].pid


@dataclass(frozen=True)
class FleetProxy:
    port: int
    started: Started
    access_log: Path

    def requests(self) -> list[tuple[str, int]]:
        """The requests nginx answered, in order, from its access log (the combined format):
        ("POST /v1/fleet/pull-messages HTTP/1.1", 200)."""
        log = self.access_log.read_text() if self.access_log.exists() else ""
        return [(fields[1], int(fields[2].split()[0])) for fields in (line.split('"') for line in log.splitlines())]


def _listening(started: Started, port: int, what: str, also: Path | None = None) -> bool:
    """True once `port` is held by the process we started; fails, quoting its output (and the file
    `also`), if it exited (the port taken, a bad configuration)."""
    if not started.alive:
        more = also.read_text(errors="replace") if also and also.exists() else ""
        raise DeploymentError(f"{what} exited ({started.popen.returncode}):\n{started.output()[-3000:]}{more[-3000:]}")
    listening = psutil.Process(started.popen.pid).net_connections(kind="tcp")
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in listening)


def _runs(executable: str, process: psutil.Process) -> bool:
    try:
        return any(Path(part).name == executable for part in process.cmdline()[:2])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def recorded_rounds(run_dir: Path) -> int:
    """How many round records the run directory's metrics.jsonl holds (round 0, the base model's, included)."""
    metrics = run_dir / "metrics.jsonl"
    return sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.exists() else 0
