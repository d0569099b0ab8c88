"""The strategy message by message, with hand-built client replies: what each node is sent, what
counts as delivered, and what each method makes of the replies."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from florist.aggregation import ClientAdapter, GlobalModule, LoraFactors, make_aggregator
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.identity import settings_fingerprint
from florist.federation.messages import ADAPTER, CANDIDATE, CUTS, GAP, GLOBAL, IDENTITY, METRICS, TRAINED, Identity, Instruction, update_key
from florist.federation.strategy import LoraStrategy
from florist.federation.validation import screened_norms
from florist.lora.model import frozen_lora_A

CLIENT_RANKS = [2, 4, 8]
MODULES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}
PARTITION_OF = {11: 0, 22: 1, 33: 2}

pytestmark = pytest.mark.usefixtures("server_task")


def identity_for(config: RunConfig, digest: str = "model-digest") -> Identity:
    settings = config.shared_settings()
    return Identity(settings_fingerprint(settings), settings, digest)


def strategy_for(method: str, ranks: list[int] = CLIENT_RANKS, **federation) -> LoraStrategy:
    config = RunConfig.model_validate(
        {"federation": {"num_clients": len(ranks), "ranks": ranks, **federation}, "aggregation": {"method": method, "tau": 0.9}}
    )
    return LoraStrategy(config, MODULES, identity_for(config))


def client_factors(rank: int, seed: int, method: str) -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (m, n) in MODULES.items():
        a = frozen_lora_A(name, rank, n, 1234) if method == "ffa" else torch.randn(rank, n, generator=generator)
        factors[name] = LoraFactors(A=a, B=torch.randn(m, rank, generator=generator), scale=2.0)
    return factors


def reply(
    strategy: LoraStrategy, instruction: Message, partition: int, factors: dict[str, LoraFactors], chain_length: int | None = None, dense: dict | None = None
) -> Message:
    content = RecordDict({IDENTITY: strategy.identity.record(TRAINED)})
    frozen = strategy.config.aggregation.method == "ffa"
    payload.put(content, ADAPTER, factors, "float32", factors="B" if frozen else "AB", dense=dense)
    held = len(Instruction.read(instruction).chain) if chain_length is None else chain_length
    content[METRICS] = MetricRecord(
        {
            "round": Instruction.read(instruction).round,
            "partition-id": partition,
            "chain-length": held,
            "num-examples": 10 + partition,
            "rank": max(f.rank for f in factors.values()),
            "train-loss": 1.0,
            "train-steps": 1,
            "train-tokens": 5,
            "train-seconds": 0.1,
            "peak-rss-mib": 1.0,
        }
    )
    return Message(content, reply_to=instruction)


def play_round(strategy: LoraStrategy, server_round: int, partition_of: dict[int, int] = PARTITION_OF):
    """Instructions to every node, a reply from each, the aggregate; returns instructions and adapters."""
    strategy.begin_round(server_round, list(partition_of))
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, list(partition_of))}
    adapters = {}
    for node in reversed(list(partition_of)):  # replies arrive in any order
        partition = partition_of[node]
        adapters[partition] = client_factors(CLIENT_RANKS[partition], seed=100 * server_round + partition, method=strategy.config.aggregation.method)
        assert strategy.receive_train(node, reply(strategy, messages[node], partition, adapters[partition])) == []
    report = strategy.finish_round()
    return messages, adapters, report


def sent_payloads(message: Message) -> list[str]:
    return [key for key in message.content if key not in ("config",) and not key.endswith(":scales")]


def assert_modules_equal(received: dict[str, dict], expected: dict[str, GlobalModule], factors: str = "AB") -> None:
    assert list(received) == list(expected)
    for name, module in expected.items():
        assert set(received[name]) == {"scale", *factors}
        assert received[name]["scale"] == pytest.approx(module.scale)
        for factor in factors:
            assert torch.equal(received[name][factor], getattr(module, factor).float())



@pytest.mark.parametrize("method", ["florist", "flora"])
def test_merge_methods_send_each_update_until_a_reply_confirms_it(method):
    strategy = strategy_for(method)
    messages, _, report = play_round(strategy, 1)
    assert all(sent_payloads(m) == [] for m in messages.values())
    assert all(Instruction.read(m).round == 1 and m.metadata.message_type == MessageType.TRAIN for m in messages.values())
    assert [c.bytes_down for c in report.clients] == [0, 0, 0]
    assert [c.partition for c in report.clients] == [0, 1, 2]

    messages, _, report = play_round(strategy, 2)
    for message in messages.values():
        assert sent_payloads(message) == [update_key(1)]
        assert Instruction.read(message).chain == strategy.chain.digests[:1]
        assert_modules_equal(payload.take(message.content, update_key(1)), strategy.chain.updates[0].modules)
    assert [c.bytes_down for c in report.clients] == [messages[11].content[update_key(1)].count_bytes()] * 3

    # Node 33's round-2 reply never came: it is sent update 1 again. A new node 44 gets the whole chain.
    strategy.chain.confirmed[33] = 0
    nodes = {11: 0, 22: 1, 33: 2, 44: 2}
    strategy.begin_round(3, list(nodes))
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(3, list(nodes))}
    assert sent_payloads(messages[11]) == sent_payloads(messages[22]) == [update_key(2)]
    assert sent_payloads(messages[33]) == sent_payloads(messages[44]) == [update_key(1), update_key(2)]


def test_a_node_with_a_gap_is_sent_what_it_lacks_within_the_round():
    strategy = strategy_for("florist")
    play_round(strategy, 1)
    play_round(strategy, 2)
    strategy.begin_round(3, [11])
    (instruction,) = strategy.configure_train(3, [11])
    assert sent_payloads(instruction) == [update_key(2)]  # node 11 confirmed update 1 in its round-2 reply
    gap = RecordDict({IDENTITY: strategy.identity.record(GAP), METRICS: MetricRecord({"round": 3, "partition-id": 0, "needs-update": 1})})
    (resend,) = strategy.receive_train(11, Message(gap, reply_to=instruction))
    assert sent_payloads(resend) == [update_key(1), update_key(2)] and resend.metadata.dst_node_id == 11
    assert [e.status for e in strategy._round.report.events] == ["resent"]
    sent = [message.content[key].count_bytes() for message in (instruction, resend) for key in sent_payloads(message)]
    assert strategy._round.report.bytes_down[11] == sum(sent)  # every download counts, the resend's too


def test_fedit_sends_the_global_adapter_to_every_node():
    strategy = strategy_for("fedit")
    messages, adapters, _ = play_round(strategy, 1)
    assert all(sent_payloads(m) == [] for m in messages.values())
    reference = make_aggregator("fedit").aggregate([ClientAdapter(adapters[k], 10.0 + k) for k in range(3)])
    for name, module in reference.modules.items():
        assert torch.allclose(strategy.current.modules[name].delta(), module.delta(), atol=1e-5)
    messages, _, report = play_round(strategy, 2)
    for message in messages.values():
        assert sent_payloads(message) == [GLOBAL]
    assert [c.bytes_down for c in report.clients] == [messages[11].content[GLOBAL].count_bytes()] * 3
    assert len(strategy.chain) == 0


def test_ffa_sends_B_only_and_the_server_rederives_the_shared_A():
    strategy = strategy_for("ffa")
    _, adapters, _ = play_round(strategy, 1)
    weights = [10.0 + k for k in range(3)]
    reference = make_aggregator("ffa").aggregate([ClientAdapter(adapters[k], weights[k]) for k in range(3)])
    for name, module in reference.modules.items():
        assert torch.allclose(strategy.current.modules[name].delta(), module.delta(), atol=1e-6)
    strategy.begin_round(2, list(PARTITION_OF))
    for message in strategy.configure_train(2, list(PARTITION_OF)):
        assert sent_payloads(message) == [GLOBAL]
        assert all(key.endswith(".B") for key in message.content[GLOBAL])
        assert_modules_equal(payload.take(message.content, GLOBAL), strategy.current.modules, factors="B")


def test_flexlora_sends_each_node_its_own_truncation_and_an_unknown_node_the_shared_one():
    strategy = strategy_for("flexlora")
    _, adapters, _ = play_round(strategy, 1)
    reference = make_aggregator("flexlora").aggregate([ClientAdapter(adapters[k], 10.0 + k) for k in range(3)])
    nodes = [*PARTITION_OF, 44]
    strategy.begin_round(2, nodes)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, nodes)}
    for node, partition in PARTITION_OF.items():
        received = payload.take(messages[node].content, GLOBAL)
        assert {name: module["B"].shape[1] for name, module in received.items()} == {
            name: min(CLIENT_RANKS[partition], *shape) for name, shape in MODULES.items()
        }
        for name, module in received.items():
            got = module["scale"] * module["B"] @ module["A"]
            assert torch.allclose(got, reference.per_client[partition][name].delta(), atol=1e-5), (node, name)
    # A node the server has not heard from gets the shared (largest) truncation, whose leading components are its own.
    assert_modules_equal(payload.take(messages[44].content, GLOBAL), strategy.current.modules)


def test_the_server_holds_the_aggregate_as_the_wire_delivers_it():
    config = RunConfig.model_validate(
        {"federation": {"num_clients": 3, "ranks": CLIENT_RANKS}, "wire": {"download": "float16"}, "aggregation": {"method": "florist"}}
    )
    strategy = LoraStrategy(config, MODULES, identity_for(config))
    play_round(strategy, 1)
    for module in strategy.chain.updates[0].modules.values():
        assert module.A.dtype == torch.float32
        assert torch.equal(module.A, module.A.half().float()) and torch.equal(module.B, module.B.half().float())


def exact_factors(update: torch.Tensor) -> LoraFactors:
    """Factors whose product is `update` (float64), from its SVD."""
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    return LoraFactors(A=vh, B=u * s, scale=1.0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def warm_strategy(download: str = "float32") -> LoraStrategy:
    config = RunConfig.model_validate(
        {
            "federation": {"num_clients": 3, "ranks": CLIENT_RANKS, "warm_start": True},
            "aggregation": {"method": "florist", "tau": 0.9},
            "wire": {"download": download},
            "output": {"save_client_adapters": True},
        }
    )
    return LoraStrategy(config, MODULES, identity_for(config))


def test_a_warm_started_round_aggregates_what_each_client_learned():
    """From round 2 each client's LoRA starts from the leading components of update 1 at its rank, as
    its node received it (over an int8 download), and it uploads its change since that start: the
    server recovers s B A - s0 B0 A0 of each client and FLoRIST aggregates those."""
    strategy = warm_strategy(download="int8")
    _, first, _ = play_round(strategy, 1)
    reference = make_aggregator("florist", tau=0.9).aggregate([ClientAdapter(first[k], 10.0 + k) for k in range(3)])
    for name, module in reference.modules.items():  # round 1 has no start to add back
        assert relative_error(strategy.chain.updates[0].modules[name].delta(), module.delta()) < 2e-2  # int8's rounding

    strategy.begin_round(2, list(PARTITION_OF))
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, list(PARTITION_OF))}
    learned, fresh = {}, 0
    for node, partition in PARTITION_OF.items():
        received = payload.take(messages[node].content, update_key(1))
        change = client_factors(CLIENT_RANKS[partition], seed=200 + partition, method="florist")
        learned[partition] = {}
        for name, step in change.items():
            start, rank = received[name], step.rank
            kept = min(rank, start["B"].shape[1])
            fresh += rank - kept
            b0, a0 = start["B"][:, :kept].double(), start["A"][:kept].double()
            began_B = torch.cat([b0 * start["scale"] / step.scale, torch.zeros(b0.shape[0], rank - kept, dtype=torch.float64)], dim=1)
            began_A = torch.cat([a0, torch.zeros(rank - kept, a0.shape[1], dtype=torch.float64)])
            trained_B, trained_A = began_B + step.B.double(), began_A + step.A.double()
            learned[partition][name] = step.scale * trained_B @ trained_A - start["scale"] * b0 @ a0
        strategy.receive_train(node, reply(strategy, messages[node], partition, change))
    strategy.finish_round()
    assert fresh > 0  # the rank-8 client starts some components fresh

    for partition, adapter in enumerate(strategy.received):
        for name, factors in adapter.modules.items():
            assert relative_error(factors.scale * factors.B @ factors.A, learned[partition][name]) < 1e-5, (partition, name)
        # The norm screen judges the same adapter: what the client learned, not its start.
        learned_norm = math.sqrt(sum(dw.norm().item() ** 2 for dw in learned[partition].values()))
        assert screened_norms(adapter, {})["update"] == pytest.approx(learned_norm, rel=1e-5)
    own = [ClientAdapter({name: exact_factors(dw) for name, dw in learned[k].items()}, 10.0 + k) for k in range(3)]
    reference = make_aggregator("florist", tau=0.9).aggregate(own)
    for name, module in reference.modules.items():
        assert relative_error(strategy.chain.updates[1].modules[name].delta(), module.delta()) < 2e-2


def test_a_warm_started_upload_below_its_start_is_rejected():
    """A module uploaded at a rank below the start's cannot carry the start's rows: the reply is rejected."""
    strategy = warm_strategy()
    play_round(strategy, 1)
    strategy.begin_round(2, [33])
    (instruction,) = strategy.configure_train(2, [33])
    factors = client_factors(CLIENT_RANKS[2], seed=7, method="florist")
    name = "layers.0.q_proj"
    factors[name] = LoraFactors(A=factors[name].A[:1], B=factors[name].B[:, :1], scale=factors[name].scale)
    answer = reply(strategy, instruction, 2, factors)
    strategy.receive_train(33, answer)
    (event,) = strategy._round.report.events
    assert event.status == "rejected" and name in event.reason and "below the warm start's" in event.reason


@pytest.mark.parametrize("rank", [1, 9, 4.0], ids=["below-upload", "above-cap", "float"])
def test_a_warm_started_reply_must_name_the_rank_it_trained(rank):
    strategy = strategy_for("florist", warm_start=True)
    play_round(strategy, 1)
    strategy.begin_round(2, [22])
    (instruction,) = strategy.configure_train(2, [22])
    answer = reply(strategy, instruction, 1, client_factors(CLIENT_RANKS[1], seed=7, method="florist"))
    answer.content[METRICS]["rank"] = rank
    strategy.receive_train(22, answer)
    (event,) = strategy._round.report.events
    assert event.status == "rejected" and f"metric rank {rank!r}" in event.reason


def test_automatic_tau_sends_the_largest_candidate_cut_not_the_exact_update():
    config = RunConfig.model_validate(
        {
            "federation": {"num_clients": 3, "ranks": CLIENT_RANKS},
            "aggregation": {"method": "florist", "tau_candidates": [0.8, 0.5]},
            "data": {"validation_fraction": 0.3},
        }
    )
    strategy = LoraStrategy(config, MODULES, identity_for(config))
    play_round(strategy, 1)
    exact = strategy.tau.exact.modules
    queries = strategy.configure_select(1, list(PARTITION_OF))
    ranks = strategy.tau.selection.ranks
    assert all(ranks[0.5][name] <= ranks[0.8][name] < exact[name].rank for name in MODULES)  # can fail: 0.8 cuts nothing
    for query in queries:
        candidate = payload.take_global(query.content, CANDIDATE)
        assert {name: module.rank for name, module in candidate.modules.items()} == ranks[0.8]
        for name, module in candidate.modules.items():
            assert torch.equal(module.B @ module.A, exact[name].B[:, : ranks[0.8][name]] @ exact[name].A[: ranks[0.8][name]])
        assert json.loads(str(query.content[CUTS]["ranks"])) == [ranks[0.5], ranks[0.8]]
        sizes = sum(t.numel() * t.element_size() for m in candidate.modules.values() for t in (m.A, m.B))
        assert sizes <= strategy.tau.selection.bytes_down[query.metadata.dst_node_id] < sizes + 4096


@pytest.mark.parametrize("method", ["florist", "fedit"])
def test_from_round_2_the_norm_screen_judges_how_much_a_tensor_trained_in_full_changed(method):
    """A head's own norm hides a change 50 times the others': its change from the round's start does not."""
    config = RunConfig.model_validate({"federation": {"num_clients": 3, "ranks": CLIENT_RANKS}, "aggregation": {"method": method}})
    strategy = LoraStrategy(config, MODULES, identity_for(config), {"lm_head.weight": (8, 5)})
    generator = torch.Generator().manual_seed(4)
    start = torch.randn(8, 5, generator=generator) * 10
    nodes = list(PARTITION_OF)
    for server_round in (1, 2):
        strategy.begin_round(server_round, nodes)
        messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, nodes)}
        for node, partition in PARTITION_OF.items():
            change = torch.randn(8, 5, generator=generator) * 1e-2 * (50 if (server_round, partition) == (2, 2) else 1)
            factors = client_factors(CLIENT_RANKS[partition], seed=10 * server_round + partition, method=method)
            strategy.receive_train(node, reply(strategy, messages[node], partition, factors, dense={"lm_head.weight": start + change}))
        report = strategy.finish_round()
        start = (strategy.chain.updates[-1] if strategy.merges else strategy.current).dense["lm_head.weight"]
        outcome = {event.node: event.status for event in report.events}
        if server_round == 1:
            assert list(outcome.values()) == ["accepted"] * 3
        else:
            assert outcome[33] == "rejected" and [outcome[11], outcome[22]] == ["accepted", "accepted"]
            [reason] = [event.reason for event in report.events if event.node == 33]
            assert reason.startswith("tensors trained in full norm")


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in():
    """Modules wider than the stacked rank 14, so the round is aggregated exactly, in partition order."""
    wide = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (16, 20)}
    results = []
    for order in (PARTITION_OF, dict(reversed(PARTITION_OF.items()))):
        strategy = strategy_for("florist")
        strategy = LoraStrategy(strategy.config, wide, strategy.identity)
        strategy.begin_round(1, list(order))
        instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, list(order))}
        for node, partition in order.items():
            generator = torch.Generator().manual_seed(partition)
            rank = CLIENT_RANKS[partition]
            factors = {
                name: LoraFactors(A=torch.randn(rank, n, generator=generator), B=torch.randn(m, rank, generator=generator), scale=2.0)
                for name, (m, n) in wide.items()
            }
            strategy.receive_train(node, reply(strategy, instructions[node], partition, factors))
        strategy.finish_round()
        results.append(strategy.chain.updates[0].modules)
    for name, module in results[0].items():
        assert torch.equal(module.A, results[1][name].A) and torch.equal(module.B, results[1][name].B), name


