"""The ClientApp on the tiny model: the base each client starts from, the chain it checks, the
replies it gives when it lacks updates or disagrees with the server, and its own data."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from transformers import AutoModelForCausalLM

from florist.aggregation import GlobalModule, LoraFactors, start_of
from florist.federation import client_app, payload
from florist.federation.client_app import evaluate_round, train_round
from florist.federation.delivery import GlobalUpdate, update_digest
from florist.federation.identity import identity_of
from florist.federation.messages import ADAPTER, CONFIG, GAP, GLOBAL, IDENTITY, METRICS, MISMATCH, TRAINED, Instruction, instruction_content, update_key
from florist.federation.node_policy import NodePolicy
from florist.lora.model import frozen_lora_A, lora_layers, read_factors

from federations import CLIENT_RANKS, federation_config

pytestmark = pytest.mark.usefixtures("server_task")


@dataclass
class Observed:
    """A client's LoRA and the weights under it when training began, and its LoRA when it ended."""

    start: dict[str, LoraFactors]
    base: dict[str, torch.Tensor]
    a_trainable: dict[str, bool]
    end: dict[str, LoraFactors]
    examples: int


@pytest.fixture
def observed(monkeypatch) -> list[Observed]:
    """Every train_lora call train_round makes, observed around the real training."""
    calls: list[Observed] = []
    train_lora = client_app.train_lora

    def spy(model, features, **options):
        layers = lora_layers(model)
        start = read_factors(model)
        base = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
        trainable = {name: layer.lora_A["default"].weight.requires_grad for name, layer in layers.items()}
        result = train_lora(model, features, **options)
        calls.append(Observed(start, base, trainable, read_factors(model), len(features)))
        return result

    monkeypatch.setattr(client_app, "train_lora", spy)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)  # train_round sets the node's thread count



@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def pristine(base_model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in base_model.named_modules() if name.endswith(("q_proj", "v_proj"))}


def random_update(pristine: dict[str, torch.Tensor], rank: int, scale: float, seed: int) -> dict[str, GlobalModule]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: GlobalModule(
            A=torch.randn(rank, w.shape[1], generator=generator),
            B=0.1 * torch.randn(w.shape[0], rank, generator=generator),
            scale=scale,
        )
        for name, w in pristine.items()
    }


def instruction(config, base_model, server_round: int, node: int, chain: list[dict], payloads: dict, factors: str = "AB", kind=MessageType.TRAIN) -> Message:
    """What the server sends: the chain's digests, and the payloads named (update:<i> or global)."""
    identity = identity_of(config, base_model)
    content = instruction_content(Instruction.of(server_round, [update_digest(GlobalUpdate(u)) for u in chain], identity))
    for key, modules in payloads.items():
        payload.put(content, key, modules, "float32", factors=factors)
    return Message(content, dst_node_id=node, message_type=kind)


def context(node: int, partition: int, **node_config) -> Context:
    return Context(run_id=7, node_id=node, node_config={"partition-id": partition, **node_config}, state=RecordDict(), run_config={})


def merged(pristine: dict[str, torch.Tensor], *updates: dict[str, GlobalModule]) -> dict[str, torch.Tensor]:
    return {name: w + sum(update[name].delta() for update in updates) for name, w in pristine.items()}


def assert_weights_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def status(reply: Message) -> str:
    return str(reply.content[IDENTITY]["status"])


