"""The server's state after each complete round, so that a crashed server can resume.

`<run dir>/checkpoint/` holds one safetensors file per merged update (written once), the
current global adapter of the continuing methods, FlexLoRA's truncations, and `state.json`,
written last and atomically: a checkpoint is the state.json on disk, and every file it names is
complete. An update's file holds its LoRA factors and its tensors trained in full (`@dense:<name>`).

A checkpoint is trusted no more than a node's reply. state.json records the sha256 of every file
it names, and each file must have the name the server gives it (so none lies outside the folder)
and be a file of the folder, not a symbolic link. Before anything is restored, every file is
checked against its digest and every value against the server's own model and the run's records:
a checkpoint that fails is refused with one line naming the file and the key or module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from florist.aggregation import GlobalModule
from florist.config import RunConfig, first_difference, load_config
from florist.federation.delivery import GlobalUpdate
from florist.federation.payload import DENSE_PREFIX
from florist.reporting.run_directory import check_round_record, write_atomically

DIRECTORY = "checkpoint"
STATE = "state.json"
FORMAT = 2
"""2: state.json records each file's sha256. Format 1 had no digests and is refused."""


@dataclass
class ServerState:
    round: int
    """The last complete round (0: only the base model was evaluated)."""
    chain: list[GlobalUpdate] = field(default_factory=list)
    current: GlobalUpdate | None = None
    truncations: dict[int, dict[str, GlobalModule]] = field(default_factory=dict)
    partition_of: dict[int, int] = field(default_factory=dict)
    """node id -> the partition bound to it (LoraStrategy.partition_of): one node per partition."""
    confirmed: dict[int, int] = field(default_factory=dict)
    """What each node had confirmed; informational, since a new Flower run starts with empty node state."""
    metrics: list[dict] = field(default_factory=list)
    """The run's metrics records up to this round (metrics.jsonl is rewritten from them on resume)."""
    sampling_seed: int = 0


def _update_name(index: int) -> str:
    return f"update-{index:04d}.safetensors"


def _current_name(server_round: int) -> str:
    return f"global-round{server_round}.safetensors"


def _truncation_name(server_round: int, partition: int) -> str:
    return f"truncation-round{server_round}-client{partition}.safetensors"


def _shown(value) -> str:
    """`value` as a one-line message shows it: its repr, cut short (a tampered file's may be huge)."""
    text = repr(value)
    return text if len(text) <= 300 else f"{text[:297]}..."


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _update_bytes(update: GlobalUpdate) -> bytes:
    tensors = {}
    for name, module in update.modules.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = module.A.contiguous(), module.B.contiguous()
    for name, tensor in update.dense.items():
        tensors[f"{DENSE_PREFIX}{name}"] = tensor.contiguous()
    scales = json.dumps({name: module.scale for name, module in update.modules.items()})
    return save(tensors, metadata={"scales": scales, "dense": json.dumps(list(update.dense))})


def save_state(run_dir: Path, state: ServerState) -> None:
    directory = run_dir / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    # An update never changes once written, so the last checkpoint's file and digest are kept; one
    # it does not name is written again (a server that died before its state.json may have left one).
    kept = _recorded_digests(directory / STATE)
    digests: dict[str, str] = {}

    def write(name: str, update: GlobalUpdate) -> None:
        data = _update_bytes(update)
        write_atomically(directory / name, data)
        digests[name] = _sha256(data)

    files: dict[str, object] = {"chain": [], "current": None, "truncations": {}}
    for index, update in enumerate(state.chain, start=1):
        name = _update_name(index)
        if name in kept:
            digests[name] = kept[name]
        else:
            write(name, update)
        files["chain"].append(name)
    if state.current is not None:
        files["current"] = _current_name(state.round)
        write(files["current"], state.current)
    for partition, modules in state.truncations.items():
        files["truncations"][str(partition)] = _truncation_name(state.round, partition)
        write(files["truncations"][str(partition)], GlobalUpdate(modules))
    record = {
        "format": FORMAT,
        "round": state.round,
        "files": files,
        "sha256": digests,
        "partition_of": {str(node): p for node, p in state.partition_of.items()},
        "confirmed": {str(node): n for node, n in state.confirmed.items()},
        "sampling": {"seed": state.sampling_seed, "generator": "random.Random(f'{seed}:{round}') per round"},
        "metrics": state.metrics,
    }
    write_atomically(directory / STATE, json.dumps(record, indent=1) + "\n")
    for stale in directory.glob("*.safetensors"):
        if stale.name not in digests:
            stale.unlink()


