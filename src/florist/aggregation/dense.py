"""Tensors trained in full beside a LoRA (bias vectors, modules_to_save copies): the clients' weighted mean.

Every client starts such a tensor from the same value, so the weighted mean of the trained values is
that value plus the weighted mean of the clients' updates: for a bias, which only adds to the layer's
output, this is the exact aggregate; for a fully trained matrix (an lm_head, embeddings) it is FedAvg,
what federated learning does with any dense weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from florist.aggregation.types import AggregationError, ClientAdapter, client_weights


def _check_dense(clients: Sequence[ClientAdapter]) -> None:
    """Every client holds client 0's names with client 0's shapes, in floating point, finite."""
    expected = set(clients[0].dense)
    for k, client in enumerate(clients):
        missing, extra = expected - set(client.dense), set(client.dense) - expected
        if missing or extra:
            name = sorted(missing or extra)[0]
            which = "lacks a tensor trained in full that client 0 has" if missing else "has a tensor trained in full that client 0 lacks"
            raise AggregationError(which, client=k, module=name)
        for name, tensor in client.dense.items():
            reference = clients[0].dense[name]
            if tensor.shape != reference.shape:
                raise AggregationError(
                    f"tensor trained in full is {tuple(tensor.shape)} here but {tuple(reference.shape)} for client 0", client=k, module=name
                )
            if not tensor.is_floating_point():
                raise AggregationError(f"tensor trained in full must be floating point, got {tensor.dtype}", client=k, module=name)
            if not torch.isfinite(tensor).all():
                raise AggregationError("tensor trained in full holds NaN or Inf values", client=k, module=name)


def weighted_mean(clients: Sequence[ClientAdapter]) -> dict[str, Tensor]:
    """sum_k p_k T_k for every tensor the clients trained in full, in client 0's dtype and order.

    Computed in float32 (float64 when an input is float64), one tensor at a time, so the extra
    memory is one tensor whatever the number of clients.
    """
    weights = client_weights(clients).tolist()
    _check_dense(clients)
    mean = {}
    for name, reference in clients[0].dense.items():
        dtypes = {client.dense[name].dtype for client in clients}
        total = torch.zeros(reference.shape, dtype=torch.float64 if torch.float64 in dtypes else torch.float32)
        for weight, client in zip(weights, clients):
            total.add_(client.dense[name].to(total.dtype), alpha=weight)
        mean[name] = total.to(reference.dtype)
    return mean
