"""What belongs to one site: its node configuration and its own data.

A SuperNode is started with `--node-config "partition-id=0 data=/site/train.jsonl ..."`. The
keys a site may set are in NODE_KEYS; the federation-wide settings come from the run config
every node receives. Simulation sets only partition-id and num-partitions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from florist.config import RunConfig
from florist.data import Example, carve_validation, load_examples
from florist.federation.datasets import federated_data

NODE_KEYS = {
    "partition-id": "this site's index (0-based): seeds its training and names it in the run directory",
    "num-partitions": "how many sites there are (set by the simulation; informational)",
    "data": "a JSON/JSONL file or a directory of this site's training examples",
    "test-data": "a JSON/JSONL file or directory of this site's held-out examples (federated evaluation)",
    "rank": "this site's LoRA rank (default: federation.ranks by partition id)",
    "alpha": "this site's lora_alpha (default: federation.alpha_per_rank * rank)",
    "device": "cpu, cuda or cuda:N (default: cuda when available)",
    "threads": "torch threads for this site's training (default: the cores this process may use / clients training at once)",
}


@dataclass(frozen=True)
class NodeSettings:
    partition: int
    data: Path | None
    test_data: Path | None
    rank: int
    alpha: float
    device: str
    threads: int

    @classmethod
    def from_node_config(cls, node_config: dict, config: RunConfig) -> NodeSettings:
        unknown = sorted(set(node_config) - set(NODE_KEYS))
        if unknown:
            raise ValueError(f"node config key {unknown[0]!r} is unknown; known keys: {', '.join(NODE_KEYS)}")
        if "partition-id" not in node_config:
            raise ValueError("node config lacks partition-id: start the SuperNode with --node-config \"partition-id=N ...\"")
        partition = _integer(node_config, "partition-id", minimum=0)
        rank = _integer(node_config, "rank", minimum=1) if "rank" in node_config else config.federation.rank_of(partition)
        alpha = _number(node_config, "alpha") if "alpha" in node_config else config.federation.alpha_per_rank * rank
        threads = (
            _integer(node_config, "threads", minimum=1)
            if "threads" in node_config
            # The cores shared by the clients training at once: more threads oversubscribe them (EMBEDDED.md).
            else max(1, len(os.sched_getaffinity(0)) // config.federation.parallel_clients)
        )
        return cls(
            partition=partition,
            data=_existing_path(node_config, "data"),
            test_data=_existing_path(node_config, "test-data"),
            rank=rank,
            alpha=alpha,
            device=_device(node_config),
            threads=threads,
        )


def _integer(node_config: dict, key: str, minimum: int) -> int:
    value = node_config[key]
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"node config {key}={value!r} is not an integer") from None
    if number != float(value) or number < minimum:
        raise ValueError(f"node config {key}={value!r} must be an integer >= {minimum}")
    return number


def _number(node_config: dict, key: str) -> float:
    value = node_config[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"node config {key}={value!r} is not a number") from None
    if not number > 0:
        raise ValueError(f"node config {key}={value!r} must be > 0")
    return number


def _existing_path(node_config: dict, key: str) -> Path | None:
    if key not in node_config:
        return None
    path = Path(str(node_config[key])).expanduser()
    if not path.exists():
        raise ValueError(f"node config {key}={node_config[key]!r}: no such file or directory")
    if path.is_dir() and not any(path.iterdir()) or path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"node config {key}={node_config[key]!r} is empty")
    return path


def _device(node_config: dict) -> str:
    device = str(node_config.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"node config device={device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"node config device={device!r}: this machine has no CUDA device")
    return device


@dataclass(frozen=True)
class NodeData:
    train: list[Example]
    validation: list[Example]
    """Carved from the site's own examples (data.validation_fraction), never trained on."""
    held_out: list[Example]
    """Test examples: the site's test-data file, else its share of the run's test split."""


def node_data(config: RunConfig, node: NodeSettings) -> NodeData:
    """This site's examples: its own files when its node config names them, else its partition
    of the split the run config defines (the simulation, and the embedded task)."""
    return _node_data(config.model_dump_json(), node)


@lru_cache(maxsize=8)
def _node_data(config_json: str, node: NodeSettings) -> NodeData:
    config = RunConfig.model_validate_json(config_json)
    fraction = config.data.validation_fraction
    held_out: list[Example] = []
    if node.data is not None:
        train = load_examples(node.data)
        if config.data.max_client_examples:
            train = train[: config.data.max_client_examples]
        validation: list[Example] = []
        if fraction:
            train, validation = carve_validation(train, fraction, config.training.seed + node.partition)
    else:
        split = federated_data(config)
        if node.partition >= len(split.clients):
            raise ValueError(
                f"node partition-id {node.partition} is outside the {len(split.clients)} clients of federation.num_clients; "
                "give the node its own data= file"
            )
        train = split.clients[node.partition]
        validation = split.client_validation[node.partition] if split.client_validation else []
        held_out = split.test[node.partition :: len(split.clients)]
    if node.test_data is not None:
        held_out = load_examples(node.test_data)
    if not train:
        raise ValueError(f"node {node.partition} has no training examples")
    return NodeData(train, validation, held_out)
