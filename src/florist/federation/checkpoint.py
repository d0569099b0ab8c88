"""The server's state after each complete round, so that a crashed server can resume.

`<run dir>/checkpoint/` holds one safetensors file per merged update (written once), the
current global adapter of the continuing methods, and `state.json`, written last and
atomically: a checkpoint is the state.json on disk, and every file it names is complete.
An update's file holds its LoRA factors and its tensors trained in full (`@dense:<name>`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from florist.aggregation import GlobalModule
from florist.config import RunConfig, first_difference, load_config
from florist.federation.delivery import GlobalUpdate
from florist.federation.payload import DENSE_PREFIX
from florist.reporting.run_directory import write_atomically

DIRECTORY = "checkpoint"
STATE = "state.json"
FORMAT = 1


@dataclass
class ServerState:
    round: int
    """The last complete round (0: only the base model was evaluated)."""
    chain: list[GlobalUpdate] = field(default_factory=list)
    current: GlobalUpdate | None = None
    truncations: dict[int, dict[str, GlobalModule]] = field(default_factory=dict)
    partition_of: dict[int, int] = field(default_factory=dict)
    confirmed: dict[int, int] = field(default_factory=dict)
    """What each node had confirmed; informational, since a new Flower run starts with empty node state."""
    metrics: list[dict] = field(default_factory=list)
    """The run's metrics records up to this round (metrics.jsonl is rewritten from them on resume)."""
    sampling_seed: int = 0


def _update_bytes(update: GlobalUpdate) -> bytes:
    tensors = {}
    for name, module in update.modules.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = module.A.contiguous(), module.B.contiguous()
    for name, tensor in update.dense.items():
        tensors[f"{DENSE_PREFIX}{name}"] = tensor.contiguous()
    scales = json.dumps({name: module.scale for name, module in update.modules.items()})
    return save(tensors, metadata={"scales": scales, "dense": json.dumps(list(update.dense))})


def _read_update(path: Path) -> GlobalUpdate:
    with safe_open(path, framework="pt") as handle:
        scales = json.loads(handle.metadata()["scales"])
        modules = {
            name: GlobalModule(A=handle.get_tensor(f"{name}.A"), B=handle.get_tensor(f"{name}.B"), scale=float(scale))
            for name, scale in scales.items()
        }
        # In the order the update had (safetensors sorts its keys): digests depend on it.
        dense = {name: handle.get_tensor(f"{DENSE_PREFIX}{name}") for name in json.loads(handle.metadata().get("dense", "[]"))}
        return GlobalUpdate(modules, dense)


def save_state(run_dir: Path, state: ServerState) -> None:
    directory = run_dir / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, object] = {"chain": [], "current": None, "truncations": {}}
    for index, update in enumerate(state.chain, start=1):
        name = f"update-{index:04d}.safetensors"
        if not (directory / name).exists():  # an update never changes once written
            write_atomically(directory / name, _update_bytes(update))
        files["chain"].append(name)
    if state.current is not None:
        files["current"] = f"global-round{state.round}.safetensors"
        write_atomically(directory / files["current"], _update_bytes(state.current))
    for partition, modules in state.truncations.items():
        name = f"truncation-round{state.round}-client{partition}.safetensors"
        write_atomically(directory / name, _update_bytes(GlobalUpdate(modules)))
        files["truncations"][str(partition)] = name
    record = {
        "format": FORMAT,
        "round": state.round,
        "files": files,
        "partition_of": {str(node): p for node, p in state.partition_of.items()},
        "confirmed": {str(node): n for node, n in state.confirmed.items()},
        "sampling": {"seed": state.sampling_seed, "generator": "random.Random(f'{seed}:{round}') per round"},
        "metrics": state.metrics,
    }
    write_atomically(directory / STATE, json.dumps(record, indent=1) + "\n")
    referenced = {*files["chain"], files["current"], *files["truncations"].values(), STATE}
    for stale in directory.glob("*.safetensors"):
        if stale.name not in referenced:
            stale.unlink()


def load_state(run_dir: Path) -> ServerState | None:
    """The last complete round's state, or None when the run directory has no checkpoint yet."""
    path = run_dir / DIRECTORY / STATE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {record.get('format')!r}, expected {FORMAT}")
        files = record["files"]
        directory = path.parent
        return ServerState(
            round=int(record["round"]),
            chain=[_read_update(directory / name) for name in files["chain"]],
            current=_read_update(directory / files["current"]) if files["current"] else None,
            truncations={int(p): _read_update(directory / name).modules for p, name in files["truncations"].items()},
            partition_of={int(node): int(p) for node, p in record["partition_of"].items()},
            confirmed={int(node): int(n) for node, n in record["confirmed"].items()},
            metrics=list(record["metrics"]),
            sampling_seed=int(record["sampling"]["seed"]),
        )
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from None


def check_resumable(run_dir: Path, config: RunConfig) -> None:
    """A one-line error unless `run_dir` is a run directory whose fixed settings `config` keeps."""
    stored_path = run_dir / "config.toml"
    if not stored_path.is_file():
        raise ValueError(f"cannot resume {run_dir}: it is not a run directory (no config.toml)")
    stored = load_config(stored_path)
    difference = first_difference(stored.fixed_settings(), config.fixed_settings(), ("was", "now"))
    if difference:
        raise ValueError(f"cannot resume {run_dir}: setting {difference} cannot change in the middle of a run")