def test_florist_client_merges_every_update_once_and_starts_a_fresh_lora(tiny_model_dir, tmp_path, base_model, pristine, observed):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    first, second = random_update(pristine, 3, 1.5, seed=1), random_update(pristine, 5, 0.7, seed=2)
    node = context(21, partition=1)

    train_round(config, instruction(config, base_model, 1, 21, [], {}), node)
    answer = train_round(config, instruction(config, base_model, 2, 21, [first], {update_key(1): first}), node)
    # update 1 is in the node's state: the server sends only update 2.
    last = train_round(config, instruction(config, base_model, 3, 21, [first, second], {update_key(2): second}), node)
    assert [status(r) for r in (answer, last)] == [TRAINED, TRAINED]
    assert [int(r.content[METRICS]["chain-length"]) for r in (answer, last)] == [1, 2]
    assert_weights_close(observed[0].base, pristine)
    assert_weights_close(observed[1].base, merged(pristine, first))
    assert_weights_close(observed[2].base, merged(pristine, first, second))
    for call in observed:
        for name, factors in call.start.items():
            assert factors.rank == CLIENT_RANKS[1] and factors.scale == pytest.approx(2.0)  # alpha = 2 r
            assert not factors.B.any() and factors.A.any(), name  # peft's init: a fresh LoRA every round
        assert any(not torch.equal(call.end[n].B, call.start[n].B) for n in call.end)

    # Another node whose chain is shorter than the process's cached base: rebuilt from pristine weights.
    train_round(config, instruction(config, base_model, 2, 22, [first], {update_key(1): first}), context(22, partition=0))
    assert_weights_close(observed[3].base, merged(pristine, first))

    sent = payload.take(answer.content, ADAPTER)
    assert answer.metadata.dst_node_id == 0 and answer.metadata.src_node_id == 21
    assert answer.content[METRICS]["partition-id"] == 1 and answer.content[METRICS]["rank"] == CLIENT_RANKS[1]
    for name, factors in observed[1].end.items():
        assert torch.equal(sent[name]["A"], factors.A) and torch.equal(sent[name]["B"], factors.B)
        assert sent[name]["scale"] == factors.scale