def _recorded_digests(path: Path) -> dict[str, str]:
    """The digests the checkpoint on disk records: of files this server wrote, or verified on resuming."""
    try:
        return json.loads(path.read_text())["sha256"]
    except FileNotFoundError:
        return {}


def load_state(
    run_dir: Path, shapes: Mapping[str, tuple[int, int]], dense_shapes: Mapping[str, tuple[int, ...]], merges: bool
) -> ServerState | None:
    """The last complete round's state, or None when the run directory has no checkpoint yet.

    It is checked against the server's own model (`shapes`: (m, n) of each adapted module;
    `dense_shapes`: each tensor trained in full) and its method (`merges`: each round's update joins
    the chain, else clients continue from the current adapter). A checkpoint that fails a check is
    refused (ValueError, one line naming the file) before anything is restored.
    """
    directory = run_dir / DIRECTORY
    if directory.is_symlink():
        raise ValueError(f"{directory}: is a symbolic link; a run's checkpoint folder must be its own")
    path = directory / STATE
    if not os.path.lexists(path):
        return None
    record = _read_record(path)
    try:
        server_round = _natural(path, "round", record["round"])
        metrics = record["metrics"]
        rounds = [entry.get("round") if isinstance(entry, dict) else None for entry in metrics]
        if rounds != list(range(len(rounds))) or len(rounds) != server_round + 1:
            raise ValueError(f"{path}: round {server_round}, but metrics hold the records of rounds {_shown(rounds)}")
        for index, entry in enumerate(metrics):
            if (why := check_round_record(entry)) is not None:
                raise ValueError(f"{path}: metrics[{index}] {why}")
        chain, current, truncations = _file_names(path, record, server_round)
        _check_method(path, server_round, chain, current, truncations, merges)
        partition_of = _bindings(path, record["partition_of"])
        confirmed = _natural_map(path, "confirmed", record["confirmed"])
        for node, length in confirmed.items():
            if length > len(chain):
                raise ValueError(f"{path}: confirmed[{node}] is {length}, beyond the chain's {len(chain)} updates")
        sampling_seed = _integer(path, "sampling.seed", record["sampling"]["seed"])
        digests = record["sha256"]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: malformed checkpoint ({type(error).__name__}: {error})") from None

    def read(name: str, dense: Mapping[str, tuple[int, ...]]) -> GlobalUpdate:
        return _read_update(directory / name, digests[name], shapes, dense)

    return ServerState(
        round=server_round,
        chain=[read(name, dense_shapes) for name in chain],
        current=read(current, dense_shapes) if current else None,
        # A truncation is of the LoRA modules only: the tensors trained in full come with `current`.
        truncations={p: read(name, {}).modules for p, name in truncations.items()},
        partition_of=partition_of,
        confirmed=confirmed,
        metrics=list(metrics),
        sampling_seed=sampling_seed,
    )


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(_read_own_file(path))
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not a JSON checkpoint ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a JSON checkpoint (a {type(record).__name__}, not an object)")
    if record.get("format") == 1:
        raise ValueError(
            f"{path}: checkpoint format 1 records no file digests and cannot be verified; resume it with the "
            "florist that wrote it, or start the run again"
        )
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {_shown(record.get('format'))}, expected {FORMAT}")
    return record


