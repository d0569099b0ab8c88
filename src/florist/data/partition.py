"""Splitting examples between clients (non-IID by category, or IID) and carving off validation sets."""

from __future__ import annotations

import random
import warnings
from typing import TYPE_CHECKING

import datasets

from florist.data.prompts import Example

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

SCHEMES = ("dirichlet", "iid")


def partition(
    examples: list[Example],
    num_clients: int,
    alpha: float = 0.5,
    seed: int = 42,
    min_size: int = 1,
    *,
    scheme: str = "dirichlet",
    self_balancing: bool = False,
) -> list[list[Example]]:
    """Every example assigned to exactly one of `num_clients` clients.

    "dirichlet" draws each category's share per client from Dir(alpha), as the paper split Dolly (alpha 0.5,
    min 40, seed 42); "iid" shuffles with the seed and deals equal shards. Every client gets at least `min_size`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if num_clients < 1 or min_size < 1:
        raise ValueError(f"num_clients and min_size must be at least 1, got {num_clients} and {min_size}")
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha}")
    if num_clients * min_size > len(examples):
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} examples each from {len(examples)} examples; "
            "use fewer clients, a smaller min size, or more data"
        )
    # Imported here: flwr_datasets pulls seaborn and scipy in through its plotting package (seconds of
    # CPU), and a SuperNode's ClientApp, which imports florist.data once per message, never partitions.
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = datasets.Dataset.from_dict(
        {"position": list(range(len(examples))), "category": [example.category for example in examples]}
    )
    if scheme == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions=num_clients)
        table = table.shuffle(seed=seed)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="category",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=self_balancing,
            seed=seed,
        )
    partitioner.dataset = table
    return [[examples[position] for position in shard] for shard in _positions(partitioner, alpha, min_size)]


def _positions(partitioner: Partitioner, alpha: float, min_size: int) -> list[list[int]]:
    # The partitioner warns on every redraw that misses min_size and gives up after ten; one clear error is enough.
    # Its other failures (bad alpha, more clients than examples) were ruled out before, so a ValueError is that one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return [partitioner.load_partition(client)["position"] for client in range(partitioner.num_partitions)]
        except ValueError as error:
            raise ValueError(
                f"the Dirichlet split (alpha {alpha}) left a client with fewer than {min_size} examples in 10 draws; "
                "raise alpha, lower the min size, use fewer clients, or try another seed"
            ) from error


def carve_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a random `fraction` of the examples, at least one, held out; both keep their order."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(examples) < 2:
        raise ValueError(f"cannot carve a validation set out of {len(examples)} example(s); need at least 2")
    count = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    train = [example for position, example in enumerate(examples) if position not in held_out]
    validation = [example for position, example in enumerate(examples) if position in held_out]
    return train, validation
