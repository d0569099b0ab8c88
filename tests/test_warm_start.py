"""A warm-started client's upload through every wire format: what the server recovers of what the
client learned, against a float64 reference computed here and a cold start's error on the same wire."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from flwr.app import RecordDict

from florist.aggregation import GlobalModule, LoraFactors, change_since_start, learned_since_start, lora_scale, lora_start, start_of
from florist.federation import payload

LAST_RANKS = {"layers.0.q_proj": 3, "layers.0.v_proj": 6}
CLIENT_RANKS = [2, 3, 6, 8]
"""Heterogeneous clients: each starts from as many components as its rank (2 and 3 in both modules,
6 in v_proj) or from all the update has (6 and 8 in q_proj, 8 in v_proj), the rest fresh."""

FLOAT32_ROUNDING = 2 * torch.finfo(torch.float32).eps
"""What the server's own float32 products add even over a lossless wire."""


def through_wire(modules: dict[str, LoraFactors], wire: str) -> dict[str, LoraFactors]:
    """The factors as the server decodes them from a client's reply."""
    content = RecordDict()
    payload.put(content, "adapter", modules, wire)
    return {name: LoraFactors(A=m["A"], B=m["B"], scale=m["scale"]) for name, m in payload.take(content, "adapter").items()}


def dense(factors: LoraFactors) -> torch.Tensor:
    """s B A in float64, straight from the factors."""
    return factors.scale * factors.B.double() @ factors.A.double()


def as_served(factors: LoraFactors) -> torch.Tensor:
    """s B A as the server's float32 aggregation computes it."""
    return (factors.scale * factors.B @ factors.A).double()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def last_update(generator: torch.Generator, m: int, n: int, rank: int, decades: float) -> GlobalModule:
    """A FLoRIST update: orthonormal rows of A, B = U S with a spectrum decaying over `decades`."""
    u = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))[0]
    spectrum = torch.logspace(0, -decades, rank, dtype=torch.float64)
    return GlobalModule(A=v.T.float().contiguous(), B=(u * spectrum).float(), scale=1.0)


def component_sizes(generator: torch.Generator, rank: int) -> torch.Tensor:
    """Per-component magnitudes spread over two decades."""
    return 10 ** (torch.rand(rank, generator=generator) * 2 - 1)


def fresh_A(generator: torch.Generator, rank: int, n: int) -> torch.Tensor:
    """peft's init of A: kaiming-uniform, bound 1 / sqrt(n)."""
    return (torch.rand(rank, n, generator=generator) * 2 - 1) / math.sqrt(n)


def warm_client(generator: torch.Generator, started: LoraFactors, rank: int, n: int, ratio: float) -> LoraFactors:
    """A LoRA of `rank` that started from `started` (its leading components; the rest fresh, B = 0) and
    learned an update of `ratio` times the start's norm, changing every column of B and every row of A."""
    m, kept = started.B.shape[0], started.rank
    before_B = torch.cat([started.B, torch.zeros(m, rank - kept)], dim=1)
    before_A = torch.cat([started.A, fresh_A(generator, rank - kept, n)])
    change_B = torch.randn(m, rank, generator=generator) * component_sizes(generator, rank)
    change_A = torch.randn(rank, n, generator=generator) * component_sizes(generator, rank)[:, None] / math.sqrt(n)
    # The learned update to first order, s (dB A + B dA), is linear in the step: scale it to the ratio.
    first_order = started.scale * (change_B.double() @ before_A.double() + before_B.double() @ change_A.double())
    step = ratio * dense(started).norm().item() / first_order.norm().item()
    return LoraFactors(A=before_A + step * change_A, B=before_B + step * change_B, scale=started.scale)


def cold_client(generator: torch.Generator, m: int, n: int, rank: int, scale: float, norm: float) -> LoraFactors:
    """A fresh LoRA after training: A near its random init, B learned from 0, the update of this norm."""
    a = fresh_A(generator, rank, n) + 0.05 * torch.randn(rank, n, generator=generator) * component_sizes(generator, rank)[:, None] / math.sqrt(n)
    b = torch.randn(m, rank, generator=generator) * component_sizes(generator, rank)
    b = b * (norm / dense(LoraFactors(A=a, B=b, scale=scale)).norm().item())
    return LoraFactors(A=a, B=b, scale=scale)


@pytest.mark.parametrize("ratio", [0.03, 0.004])
@pytest.mark.parametrize("wire", payload.WIRE_FORMATS)
@settings(max_examples=5, deadline=None)
@given(
    sides=st.lists(st.tuples(st.integers(24, 64), st.integers(24, 64)), min_size=len(LAST_RANKS), max_size=len(LAST_RANKS)),
    decades=st.floats(1, 4),
    alphas_per_rank=st.lists(st.floats(0.5, 8), min_size=len(CLIENT_RANKS), max_size=len(CLIENT_RANKS)),
    rslora=st.lists(st.booleans(), min_size=len(CLIENT_RANKS), max_size=len(CLIENT_RANKS)),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_server_recovers_what_a_warm_started_client_learned_as_well_as_a_cold_start_over_any_wire(
    wire, ratio, sides, decades, alphas_per_rank, rslora, seed
):
    """Each client uploads its change since its start through the wire; the server adds the start
    back. The upload is as large as the LoRA. Against s B A - s B0 A0 in float64 (B0, A0 the LoRA the client started with), the error is
    at most twice that of a cold-started client's update of the same norm over the same wire (plus the
    float32 rounding of the server's own products): the start's size does not enter it.

    The last update's leading singular value is 1 and the clients' scales are those alpha_per_rank in
    [0.5, 8] gives: float16 has an error floor of its own below 6.1e-5 (subnormals), which a warm
    start's change, smaller than a cold start's factors, meets sooner for much smaller updates or
    larger scales."""
    generator = torch.Generator().manual_seed(seed)
    last = {name: last_update(generator, m, n, rank, decades) for (name, rank), (m, n) in zip(LAST_RANKS.items(), sides)}
    for rank, alpha_per_rank, rs in zip(CLIENT_RANKS, alphas_per_rank, rslora):
        scale = lora_scale(alpha_per_rank * rank, rank, rs)
        start = start_of(last, rank)
        trained, started = {}, {}
        for name, module in last.items():
            kept = min(rank, module.rank)
            started[name] = lora_start(start[name], scale)
            assert started[name].rank == kept and torch.equal(started[name].A, module.A[:kept])
            # The LoRA's start is the update's leading components at the client's scale.
            leading = module.scale * module.B[:, :kept].double() @ module.A[:kept].double()
            assert relative_error(dense(started[name]), leading) < 1e-6
            trained[name] = warm_client(generator, started[name], rank, module.A.shape[1], ratio)

        change = change_since_start(trained, start)
        assert {n: (c.A.shape, c.B.shape) for n, c in change.items()} == {n: (t.A.shape, t.B.shape) for n, t in trained.items()}
        recovered = learned_since_start(through_wire(change, wire), start)
        for name, module in last.items():
            learned = dense(trained[name]) - dense(started[name])
            assert learned.norm().item() == pytest.approx(ratio * dense(started[name]).norm().item(), rel=0.2)
            warm_error = relative_error(as_served(recovered[name]), learned)
            m, n = module.B.shape[0], module.A.shape[1]
            cold = cold_client(generator, m, n, rank, scale, learned.norm().item())
            cold_error = relative_error(as_served(through_wire({name: cold}, wire)[name]), dense(cold))
            assert warm_error <= 2 * cold_error + FLOAT32_ROUNDING, (name, rank, warm_error, cold_error)