def _file_names(path: Path, record: dict, server_round: int) -> tuple[list[str], str | None, dict[int, str]]:
    """The files state.json names, each under the name the server gives it (which lies in the
    checkpoint folder), and each with a digest."""
    files, digests = record["files"], record["sha256"]
    chain, current = list(files["chain"]), files["current"]
    truncations = {_natural_key(path, "files.truncations", p): name for p, name in files["truncations"].items()}
    named = [(f"files.chain[{index}]", name, _update_name(index + 1)) for index, name in enumerate(chain)]
    if current is not None:
        named.append(("files.current", current, _current_name(server_round)))
    named += [(f"files.truncations[{p}]", name, _truncation_name(server_round, p)) for p, name in truncations.items()]
    for key, name, expected in named:
        if name != expected:
            raise ValueError(f"{path}: {key} is {_shown(name)}, expected {expected!r}, a file of the checkpoint folder")
    if not isinstance(digests, dict):
        raise ValueError(f"{path}: sha256 is a {type(digests).__name__}, not a map of file names to digests")
    unnamed = sorted(set(digests) - {name for _, name, _ in named})
    if unnamed:
        raise ValueError(f"{path}: sha256 lists {_shown(unnamed[0])}, a file state.json does not name")
    for key, name, _ in named:
        if name not in digests:
            raise ValueError(f"{path}: {key} {name!r} has no sha256")
    return chain, current, truncations


def _check_method(
    path: Path, server_round: int, chain: list[str], current: str | None, truncations: dict[int, str], merges: bool
) -> None:
    """The files a round leaves: a merging method one chain update per round and nothing else, a
    continuing one a current adapter from round 1 on (and FlexLoRA's truncations) and no chain."""
    if merges:
        if len(chain) != server_round or current is not None or truncations:
            raise ValueError(
                f"{path}: round {server_round} with {len(chain)} chain updates, {'a' if current else 'no'} current adapter and "
                f"{len(truncations)} truncations; this method keeps one chain update per round and nothing else"
            )
    elif chain or (current is not None) != (server_round > 0):
        raise ValueError(
            f"{path}: round {server_round} with {len(chain)} chain updates and {'a' if current else 'no'} current adapter; "
            "this method keeps no chain, and a current adapter from round 1 on"
        )


def _read_own_file(path: Path) -> bytes:
    """The bytes of a regular file in the checkpoint folder; a symbolic link is refused, wherever it points."""
    try:
        # O_NONBLOCK: opening a FIFO planted in the folder must not hang the server.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing, though state.json names it") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path}: is a symbolic link; a checkpoint's files must be its own") from None
        raise
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            raise ValueError(f"{path}: not a regular file")
        return stream.read()