def test_a_warm_started_client_moves_the_leading_components_of_the_last_update_into_its_lora(tiny_model_dir, tmp_path, base_model, pristine, observed):
    """federation.warm_start: round 1 starts fresh; from round 2 the LoRA holds the last update's leading
    r components (all 6 at rank 8, whose other 2 start fresh) and the base lacks exactly them, so the
    model is base + chain. The process's cached base is not changed: the next client of the round starts
    from its own rank's components. Each uploads its change since its start: B - B0, and A - A0 in the
    start's rows (the fresh rows' A as trained)."""
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", "federation.warm_start=true")
    first = random_update(pristine, 6, 1.5, seed=3)
    train_round(config, instruction(config, base_model, 1, 21, [], {}), context(21, partition=1))
    partitions = {21: 1, 22: 0, 23: 2}
    answers = [
        train_round(config, instruction(config, base_model, 2, node, [first], {update_key(1): first}), context(node, partition))
        for node, partition in partitions.items()
    ]
    assert not any(f.B.any() for f in observed[0].start.values())
    for call, answer, partition in zip(observed[1:], answers, partitions.values(), strict=True):
        rank = CLIENT_RANKS[partition]
        sent = payload.take(answer.content, ADAPTER)
        for name, factors in call.start.items():
            kept = min(rank, first[name].rank)
            assert factors.rank == rank and start_of(first, rank)[name].rank == kept
            assert torch.equal(factors.A[:kept], first[name].A[:kept]) and not factors.B[:, kept:].any()
            start = first[name].scale * first[name].B[:, :kept] @ first[name].A[:kept]
            assert torch.allclose(factors.scale * factors.B @ factors.A, start, atol=1e-6), name
            assert torch.allclose(call.base[name], pristine[name] + first[name].delta() - start, atol=1e-6), name
            end = call.end[name]
            torch.testing.assert_close(sent[name]["B"], end.B - factors.B, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(sent[name]["A"], torch.cat([end.A[:kept] - factors.A[:kept], end.A[kept:]]), rtol=1e-6, atol=1e-9)
            assert sent[name]["scale"] == end.scale


def test_a_node_that_lost_its_state_asks_for_what_it_lacks_and_never_trains_on_a_partial_base(
    tiny_model_dir, tmp_path, base_model, pristine, observed
):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    first, second = random_update(pristine, 3, 1.5, seed=1), random_update(pristine, 5, 0.7, seed=2)
    node = context(21, partition=1)  # a restarted node: empty state
    gap = train_round(config, instruction(config, base_model, 3, 21, [first, second], {update_key(2): second}), node)
    assert status(gap) == GAP and int(gap.content[METRICS]["needs-update"]) == 1
    assert observed == [] and ADAPTER not in gap.content
    # An update with the right index but other contents is a gap too.
    wrong = random_update(pristine, 3, 1.5, seed=9)
    node2 = context(23, partition=1)
    reply = train_round(config, instruction(config, base_model, 2, 23, [first], {update_key(1): wrong}), node2)
    assert status(reply) == GAP and observed == []
    # The server's resend closes the gap; the node trains on base + 1 + 2.
    done = train_round(config, instruction(config, base_model, 3, 21, [first, second], {update_key(1): first, update_key(2): second}), node)
    assert status(done) == TRAINED
    assert_weights_close(observed[0].base, merged(pristine, first, second))


def test_the_chain_check_covers_the_tensors_trained_in_full(tiny_model_dir, tmp_path, base_model, pristine, observed):
    """An update whose factors match the server's but whose tensors trained in full differ is a gap."""
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    first = random_update(pristine, 3, 1.5, seed=1)
    head = {"lm_head.weight": torch.zeros_like(base_model.lm_head.weight)}
    expected = GlobalUpdate(first, head)
    message = instruction(config, base_model, 2, 21, [], {})
    message.content[CONFIG]["chain"] = update_digest(expected)
    payload.put(message.content, update_key(1), first, "float32", dense={"lm_head.weight": head["lm_head.weight"] + 1})
    reply = train_round(config, message, context(21, partition=1))
    assert status(reply) == GAP and observed == []
    assert update_digest(expected) != update_digest(GlobalUpdate(first)) != update_digest(GlobalUpdate(first, {"lm_head.weight": head["lm_head.weight"] + 1}))


def test_a_node_refuses_to_train_for_a_server_with_other_settings_or_another_base_model(tiny_model_dir, tmp_path, base_model, observed):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    other = federation_config(tiny_model_dir, tmp_path / "run", "florist", "training.learning_rate=0.5")
    reply = train_round(config, instruction(other, base_model, 1, 21, [], {}), context(21, partition=1))
    assert status(reply) == MISMATCH and observed == []
    changed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        changed.lm_head.weight.mul_(1.01)
    reply = train_round(config, instruction(config, changed, 1, 21, [], {}), context(21, partition=1))
    assert status(reply) == MISMATCH and observed == []


def test_a_client_round_does_not_depend_on_what_the_process_ran_before(tiny_model_dir, tmp_path, base_model, observed):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    train_round(config, instruction(config, base_model, 1, 21, [], {}), context(21, partition=1))
    torch.rand(1000)  # another client, or anything else, moves the global generator on
    train_round(config, instruction(config, base_model, 1, 21, [], {}), context(21, partition=1))
    first, second = observed
    for name in first.start:
        assert torch.equal(first.start[name].A, second.start[name].A), name
        assert torch.equal(first.end[name].B, second.end[name].B), name


def test_a_site_trains_on_its_own_file_at_its_own_rank_and_alpha(tiny_model_dir, tmp_path, base_model, observed):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    site = tmp_path / "site.jsonl"
    records = [{"instruction": f"say {i}", "response": str(i)} for i in range(5)]
    site.write_text("".join(json.dumps(r) + "\n" for r in records))
    node = context(21, partition=7, data=str(site), rank=3, alpha=12.0)
    reply = train_round(config, instruction(config, base_model, 1, 21, [], {}), node)
    (call,) = observed
    assert call.examples == 5 and int(reply.content[METRICS]["num-examples"]) == 5
    assert all(f.rank == 3 and f.scale == pytest.approx(4.0) for f in call.start.values())


@pytest.mark.parametrize(("engine", "workers", "clients_at_once"), [("ray", 2, 2), ("ray", 8, 3), ("inline", 2, 1)])
def test_a_node_shares_the_cores_it_may_use_with_the_clients_training_beside_it(
    tiny_model_dir, tmp_path, monkeypatch, engine, workers, clients_at_once
):
    """Threads default to this process's cores (its affinity, not the machine's): in `florist run`,
    over the clients that train at once (`workers` on Ray, at most one per client; one at a time
    inline); on a SuperNode, whose site is its own machine, all of them."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)))
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", f'federation.engine="{engine}"', f"federation.workers={workers}")
    assert config.federation.num_clients == 3
    assert NodePolicy.for_run({"partition-id": 0}, config).admit(config).threads == 12 // clients_at_once
    assert NodePolicy.for_run({"partition-id": 0, "threads": 5}, config).admit(config).threads == 5
    site = tmp_path / "site.json"
    site.write_text('[{"instruction": "a", "response": "b"}]')
    assert NodePolicy.from_node_config({"partition-id": 0, "data": str(site)}).admit(config).threads == 12


@pytest.mark.parametrize("partition", [0, 2], ids=["rank-below-global", "rank-above-global"])
def test_fedit_client_starts_from_the_global_adapter_at_its_rank(tiny_model_dir, tmp_path, base_model, pristine, observed, partition):
    config = federation_config(tiny_model_dir, tmp_path / "run", "fedit")
    global_rank, global_scale = 5, 0.5
    update = random_update(pristine, global_rank, global_scale, seed=3)
    train_round(config, instruction(config, base_model, 2, 31, [], {GLOBAL: update}), context(31, partition=partition))
    (call,) = observed
    rank, scale = CLIENT_RANKS[partition], 2.0
    kept = min(rank, global_rank)
    assert_weights_close(call.base, pristine)  # nothing merged: the adapter carries the update
    for name, factors in call.start.items():
        source = update[name]
        assert factors.rank == rank
        assert torch.equal(factors.A[:kept], source.A[:kept]) and not factors.A[kept:].any()
        assert torch.allclose(factors.B[:, :kept], source.B[:, :kept] * global_scale / scale) and not factors.B[:, kept:].any()
        expected = global_scale * source.B[:, :kept] @ source.A[:kept]
        assert torch.allclose(scale * factors.B @ factors.A, expected, atol=1e-6)
        assert call.a_trainable[name]
        assert not torch.equal(call.end[name].A, factors.A)


def test_ffa_client_keeps_the_shared_seeded_A_frozen_and_sends_B_only(tiny_model_dir, tmp_path, base_model, pristine, observed):
    config = federation_config(tiny_model_dir, tmp_path / "run", "ffa")
    update = {
        name: GlobalModule(A=frozen_lora_A(name, 8, w.shape[1], config.federation.ffa_seed), B=module.B, scale=3.0)
        for (name, w), module in zip(pristine.items(), random_update(pristine, 8, 3.0, seed=4).values())
    }
    answer = train_round(config, instruction(config, base_model, 2, 41, [], {GLOBAL: update}, factors="B"), context(41, partition=1))
    (call,) = observed
    rank, scale = CLIENT_RANKS[1], 2.0
    for name, factors in call.start.items():
        shared = frozen_lora_A(name, rank, pristine[name].shape[1], config.federation.ffa_seed)
        assert torch.equal(factors.A, shared) and torch.equal(call.end[name].A, shared)
        assert not call.a_trainable[name]
        assert torch.allclose(factors.B, update[name].B[:, :rank] * 3.0 / scale)
        assert not torch.equal(call.end[name].B, factors.B)
    assert all(key.endswith(".B") for key in answer.content[ADAPTER])
    sent = payload.take(answer.content, ADAPTER)
    assert all(torch.equal(sent[name]["B"], call.end[name].B) for name in sent)


def test_a_node_evaluates_the_global_model_on_its_own_held_out_examples(tiny_model_dir, tmp_path, base_model, pristine):
    from florist.evaluation import instruction_loss
    from florist.data import load_examples
    from florist.lora.model import merge_into_base
    from transformers import AutoTokenizer

    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    held_out = tmp_path / "test.json"
    held_out.write_text(json.dumps([{"instruction": f"count to {i}", "response": " ".join(map(str, range(i)))} for i in range(2, 6)]))
    first = random_update(pristine, 3, 1.5, seed=1)
    reply = evaluate_round(
        config,
        instruction(config, base_model, 1, 21, [first], {update_key(1): first}, kind=MessageType.EVALUATE),
        context(21, partition=1, **{"test-data": str(held_out)}),
    )
    metrics = reply.content[METRICS]
    assert int(metrics["num-examples"]) == 4 and int(metrics["chain-length"]) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merge_into_base(model, first)
    expected = instruction_loss(model, AutoTokenizer.from_pretrained(tiny_model_dir), load_examples(held_out), template="chatml", max_length=config.data.max_length)
    assert float(metrics["test_loss"]) == pytest.approx(expected.mean_nll, abs=1e-5)


def test_a_node_scores_each_cut_of_the_exact_update_on_its_validation_examples(tiny_model_dir, tmp_path, base_model, pristine):
    from flwr.app import ConfigRecord
    from transformers import AutoTokenizer

    from florist.evaluation import instruction_loss
    from florist.federation.client_app import score_round
    from florist.federation.messages import CANDIDATE, CUTS, SCORED
    from florist.federation.node import node_data
    from florist.lora.model import merge_into_base

    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", "data.validation_fraction=0.3", "aggregation.tau_candidates=[0.5, 1.0]")
    exact = random_update(pristine, 5, 1.0, seed=7)
    cuts = [{name: 2 for name in exact}, {name: 5 for name in exact}]
    message = instruction(config, base_model, 1, 21, [], {CANDIDATE: exact}, kind=MessageType.QUERY)
    message.content[CUTS] = ConfigRecord({"ranks": json.dumps(cuts)})
    reply = score_round(config, message, context(21, partition=1))
    assert status(reply) == SCORED
    validation = node_data(config, NodePolicy.for_run({"partition-id": 1}, config).admit(config)).validation
    assert validation
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for index, ranks in enumerate(cuts):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        merge_into_base(model, {n: GlobalModule(A=m.A[: ranks[n]], B=m.B[:, : ranks[n]], scale=m.scale) for n, m in exact.items()})
        expected = instruction_loss(model, tokenizer, validation, template="chatml", max_length=config.data.max_length)
        assert float(reply.content[METRICS][f"loss-{index}"]) == pytest.approx(expected.mean_nll, abs=1e-5)
    assert int(reply.content[METRICS]["tokens"]) == expected.tokens


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "int8"])
def test_a_node_takes_the_kept_cut_from_the_candidate_it_scored(wire):
    """The server keeps one cut of the candidate and sends it no more to the nodes that scored it."""
    from flwr.app import ConfigRecord

    from florist.aggregation import cut
    from florist.federation.client_app import held_chain, keep_candidate
    from florist.federation.messages import CANDIDATE, CUTS

    generator = torch.Generator().manual_seed(5)
    # Components of falling magnitude, as FLoRIST orders them; the server holds them as the wire delivers them.
    exact = payload.round_trip(
        {
            name: GlobalModule(A=torch.randn(6, 7, generator=generator), B=torch.randn(9, 6, generator=generator) * torch.logspace(0, -4, 6), scale=0.5)
            for name in ("q", "v")
        },
        wire,
    )
    dense = {"lm_head.bias": torch.randn(9, generator=generator)}
    cuts = [{"q": 2, "v": 1}, {"q": 4, "v": 5}]
    content = RecordDict()
    payload.put(content, CANDIDATE, cut(exact, cuts[-1]), wire, dense=dense)
    content[CUTS] = ConfigRecord({"ranks": json.dumps(cuts)})
    state = RecordDict()
    keep_candidate(state, content)

    kept = GlobalUpdate(cut(exact, cuts[0]), payload.round_trip_dense(dense, wire))
    assert held_chain(state, ["not-a-cut"]) == 1  # a digest no cut has: the node asks for the update
    [(digest, update)] = held_chain(state, [update_digest(kept)])
    assert digest == update_digest(kept) == update_digest(update)
    for name, module in kept.modules.items():
        assert torch.equal(update.modules[name].A, module.A) and torch.equal(update.modules[name].B, module.B)
    assert CANDIDATE not in state  # used once, then dropped
    assert held_chain(state, [digest])[0][0] == digest  # now held as update 1, like a downloaded one
