"""What each client trains on and what the server evaluates on, derived from the configuration.

In `florist run` every process (server, simulation workers) derives the same split from the same
configuration and seed, so no data crosses the network. A deployment's sites train on their own
files (`data.source = "node-local"`): there the server derives only its held-out examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from florist.config import NODE_LOCAL, RunConfig
from florist.data import Example, carve_validation, generate_embedded, load_clients, load_examples, partition


@dataclass(frozen=True)
class FederatedData:
    clients: list[list[Example]]
    test: list[Example]
    client_validation: list[list[Example]] = ()
    """Each client's validation carve (never trained on): the nodes' own, for choosing tau."""

    @property
    def validation(self) -> list[Example]:
        """Every client's validation carve, pooled: the server's validation set."""
        return [example for examples in self.client_validation for example in examples]


def held_out(source: str) -> list[Example]:
    """Test examples: a whole file, a directory's test.json, or a dataset's "test" split."""
    return load_examples(source, split="train" if Path(source).is_file() else "test")


def _test_examples(config: RunConfig) -> list[Example]:
    """The examples `data.test_source` names."""
    data = config.data
    if data.test_source == "embedded":
        return generate_embedded(data.test_per_category, config.training.seed, split="test")
    return held_out(data.test_source) if data.test_source else []


def _split(config: RunConfig) -> FederatedData:
    data, clients, seed = config.data, config.federation.num_clients, config.training.seed
    if data.source == NODE_LOCAL:
        return FederatedData([], _test_examples(config))
    if data.source == "embedded":
        train = generate_embedded(data.examples_per_category, seed, split="train")
        test = generate_embedded(data.test_per_category, seed, split="test")
    elif data.partition == "given":
        given = load_clients(data.source)
        if len(given) < clients:
            raise ValueError(f"{data.source} holds {len(given)} client files, fewer than {clients} clients")
        train, test = None, held_out(data.source)
        parts = given[:clients]
    else:
        train, test = load_examples(data.source, split="train"), []
    if data.test_source:
        test = _test_examples(config)
    if train is not None:
        parts = partition(train, clients, data.dirichlet_alpha, seed, data.min_client_examples, scheme=data.partition)
    return FederatedData(parts, test)


def federated_data(config: RunConfig) -> FederatedData:
    """The split for this configuration, capped per client by `data.max_client_examples`."""
    return _cached_split(config.model_dump_json())


@lru_cache(maxsize=2)
def _cached_split(config_json: str) -> FederatedData:
    config = RunConfig.model_validate_json(config_json)
    split = _split(config)
    cap, fraction = config.data.max_client_examples, config.data.validation_fraction
    if cap:
        split = FederatedData([examples[:cap] for examples in split.clients], split.test)
    if fraction:
        # Carved from every client, so the validation set follows the clients' mixture.
        carved = [carve_validation(examples, fraction, config.training.seed + k) for k, examples in enumerate(split.clients)]
        split = FederatedData([train for train, _ in carved], split.test, [val for _, val in carved])
    for k, examples in enumerate(split.clients):
        if not examples:
            raise ValueError(f"client {k} has no training examples in {config.data.source}")
    return split