def shared_direction_factors(generator: torch.Generator, basis: tuple[torch.Tensor, torch.Tensor], scale: float) -> LoraFactors:
    """A rank-2 update inside a common rank-6 subspace, as trained adapters share directions."""
    left, right = basis
    return LoraFactors(A=torch.randn(2, 6, generator=generator) @ right, B=left @ torch.randn(6, 2, generator=generator) * scale, scale=2.0)


def test_a_round_of_many_clients_is_folded_as_replies_arrive_and_stays_exact():
    """40 rank-2 clients of one 64 x 48 module, a memory budget that holds 20 stacked columns:
    the server folds replies as they come, never holding more than its budget, and at tau = 1 the
    result is the exact weighted update (the clients span 6 directions, within the 10 carried)."""
    shape, clients = (64, 48), 40
    config = RunConfig.model_validate(
        {
            "federation": {"num_clients": clients, "ranks": [2] * clients},
            "aggregation": {"method": "florist", "tau": 1.0, "memory_budget_mb": 20 * sum(shape) * 4 / 2**20},
        }
    )
    strategy = LoraStrategy(config, {"layers.0.q_proj": shape}, identity_for(config))
    nodes = list(range(1, clients + 1))
    strategy.begin_round(1, nodes)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, nodes)}
    generator = torch.Generator().manual_seed(7)
    basis = (torch.randn(shape[0], 6, generator=generator), torch.randn(6, shape[1], generator=generator))
    expected, total = torch.zeros(shape, dtype=torch.float64), 0
    for partition, node in enumerate(nodes):
        # Norms spread over two decades, inside the norm screen's factor of the median.
        factors = shared_direction_factors(generator, basis, scale=10 ** (-1 + partition % 3 / 2))
        strategy.receive_train(node, reply(strategy, instructions[node], partition, {"layers.0.q_proj": factors}))
        examples = 10 + partition
        expected += examples * factors.scale * (factors.B @ factors.A).double()
        total += examples
        accumulator = strategy._active().accumulator
        held = sum(c.modules["layers.0.q_proj"].rank for c in accumulator.clients + accumulator.pending)
        assert held <= 20
    assert accumulator.folding
    report = strategy.finish_round()
    assert sorted(c.partition for c in report.clients) == list(range(clients))
    [update] = strategy.chain.updates
    module = update.modules["layers.0.q_proj"]
    torch.testing.assert_close((module.scale * module.B @ module.A).double(), expected / total, rtol=1e-4, atol=1e-5)
    assert module.rank == 6


