"""A site's resident worker (`florist site-worker`) and the ClientApp that hands it each message
(federation/site_app.py): the worker runs in a subprocess of its own, started and stopped by PID;
the test plays the ClientApp processes Flower would start, one per message.

Its replies must be the in-process ClientApp's, the node's state must travel with each message,
the model must stay loaded between messages, and the socket must be refused to anyone but the
site's own user. tests/test_deployment.py runs it under real SuperNodes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from transformers import AutoModelForCausalLM

from deployment import VENV_BIN, environment, wait_until
from federations import federation_config
from florist.aggregation import GlobalModule
from florist.federation import payload, site_app
from florist.federation.client_app import CHAIN_DIGESTS, build_client_app
from florist.federation.datasets import federated_data
from florist.federation.delivery import GlobalUpdate, update_digest
from florist.federation.identity import identity_of
from florist.federation.messages import ADAPTER, IDENTITY, METRICS, TRAINED, Instruction, instruction_content, update_key
from florist.federation.worker_socket import receive_frame, send_frame

pytestmark = pytest.mark.usefixtures("server_task")

NOBODY = 65534
"""A uid that is not this process's: the socket must refuse it."""
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
WORKER_START_SECONDS = 120.0


@dataclass
class Worker:
    process: subprocess.Popen
    socket: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def private_directory() -> Iterator[Path]:
    """A short directory of this user's, mode 0700 (mkdtemp's): a Unix socket's path may hold at most 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="florist-worker-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def start_worker(socket_path: Path, log: Path) -> Worker:
    """`florist site-worker` in a session of its own, ready once it listens; the caller stops it by PID."""
    with open(log, "ab") as stream:
        process = subprocess.Popen(
            [str(VENV_BIN / "florist"), "site-worker", "--socket", str(socket_path)],
            env=environment(log.parent / "flwr-home"), stdout=stream, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    worker = Worker(process, socket_path, log)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the worker exited ({process.returncode}):\n{worker.output()[-3000:]}")
        return "listening at" in worker.output()

    try:
        wait_until(listening, WORKER_START_SECONDS, "the site worker to listen")
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: Worker) -> None:
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait(timeout=10)


@pytest.fixture
def worker(private_directory, tmp_path) -> Iterator[Worker]:
    started = start_worker(private_directory / "worker.sock", tmp_path / "worker.log")
    yield started
    stop_worker(started)


# -- what a SuperNode hands its ClientApp -----------------------------------------------------------


@pytest.fixture
def site(tmp_path, tiny_model_dir) -> dict:
    """A SuperNode's node config: its own data file and a copy of the tiny model it pins (a copy the
    test may delete once the worker has loaded it)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    examples = federated_data(federation_config(tiny_model_dir, tmp_path / "unused", "florist")).clients[1]
    data = tmp_path / "train.json"
    data.write_text(json.dumps([dataclasses.asdict(example) for example in examples]))
    return {"partition-id": 1, "data": str(data), "model": str(model), "threads": 1}


def update(server_round: int, base_model, rank: int = 2) -> dict:
    """A merged update of the q/v projections, different for every round."""
    generator = torch.Generator().manual_seed(server_round)
    return {
        name: GlobalModule(A=torch.randn(rank, module.in_features, generator=generator),
                           B=0.1 * torch.randn(module.out_features, rank, generator=generator), scale=1.0)
        for name, module in base_model.named_modules() if name.endswith(("q_proj", "v_proj"))
    }


