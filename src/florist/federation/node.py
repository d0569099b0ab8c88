"""What belongs to one site for one run: its settings under its policy, and its own examples.

The site's node configuration and what it allows are in federation/node_policy.py, which resolves
them against the run's settings into `NodeSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from florist.config import RunConfig
from florist.data import Example, carve_validation, load_examples
from florist.federation.datasets import federated_data


@dataclass(frozen=True)
class NodeSettings:
    """One site's settings for one run (`NodePolicy.admit`)."""

    partition: int
    data: Path | None
    """The site's training examples; None only in `florist run`, whose nodes take their part of the run's split."""
    test_data: Path | None
    rank: int
    alpha: float
    device: str
    threads: int
    quantization: str = "none"
    """How this site holds its frozen base: "none", "nf4" or "int8" (its node config's `quantization`)."""


@dataclass(frozen=True)
class NodeData:
    train: list[Example]
    validation: list[Example]
    """Carved from the site's own examples (data.validation_fraction), never trained on."""
    held_out: list[Example]
    """Test examples: the site's test-data file, else (`florist run` only) its share of the run's test split."""


def node_data(config: RunConfig, node: NodeSettings) -> NodeData:
    """This site's examples: its own files when its node config names them, else (`florist run`
    only) its partition of the split the run config defines."""
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