# ---------------------------------------------------------------- what a download costs on the wire

WIDE = {"layers.0.q_proj": (64, 48), "layers.0.v_proj": (32, 48)}
DENSE = {"lm_head.weight": (8, 48), "layers.0.q_proj.base_layer.bias": (64,)}
VALUE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def message_bytes(message: Message) -> int:
    """Every record of a message as Flower counts it, the instruction's own record included."""
    return sum(record.count_bytes() for record in message.content.values())


def wide_config(wire: str, aggregation: dict, **federation) -> RunConfig:
    return RunConfig.model_validate(
        {
            "federation": {"num_clients": 3, "ranks": CLIENT_RANKS, "rounds": 1, **federation},
            "aggregation": {"method": "florist", **aggregation},
            "wire": {"download": wire},
        }
    )


def wide_strategy(wire: str, aggregation: dict, **federation) -> LoraStrategy:
    """FLoRIST on WIDE modules with DENSE tensors trained in full, for a run of one round."""
    config = wide_config(wire, aggregation, **federation)
    return LoraStrategy(config, WIDE, identity_for(config), DENSE)


def final_instruction(strategy: LoraStrategy) -> Message:
    """Round 1 with replies that carry tensors trained in full; then the instruction that delivers its update."""
    nodes = list(PARTITION_OF)
    strategy.begin_round(1, nodes)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, nodes)}
    for node, partition in PARTITION_OF.items():
        generator = torch.Generator().manual_seed(partition)
        rank = CLIENT_RANKS[partition]
        factors = {
            name: LoraFactors(A=torch.randn(rank, n, generator=generator), B=torch.randn(m, rank, generator=generator), scale=2.0)
            for name, (m, n) in WIDE.items()
        }
        dense = {name: torch.randn(shape, generator=generator) for name, shape in DENSE.items()}
        assert strategy.receive_train(node, reply(strategy, messages[node], partition, factors, dense=dense)) == []
    assert [event.status for event in strategy.finish_round().events] == ["accepted"] * 3
    (message,) = strategy.configure_evaluate(1, [11])
    assert sent_payloads(message) == [update_key(1)]
    return message