def instruction(config, base_model, server_round: int, chain: list[dict], sent: dict[int, dict]) -> Message:
    """A train instruction for round `server_round` after `chain`, carrying the updates in `sent`;
    its id set as Flower sets it when the ClientApp process receives it."""
    identity = identity_of(config, base_model)
    digests = [update_digest(GlobalUpdate(modules)) for modules in chain]
    content = instruction_content(Instruction(server_round, digests, identity.fingerprint, identity.model_digest, identity.settings))
    for index, modules in sent.items():
        payload.put(content, update_key(index), modules, "float32")
    message = Message(content, dst_node_id=21, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def supernode_context(node_config: dict, run_config: dict) -> Context:
    return Context(run_id=7, node_id=21, node_config=node_config, state=RecordDict(), run_config=run_config)


@pytest.fixture
def federation(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first, second = update(1, base_model), update(2, base_model)
    messages = [
        instruction(config, base_model, 1, [], {}),
        instruction(config, base_model, 2, [first], {1: first}),
        # Update 1 is in the node's state since the message before: only update 2 travels.
        instruction(config, base_model, 3, [first, second], {2: second}),
    ]
    return config, messages


def status(reply: Message) -> str:
    assert not reply.has_error(), reply.error.reason
    return str(reply.content[IDENTITY]["status"])


def adapter(reply: Message) -> dict[str, torch.Tensor]:
    return {f"{name}.{factor}": tensor for name, module in payload.take(reply.content, ADAPTER).items()
            for factor, tensor in module.items() if isinstance(tensor, torch.Tensor)}


# -- forwarding ------------------------------------------------------------------------------------


def test_the_clientapp_module_flower_loads_imports_neither_torch_nor_transformers_nor_peft():
    code = ("import sys, florist.federation.site_app; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'florist.federation.client_app') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_worker_answers_as_the_clientapp_in_process_with_the_state_carried_and_the_model_kept_loaded(
    worker, site, federation, tiny_model_dir
):
    config, messages = federation
    node_config = site | {"worker-socket": str(worker.socket)}
    run_config = {"config-file": "", "overrides": ""}
    forwarded_context = supernode_context(node_config, run_config)
    forwarded = [site_app.app(messages[0], forwarded_context)]
    # The worker holds the model now: the site's copy of it can go, and the next messages still train.
    shutil.rmtree(site["model"])
    forwarded += [site_app.app(message, forwarded_context) for message in messages[1:]]
    assert [status(reply) for reply in forwarded] == [TRAINED] * 3
    assert [int(reply.content[METRICS]["chain-length"]) for reply in forwarded] == [0, 1, 2]
    # The node's state, as Flower would keep it, holds both updates with their digests.
    assert set(forwarded_context.state[CHAIN_DIGESTS]) == {"update:1", "update:2"}
    assert "listening at" in worker.output() and worker.process.poll() is None
    for message, reply in zip(messages, forwarded, strict=True):
        assert reply.metadata.reply_to_message_id == message.metadata.message_id
        assert (reply.metadata.src_node_id, reply.metadata.message_type) == (21, MessageType.TRAIN)

    # The same three messages answered in this process, as a SuperNode without a worker answers them
    # (the tiny model from where the fixture copied it: the same weights).
    local_context = supernode_context(site | {"model": str(tiny_model_dir)}, run_config)
    local = [build_client_app()(message, local_context) for message in messages]
    for forwarded_reply, local_reply in zip(forwarded, local, strict=True):
        assert status(forwarded_reply) == status(local_reply)
        ours, theirs = adapter(forwarded_reply), adapter(local_reply)
        assert ours.keys() == theirs.keys() and ours
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


# -- failures: one line naming the socket, and the site's next message goes on ---------------------


def error_of(reply: Message) -> str:
    assert reply.has_error(), "the forwarding did not fail"
    reason = reply.error.reason
    assert "\n" not in reason, reason
    return reason


def forwarded_to(socket_path: Path, message: Message, site: dict) -> Message:
    return site_app.app(message, supernode_context(site | {"worker-socket": str(socket_path)}, {}))


def test_no_worker_at_the_socket_is_an_error_reply_naming_it(private_directory, site, federation):
    _, messages = federation
    absent = private_directory / "absent.sock"
    assert error_of(forwarded_to(absent, messages[0], site)) == (
        f"no worker socket at {absent}: is `florist site-worker --socket {absent}` running?"
    )
    assert error_of(forwarded_to(Path("worker.sock"), messages[0], site)) == "the worker socket worker.sock must be an absolute path"


def test_a_worker_killed_leaves_its_socket_and_the_next_message_is_an_error_naming_it(worker, site, federation):
    _, messages = federation
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait(timeout=10)
    assert worker.socket.is_socket()
    reason = error_of(forwarded_to(worker.socket, messages[0], site))
    assert reason.startswith(f"no worker answers at {worker.socket} (Connection refused)")


@pytest.fixture
def dying_listener(private_directory) -> Iterator[tuple[Path, list[int]]]:
    """A process at the socket that reads the message's first frame and closes without replying,
    as a worker that dies mid-message does; yields the socket and the frame sizes it read."""
    path = private_directory / "dying.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    read: list[int] = []

    def serve_once() -> None:
        connection, _ = listener.accept()
        with connection:
            read.append(len(receive_frame(connection)))

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    yield path, read
    listener.close()
    thread.join(timeout=10)


def test_a_worker_that_dies_mid_message_is_an_error_reply_naming_the_socket(dying_listener, site, federation):
    path, read = dying_listener
    reason = error_of(forwarded_to(path, federation[1][0], site))
    assert reason.startswith(f"the worker at {path} stopped before it replied")
    assert read and read[0] > 0


def test_a_socket_directory_others_may_enter_is_refused_by_both_sides(private_directory, tmp_path, site, federation):
    os.chmod(private_directory, 0o755)
    path = private_directory / "worker.sock"
    done = subprocess.run([str(VENV_BIN / "florist"), "site-worker", "--socket", str(path)], capture_output=True, text=True,
                          env=environment(tmp_path / "flwr-home"), timeout=300)
    expected = f"the worker socket's directory {private_directory} has mode 0755: others may enter it; it must be 0700"
    assert (done.returncode, done.stderr.strip()) == (2, f"florist: error: {expected}")
    assert not path.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        assert error_of(forwarded_to(path, federation[1][0], site)) == expected


def test_a_worker_sent_bytes_that_are_no_message_goes_on_serving(worker, site, federation):
    for garbage in (b"\x00\x00\x00\x00\x00\x00\x00\x04\xff\xff\xff\xff", b"\xff" * 8, b"\x00\x00"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(str(worker.socket))
            connection.sendall(garbage)
            connection.shutdown(socket.SHUT_WR)
            assert connection.recv(1) == b""
    wait_until(lambda: worker.output().count("ignored a connection") == 3, 30, "the worker's three notes in its log")
    reply = forwarded_to(worker.socket, federation[1][0], site)
    assert status(reply) == TRAINED


@as_root
def test_a_socket_or_directory_of_another_user_is_refused(private_directory, site, federation):
    path = private_directory / "worker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        os.chown(path, NOBODY, NOBODY)
        assert error_of(forwarded_to(path, federation[1][0], site)) == (
            f"the worker socket {path} belongs to uid {NOBODY}, not to this user ({os.getuid()})"
        )
        os.chown(private_directory, NOBODY, NOBODY)
        assert error_of(forwarded_to(path, federation[1][0], site)) == (
            f"the worker socket's directory {private_directory} belongs to uid {NOBODY}, not to this user ({os.getuid()})"
        )


def connect_as(uid: int, path: Path) -> int:
    """In a child process running as `uid`: connect to `path`, send a frame, read the answer. The
    child's exit status: 0 if it got a frame back, 1 if the connection was closed (or reset) unanswered."""
    pid = os.fork()
    if pid == 0:
        status = 2
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.connect(str(path))
                try:
                    send_frame(connection, b"\x00" * 16)
                    receive_frame(connection)
                    status = 0
                except (EOFError, ConnectionError):
                    status = 1
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@as_root
def test_the_worker_answers_no_process_of_another_user_and_goes_on_serving_its_own(worker, site, federation):
    # Permissions loosened by mistake: the kernel's word on the peer's uid is the last check.
    os.chmod(worker.socket.parent, 0o755)
    os.chmod(worker.socket, 0o777)
    assert connect_as(NOBODY, worker.socket) == 1
    wait_until(lambda: f"refused a connection from uid {NOBODY}" in worker.output(), 30, "the worker's refusal in its log")
    os.chmod(worker.socket.parent, 0o700)
    # Its own user is still answered: a node config without partition-id is refused by the node's policy.
    unnamed = {key: value for key, value in site.items() if key != "partition-id"}
    assert error_of(forwarded_to(worker.socket, federation[1][0], unnamed)).startswith("node config lacks partition-id")