def _read_update(
    path: Path, digest: str, shapes: Mapping[str, tuple[int, int]], dense_shapes: Mapping[str, tuple[int, ...]]
) -> GlobalUpdate:
    """The update `path` holds, once its bytes match `digest` and its values fit the server's model."""
    data = _read_own_file(path)
    if _sha256(data) != digest:
        raise ValueError(f"{path}: its sha256 is not the one state.json records (the file changed after it was written)")
    try:
        tensors = load(data)
        metadata = _metadata(data)
        scales, dense_names = json.loads(metadata["scales"]), json.loads(metadata["dense"])
    except (SafetensorError, KeyError, TypeError, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: unreadable update ({type(error).__name__}: {error})") from None
    if not isinstance(scales, dict) or not (isinstance(dense_names, list) and all(isinstance(n, str) for n in dense_names)):
        raise ValueError(f"{path}: its metadata's scales must be a map and dense a list of names")
    _check_names(path, "module", set(scales), set(shapes), ("adapts", "does not adapt"))
    _check_names(path, "tensor", set(dense_names), set(dense_shapes), ("trains in full", "does not train in full"))
    stored = {key for name in scales for key in (f"{name}.A", f"{name}.B")} | {f"{DENSE_PREFIX}{name}" for name in dense_names}
    if set(tensors) != stored:
        key = sorted(set(tensors) ^ stored)[0]
        raise ValueError(f"{path}: {'holds' if key in tensors else 'lacks'} tensor {_shown(key)}, unlike what its metadata lists")
    modules = {name: _module(path, name, tensors[f"{name}.A"], tensors[f"{name}.B"], scale, shapes[name]) for name, scale in scales.items()}
    # In the order the update had (safetensors sorts its keys): digests depend on it.
    dense = {name: tensors[f"{DENSE_PREFIX}{name}"] for name in dense_names}
    for name, tensor in dense.items():
        _check_values(path, f"tensor {name}", tensor, tuple(dense_shapes[name]))
    return GlobalUpdate(modules, dense)


def _metadata(data: bytes) -> dict:
    """A safetensors file's metadata, which `load` drops: the header is its length (8 bytes) and JSON."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


def _check_names(path: Path, kind: str, held: set[str], expected: set[str], verbs: tuple[str, str]) -> None:
    """`held` names the same modules (or tensors) as the server's model; `verbs` say what it does with them, and does not."""
    if held != expected:
        name = sorted(held ^ expected)[0]
        if name in expected:
            raise ValueError(f"{path}: lacks {kind} {name}, which the server's model {verbs[0]}")
        raise ValueError(f"{path}: holds {kind} {_shown(name)}, which the server's model {verbs[1]}")


def _module(path: Path, name: str, a: torch.Tensor, b: torch.Tensor, scale, shape: tuple[int, int]) -> GlobalModule:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"{path}: module {name}: scale {_shown(scale)} is not a finite non-zero number")
    m, n = shape
    rank = a.shape[0] if a.ndim == 2 else -1
    _check_values(path, f"module {name}: lora_A", a, (rank, n))
    _check_values(path, f"module {name}: lora_B", b, (m, rank))
    return GlobalModule(A=a, B=b, scale=float(scale))


def _check_values(path: Path, label: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """`tensor` is float32 (as the server keeps every update), of the server model's `shape`, and finite."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{path}: {label} is {tuple(tensor.shape)}, expected {shape} by the server's model")
    if tensor.dtype != torch.float32:
        raise ValueError(f"{path}: {label} is {tensor.dtype}, expected torch.float32")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: {label} holds NaN or Inf values")


def _integer(path: Path, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}: {key} is {_shown(value)}, not an integer")
    return value


def _natural(path: Path, key: str, value) -> int:
    if _integer(path, key, value) < 0:
        raise ValueError(f"{path}: {key} is {value}, not an integer >= 0")
    return value


def _natural_key(path: Path, key: str, text: str) -> int:
    """A JSON object's key that stands for an integer >= 0 (a node id, a partition)."""
    if not re.fullmatch("0|[1-9][0-9]*", text):
        raise ValueError(f"{path}: {key} has the key {_shown(text)}, not an integer >= 0")
    return int(text)


def _natural_map(path: Path, key: str, value) -> dict[int, int]:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a map")
    return {_natural_key(path, key, k): _natural(path, f"{key}[{k}]", v) for k, v in value.items()}


def _bindings(path: Path, value) -> dict[int, int]:
    """partition_of: node ids bound to partitions, no partition bound to two nodes."""
    bindings = _natural_map(path, "partition_of", value)
    owners: dict[int, int] = {}
    for node, partition in bindings.items():
        if partition in owners:
            raise ValueError(f"{path}: partition_of binds partition {partition} to nodes {owners[partition]} and {node}; a partition has one node")
        owners[partition] = node
    return bindings


def check_resumable(run_dir: Path, config: RunConfig) -> None:
    """A one-line error unless `run_dir` is a run directory whose fixed settings `config` keeps."""
    stored_path = run_dir / "config.toml"
    if not stored_path.is_file():
        raise ValueError(f"cannot resume {run_dir}: it is not a run directory (no config.toml)")
    stored = load_config(stored_path)
    difference = first_difference(stored.fixed_settings(), config.fixed_settings(), ("was", "now"))
    if difference:
        raise ValueError(f"cannot resume {run_dir}: setting {difference} cannot change in the middle of a run")