@pytest.mark.parametrize("wire", payload.WIRE_FORMATS)
def test_a_download_budget_bounds_every_byte_of_the_message_that_delivers_the_update(wire):
    """Four-fifths of the bytes of the exact update's message: the budgeted message, with its
    factors (int8: and their row scales), every array's header and key, the tensors trained in full
    and the records, is within the budget, and leaves less than one component of it unspent."""
    exact = message_bytes(final_instruction(wide_strategy(wire, {"tau": 1.0})))
    budget = int(0.8 * exact)
    strategy = wide_strategy(wire, {"download_budget_mb": budget / 2**20})
    message = final_instruction(strategy)
    sent = message_bytes(message)
    ranks = {name: module.rank for name, module in strategy.chain.updates[0].modules.items()}
    component = {name: (m + n) * VALUE_BYTES[wire] + (8 if wire == "int8" else 0) for name, (m, n) in WIDE.items()}
    assert sent <= budget, (sent, budget, ranks)
    assert budget - sent < max(component.values()), (sent, budget, ranks)
    assert 2 < sum(ranks.values()) < 2 * sum(CLIENT_RANKS)  # the budget bought components, and not all 14 of each
    # The strategy's own count (bytes_down) is the update's arrays; the message holds its records too.
    assert strategy.evaluation.report.bytes_down[11] == message.content[update_key(1)].count_bytes() < sent


