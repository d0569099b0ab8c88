"""Tensors trained in full (biases, modules_to_save) in the engine: the clients' weighted mean, by every method."""

from __future__ import annotations

import math

import pytest
import torch

from florist.aggregation import METHODS, AggregationError, ClientAdapter, LoraFactors, make_aggregator
from florist.aggregation.dense import weighted_mean

# Examples per client, far from equal: the clients' plain mean is 8-10 times the reference's norm
# away from their weighted mean, so every test against the reference fails for a plain mean.
WEIGHTS = [1579.0, 685.0, 3.0, 711.0]
# Per client: how far its trained tensors moved from the shared start; decades apart, and two
# clients nearly identical (equal up to 1e-7), as real sites with overlapping data can be.
SCALES = [1e-3, 1.0, 40.0, 1.0 + 1e-7]


def lora(generator: torch.Generator, rank: int) -> dict[str, LoraFactors]:
    return {"q": LoraFactors(A=torch.randn(rank, 12, generator=generator), B=torch.randn(8, rank, generator=generator), scale=2.0)}


def clients(dtype: torch.dtype = torch.float32) -> list[ClientAdapter]:
    """A bias and an lm_head-like matrix per client, each the shared start plus an update of the client's scale."""
    generator = torch.Generator().manual_seed(0)
    start = {"q.base_layer.bias": torch.randn(8, generator=generator), "lm_head.weight": torch.randn(50, 12, generator=generator)}
    direction = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in start.items()}
    return [
        ClientAdapter(
            modules=lora(generator, rank=2 + k),
            weight=weight,
            dense={name: (start[name] + scale * direction[name] * (1 + 0.1 * k)).to(dtype) for name in start},
        )
        for k, (weight, scale) in enumerate(zip(WEIGHTS, SCALES))
    ]


def reference(adapters: list[ClientAdapter]) -> dict[str, torch.Tensor]:
    """sum_k p_k T_k in float64 from the inputs."""
    total = sum(WEIGHTS)
    return {
        name: sum(weight / total * adapter.dense[name].double() for weight, adapter in zip(WEIGHTS, adapters))
        for name in adapters[0].dense
    }


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_weighted_mean_is_the_float64_reference_in_the_inputs_dtype(dtype, tolerance):
    adapters = clients(dtype)
    mean = weighted_mean(adapters)
    assert list(mean) == list(adapters[0].dense)
    for name, expected in reference(adapters).items():
        assert mean[name].dtype == dtype and mean[name].shape == expected.shape
        error = (mean[name].double() - expected).norm() / expected.norm()
        assert error < tolerance, (name, error.item())


SUMMING_SKETCHES = "florist-secure"
"""Sums sketches of the LoRA modules only: it refuses tensors trained in full (tested below)."""


@pytest.mark.parametrize("method", [m for m in METHODS if m != SUMMING_SKETCHES])
def test_every_method_returns_the_weighted_mean_beside_its_modules(method):
    adapters = clients(torch.float64)
    options = {"ranks": [2, 3, 4, 5]} if method == "flexlora" else {}
    if method == "ffa":  # FFA-LoRA clients share one A
        adapters = [ClientAdapter({"q": LoraFactors(adapters[0].modules["q"].A, c.modules["q"].B[:, :2], 2.0)}, c.weight, c.dense) for c in adapters]
    aggregate = make_aggregator(method, **options).aggregate(adapters)
    expected = reference(adapters)
    assert set(aggregate.dense) == set(expected)
    for name, tensor in aggregate.dense.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-12, atol=1e-12)


def test_the_sketch_method_refuses_tensors_trained_in_full():
    with pytest.raises(AggregationError, match="florist-secure sums LoRA sketches only; tensors trained in full are not supported"):
        make_aggregator(SUMMING_SKETCHES).aggregate(clients(torch.float64))


def test_adapters_without_dense_tensors_give_none():
    generator = torch.Generator().manual_seed(1)
    aggregate = make_aggregator("flora").aggregate([ClientAdapter(lora(generator, 2), 1.0), ClientAdapter(lora(generator, 3), 2.0)])
    assert aggregate.dense == {}


def edited(adapters: list[ClientAdapter], k: int, **dense) -> list[ClientAdapter]:
    changed = {name: tensor for name, tensor in {**adapters[k].dense, **dense}.items() if tensor is not None}
    return [*adapters[:k], ClientAdapter(adapters[k].modules, adapters[k].weight, changed), *adapters[k + 1 :]]


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda a: edited(a, 2, **{"lm_head.weight": None}), ["client 2", "lm_head.weight", "lacks"]),
        (lambda a: edited(a, 1, **{"embed_tokens.weight": torch.zeros(3)}), ["client 1", "embed_tokens.weight", "client 0 lacks"]),
        (lambda a: edited(a, 3, **{"q.base_layer.bias": torch.zeros(9)}), ["client 3", "q.base_layer.bias", "(9,)", "(8,)"]),
        (lambda a: edited(a, 1, **{"q.base_layer.bias": torch.full((8,), math.nan)}), ["client 1", "q.base_layer.bias", "NaN"]),
        (lambda a: edited(a, 2, **{"q.base_layer.bias": torch.zeros(8, dtype=torch.int64)}), ["client 2", "floating point"]),
    ],
    ids=["missing", "extra", "shape", "nan", "integer"],
)
def test_mismatched_dense_tensors_are_refused_naming_client_and_tensor(edit, named):
    with pytest.raises(AggregationError) as error:
        make_aggregator("florist").aggregate(edit(clients()))
    for part in named:
        assert part in str(error.value), (part, str(error.value))