@pytest.mark.parametrize("wire", ["float32", "int8"])
def test_a_download_budget_that_cannot_pay_for_rank_1_everywhere_is_refused_before_round_1(wire):
    """The smallest budget is the message of a rank-1 update (tau so small it keeps one component per
    module). The instruction carries the shared settings, the budget among them, so the message
    under a budget of b bytes is the tau's message with the budget's settings in place of the tau's."""
    by_tau = wide_strategy(wire, {"tau": 1e-9})
    rank_1_message = message_bytes(final_instruction(by_tau))

    def rank_1_under(budget: int) -> int:
        config = wide_config(wire, {"download_budget_mb": budget / 2**20})
        settings = [len(json.dumps(c.shared_settings(), sort_keys=True)) for c in (config, by_tau.config)]
        return rank_1_message + settings[0] - settings[1]

    least = rank_1_message
    while rank_1_under(least) != least:  # the budget's own digits travel in the message
        least = rank_1_under(least)
    strategy = wide_strategy(wire, {"download_budget_mb": least / 2**20})
    assert message_bytes(final_instruction(strategy)) == least
    short = least - 32  # more than the budget's digits can change its message by
    needs = rank_1_under(short)
    assert needs > short
    with pytest.raises(ValueError) as refused:
        wide_strategy(wire, {"download_budget_mb": short / 2**20})
    message = str(refused.value)
    assert message.startswith(f"aggregation.download_budget_mb {short / 2**20:g}: download budget of ") and "\n" not in message
    rank_1 = sum(VALUE_BYTES[wire] * (m + n) + (8 if wire == "int8" else 0) for m, n in WIDE.values())
    assert message.endswith(f"({needs:,} bytes) that rank 1 in each of 2 modules needs ({needs - rank_1:,} of them sent whatever the ranks)")


def test_a_merged_update_travels_balanced_but_for_the_components_a_warm_start_begins_from():
    """float16: FLoRIST splits its update as B = U S, A = V^T (A's rows of norm 1). Every component
    travels balanced (its norms in B and A within a factor of 2), except under a warm start the
    leading 8 (the largest client rank), which clients start their LoRA from as the method split them."""
    for warm, kept in ((False, 0), (True, max(CLIENT_RANKS))):
        strategy = wide_strategy("float16", {"tau": 1.0}, warm_start=warm)
        final_instruction(strategy)
        for name, module in strategy.chain.updates[0].modules.items():
            assert module.rank == sum(CLIENT_RANKS)
            b_norm, a_norm = module.B.double().norm(dim=0), module.A.double().norm(dim=1)
            assert torch.allclose(a_norm[:kept], torch.ones(kept, dtype=torch.float64), atol=1e-3), name
            ratio = b_norm[kept:] / a_norm[kept:]
            assert ((ratio > 0.49) & (ratio < 2.01)).all(), (name, ratio)
