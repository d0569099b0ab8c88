"""The server loop (`serve`) against the real ClientApp, node by node, in this process (see
local_grid.py): dropouts, stragglers, retries, stale replies, restarted nodes, refused nodes,
hostile updates, sampling, federated evaluation and resume."""

from __future__ import annotations

import json
import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Array, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from safetensors.torch import load_file

from florist.aggregation import make_aggregator
from florist.federation import client_app, payload
from florist.federation.client_app import build_client_app
from florist.federation.messages import ADAPTER, METRICS
from florist.federation.exchange import exchange
from florist.federation.sampling import NotEnoughNodes, sample
from florist.federation.server_app import serve
from florist.federation.strategy import RoundFailed
from florist.lora.adapters import read_adapter
from florist.reporting.run_directory import read_rounds

from federations import federation_config
from local_grid import LocalGrid, ServerCrash, crash_before_round

pytestmark = pytest.mark.usefixtures("server_task")

NODES = {101: 0, 202: 1, 303: 2}
FAST = ["federation.round_timeout=1", "federation.connect_timeout=1", "evaluation.base=false"]



def grid_for(config, nodes=NODES, **node_config) -> LocalGrid:
    return LocalGrid(build_client_app(config), {node: {"partition-id": p, **node_config} for node, p in nodes.items()})


def events(record: dict) -> dict[int, tuple[str, str]]:
    return {e["node"]: (e["status"], e["reason"]) for e in record["events"]}


def never_replies(instruction: Message, reply: Message) -> None:
    return None


def test_a_node_that_drops_out_is_recorded_and_the_round_completes_with_the_others(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.min_clients=2", "output.save_client_adapters=true")
    grid = grid_for(config)
    grid.nodes[303].tamper = never_replies
    path = serve(config, grid)
    rounds = read_rounds(path)
    for record in rounds[1:]:
        assert [c["partition"] for c in record["clients"]] == [0, 1]
        assert events(record)[303][0] == "late" and "round_timeout" in events(record)[303][1]
        assert record["sampled"] == sorted(NODES) and record["quorum"] == 2
    # The weights are renormalised over the two that replied: the aggregate of just those two.
    _, final = read_adapter(path / "final" / "adapter")
    folder = path / "clients" / "round2"
    index = json.loads((folder / "clients.json").read_text())
    from florist.lora.adapters import read_adapters

    clients = read_adapters([folder / c["adapter"] for c in index], [c["weight"] for c in index])
    expected = make_aggregator("florist", tau=0.9).aggregate(clients)
    for name, module in expected.modules.items():
        torch.testing.assert_close(final.modules[name].scale * final.modules[name].B @ final.modules[name].A, module.delta(), atol=1e-6, rtol=1e-5)


class UnreadableReplies(LocalGrid):
    """Flower fails to rebuild every reply of one node as it pulls it (a malformed message)."""

    def __init__(self, *args, node: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.unreadable_node = node

    def pull_messages(self, message_ids):
        message_ids = list(message_ids)
        if any(self.replies[i].metadata.src_node_id == self.unreadable_node for i in message_ids if i in self.replies):
            raise ValueError("Cannot reconstruct message: object 'abc' is missing")
        return super().pull_messages(message_ids)


def test_a_reply_flower_cannot_pull_is_that_nodes_failure_and_the_rounds_complete_with_the_others(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.min_clients=2")
    grid = UnreadableReplies(build_client_app(config), {node: {"partition-id": p} for node, p in NODES.items()}, node=303)
    path = serve(config, grid)
    for record in read_rounds(path)[1:]:
        assert [c["partition"] for c in record["clients"]] == [0, 1]
        status, reason = events(record)[303]
        assert status == "failed" and reason == "its reply could not be read (ValueError: Cannot reconstruct message: object 'abc' is missing)"


def test_a_missed_quorum_is_retried_then_the_run_stops_with_a_message_naming_the_nodes(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.min_clients=3", "federation.round_retries=1")
    grid = grid_for(config)
    attempts = []

    def fails_once(instruction: Message, reply: Message):
        attempts.append(instruction)
        if len(attempts) == 1:
            return Message(__import__("flwr.app", fromlist=["Error"]).Error(code=1, reason="CUDA out of memory"), reply_to=instruction)
        return reply

    grid.nodes[202].tamper = fails_once
    path = serve(config, grid)
    first = read_rounds(path)[1]
    assert first["attempts"] == 2 and len(first["clients"]) == 3
    assert ("failed", "CUDA out of memory") in [(e["status"], e["reason"]) for e in first["events"] if e["node"] == 202]

    config = federation_config(tiny_model_dir, tmp_path / "run2", "florist", *FAST, "federation.min_clients=3", "federation.round_retries=1")
    grid = grid_for(config)
    grid.nodes[303].tamper = never_replies
    with pytest.raises(RoundFailed, match=r"round 1: 2 of 3 sampled clients delivered an update, below the quorum of 3, after 2 attempts \(node 303 late"):
        serve(config, grid)
    assert len(grid.nodes[303].received) == 2  # asked again once


def test_a_reply_for_another_round_is_not_mixed_into_this_one(tiny_model_dir, tmp_path):
    # One site's round is allowed here (min_sites 1): what matters is which replies enter it.
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.min_clients=1", "federation.min_sites=1")
    grid = grid_for(config)
    kept: dict[int, list[Message]] = {101: [], 202: []}

    def replays_its_round_one_reply(instruction: Message, reply: Message):
        kept[101].append(reply)
        return kept[101][0]  # a straggler's round-1 reply, arriving during round 2

    def resends_round_one_content(instruction: Message, reply: Message):
        kept[202].append(reply)
        return Message(kept[202][0].content, reply_to=instruction)  # round-1 content, as a round-2 reply

    grid.nodes[101].tamper = replays_its_round_one_reply
    grid.nodes[202].tamper = resends_round_one_content
    second = read_rounds(serve(config, grid))[2]
    assert events(second)[101][0] == "late"  # its round-1 reply answers no round-2 message: never pulled
    assert events(second)[202] == ("rejected", "reply is for round 1, not 2")
    assert [c["partition"] for c in second["clients"]] == [2]


class FakeInstruction:
    def __init__(self, node):
        self.metadata = SimpleNamespace(dst_node_id=node)


class FakeGrid:
    """Message ids m<node>; `replies[id]` answers a pull of that id (a callable may block), and
    only the nodes in `connected` are listed."""

    def __init__(self, connected):
        self.connected = set(connected)
        self.replies: dict = {}
        self.pulled: list[list[str]] = []

    def get_node_ids(self):
        return sorted(self.connected)

    def push_messages(self, messages):
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        ids = list(ids)
        self.pulled.append(ids)
        replies = [self.replies.pop(i) for i in ids if i in self.replies]
        replies = [reply() if callable(reply) else reply for reply in replies]
        return [reply for reply in replies if reply is not None]


def fake_reply(message_id: str):
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))


def test_exchange_pulls_only_this_stages_replies_and_stops_at_the_deadline():
    grid = FakeGrid(connected=[1, 2])
    late = exchange(grid, [FakeInstruction(1), FakeInstruction(2)], timeout=0.3, handle=lambda node, reply: [])
    assert late == [1, 2] and grid.pulled and all(set(ids) <= {"m1", "m2"} for ids in grid.pulled)


def test_a_reply_stuck_mid_upload_holds_up_neither_the_deadline_nor_the_other_replies():
    """Node 1's pull blocks (Flower's pull_messages waits out a half-uploaded reply's object-push
    session); node 2 replies later. The stage still ends at its deadline, with node 2's reply."""
    grid = FakeGrid(connected=[1, 2])
    released = threading.Event()

    def stuck():
        released.wait(30)

    grid.replies["m1"] = stuck
    handled = []

    def reply_later(node, reply):
        handled.append(node)
        return []

    grid.replies["m2"] = lambda: fake_reply("m2")
    start = time.monotonic()
    try:
        late = exchange(grid, [FakeInstruction(1), FakeInstruction(2)], timeout=2.0, handle=reply_later)
        elapsed = time.monotonic() - start
    finally:
        released.set()
    assert late == [1] and handled == [2]
    assert 2.0 <= elapsed < 12.0, elapsed
    assert grid.pulled.count(["m1"]) == 1  # never asked again while its pull was still running


def test_a_node_that_is_not_connected_is_not_asked_until_it_is_and_then_its_reply_is_taken():
    """Flower answers a pull for a node that missed its heartbeats with "Node Unavailable" and
    drops the instruction; a node listed again is asked, and its reply taken."""
    grid = FakeGrid(connected=[2])
    grid.replies["m1"] = fake_reply("m1")
    handled = []

    def handle(node, reply):
        handled.append(node)
        grid.connected.add(1)  # node 1 reports again
        return []

    grid.replies["m2"] = fake_reply("m2")
    late = exchange(grid, [FakeInstruction(1), FakeInstruction(2)], timeout=30.0, handle=handle)
    assert late == [] and handled == [2, 1]
    assert grid.pulled.index(["m1"]) > grid.pulled.index(["m2"])


def test_a_node_the_superlink_reports_unavailable_is_asked_again_and_the_run_ends_as_without_the_fault(tiny_model_dir, tmp_path):
    """A live node that missed its heartbeats on a busy machine: the SuperLink answers its first
    train, score and evaluate instructions with its "Node Unavailable" error (and drops them). The
    node is asked again within each stage, and the run ends as the same run without the fault;
    with a quorum of all three and no retries, failing the node would have failed the round."""
    extra = [*FAST, "federation.rounds=1", "federation.round_timeout=60", "federation.min_clients=3", "federation.round_retries=0",
             "evaluation.federated=true", "data.validation_fraction=0.3", "aggregation.tau_candidates=[0.5, 1.0]"]
    clean = read_rounds(serve(federation_config(tiny_model_dir, tmp_path / "clean", "florist", *extra),
                              grid_for(federation_config(tiny_model_dir, tmp_path / "clean", "florist", *extra))))
    config = federation_config(tiny_model_dir, tmp_path / "faulty", "florist", *extra)
    grid = grid_for(config)
    dropped = []

    def unavailable_once_per_stage(instruction: Message, reply: Message):
        kind = instruction.metadata.message_type
        if kind in dropped:
            return reply
        dropped.append(kind)
        return create_message_error_unavailable_res_message(instruction.metadata, "node_unavail")

    grid.nodes[202].tamper = unavailable_once_per_stage
    path = serve(config, grid)
    assert sorted(dropped) == ["evaluate", "query", "train"]
    faulty = read_rounds(path)
    for events in (faulty[1]["events"], faulty[1]["tau_selection"]["events"], faulty[1]["federated_evaluation"]["events"]):
        [(status, reason)] = [(e["status"], e["reason"]) for e in events if e["node"] == 202 and e["status"] != "accepted"]
        assert status == "resent" and reason.startswith("asked again: Error: Node Unavailable")
    assert faulty[1]["attempts"] == 1
    for ours, theirs in zip(faulty, clean, strict=True):
        assert ours["evaluation"] == theirs["evaluation"] and ours.get("ranks") == theirs.get("ranks")
        assert ours.get("federated_evaluation", {}).get("nodes") == theirs.get("federated_evaluation", {}).get("nodes")
    assert [c["partition"] for c in faulty[1]["clients"]] == [0, 1, 2]
    assert faulty[1]["tau_selection"]["chosen"] == clean[1]["tau_selection"]["chosen"]
    _, final = read_adapter(path / "final" / "adapter")
    _, reference = read_adapter(tmp_path / "clean" / "final" / "adapter")
    for name, module in reference.modules.items():
        assert torch.equal(final.modules[name].B, module.B) and torch.equal(final.modules[name].A, module.A), name


def test_a_restarted_node_gets_the_whole_chain_and_trains_on_the_right_base(tiny_model_dir, tmp_path, monkeypatch):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.rounds=3", "federation.round_timeout=60")
    grid = grid_for(config)
    bases: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    train_lora = client_app.train_lora

    def spy(model, features, **options):
        layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "get_base_layer")}
        key = (spy.round, spy.partition)
        bases[key] = {n.removeprefix("base_model.model."): m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
        return train_lora(model, features, **options)

    def remember(grid, messages):
        from florist.federation.messages import Instruction

        if messages and messages[0].metadata.message_type == "train":
            spy.round = Instruction.read(messages[0]).round
        if spy.round == 3:  # node 303 restarts before round 3: its state is gone
            grid.nodes[303].state = RecordDict()

    original = client_app.train_round

    def tracking(config, msg, context):
        spy.partition = int(context.node_config["partition-id"])
        return original(config, msg, context)

    spy.round, spy.partition = 0, 0
    grid.before_push = remember
    monkeypatch.setattr(client_app, "train_lora", spy)
    monkeypatch.setattr(client_app, "train_round", tracking)
    grid.client_app = build_client_app(config)
    path = serve(config, grid)
    third = read_rounds(path)[3]
    assert events(third)[303][0] == "accepted"
    assert ("resent", "node lacked updates 1..2") in [(e["status"], e["reason"]) for e in third["events"] if e["node"] == 303]
    # Every client of round 3 trained on the same base: pristine weights plus updates 1 and 2.
    for name, weight in bases[(3, 2)].items():
        assert torch.equal(weight, bases[(3, 0)][name]), name
    checkpoint = path / "checkpoint"
    updates = [load_file(checkpoint / f"update-000{i}.safetensors") for i in (1, 2)]
    assert updates and all(updates)


def test_a_node_with_other_settings_or_another_base_model_is_refused_naming_the_difference(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.min_clients=1", "federation.min_sites=1")
    other = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "training.local_steps=3")
    grid = grid_for(config)
    grid.nodes[202].tamper = lambda instruction, reply: build_client_app(other)(
        instruction, __import__("flwr.app", fromlist=["Context"]).Context(7, 202, {"partition-id": 1}, RecordDict(), {})
    )
    # A node whose base model differs: same name, other weights (as two machines may hold).
    changed = tmp_path / "changed-model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(changed)
    third = config.model_copy(update={"model": config.model.model_copy(update={"name": str(changed)})})

    def other_model(instruction, reply):
        from flwr.app import Context

        node_reply = build_client_app(third)(instruction, Context(7, 303, {"partition-id": 2}, RecordDict(), {}))
        return node_reply

    grid.nodes[303].tamper = other_model
    record = read_rounds(serve(config, grid))[1]
    status, reason = events(record)[202]
    assert status == "refused" and "training.local_steps (server 2, node 3)" in reason
    status, reason = events(record)[303]
    assert status == "refused" and reason.startswith("base model differs")
    assert [c["partition"] for c in record["clients"]] == [0]


def _tampered(change):
    """A node that trains for real, then changes its reply before sending it."""

    def tamper(instruction: Message, reply: Message) -> Message:
        content = RecordDict({key: value for key, value in reply.content.items()})
        change(content)
        return Message(content, reply_to=instruction)

    return tamper


def _factors(change_factor):
    def change(content: RecordDict) -> None:
        modules = payload.take(content, ADAPTER)
        name = sorted(modules)[0]
        modules[name] = change_factor(dict(modules[name]))
        from florist.aggregation import LoraFactors

        del content[ADAPTER], content[f"{ADAPTER}:scales"]
        payload.put(content, ADAPTER, {n: LoraFactors(A=m["A"], B=m["B"], scale=m["scale"]) for n, m in modules.items()}, "float32")

    return change


def _every_module(change_factor):
    def change(content: RecordDict) -> None:
        modules = {name: change_factor(dict(module)) for name, module in payload.take(content, ADAPTER).items()}
        from florist.aggregation import LoraFactors

        del content[ADAPTER], content[f"{ADAPTER}:scales"]
        payload.put(content, ADAPTER, {n: LoraFactors(A=m["A"], B=m["B"], scale=m["scale"]) for n, m in modules.items()}, "float32")

    return change


def _metric(key, value):
    def change(content: RecordDict) -> None:
        metrics = dict(content[METRICS])
        if value is None:
            del metrics[key]
        else:
            metrics[key] = value
        content[METRICS] = MetricRecord(metrics)

    return change


def _drop_module(content: RecordDict) -> None:
    modules = payload.take(content, ADAPTER)
    del modules[sorted(modules)[0]]
    from florist.aggregation import LoraFactors

    del content[ADAPTER], content[f"{ADAPTER}:scales"]
    payload.put(content, ADAPTER, {n: LoraFactors(A=m["A"], B=m["B"], scale=m["scale"]) for n, m in modules.items()}, "float32")


def _nan(content: RecordDict) -> None:
    """A NaN in a factor, as a raw array: payload.put refuses it, and a hostile node need not use it."""
    record = content[ADAPTER]
    key = sorted(key for key in record if key.endswith(".B"))[0]
    values = record[key].numpy().copy()
    values[0, 0] = math.nan
    record[key] = Array(values)


def _wide(module):  # rank 9 > the cap of 8
    module["A"] = torch.randn(9, module["A"].shape[1]) * 0.01
    module["B"] = torch.randn(module["B"].shape[0], 9) * 0.01
    return module


def _shape(module):
    module["A"] = torch.randn(module["A"].shape[0], module["A"].shape[1] + 1)
    return module


def _huge(module):
    module["B"] = torch.randn_like(module["B"]) * 1e3
    module["A"] = torch.randn_like(module["A"])
    return module


def _inflated(module):  # within what the base weight bounds, far above the round's median
    module["B"] = module["B"] * 20
    return module


def _zero(module):
    module["B"] = torch.zeros_like(module["B"])
    return module


HOSTILE = {
    "nan": (_nan, "holds NaN or Inf values"),
    "inflated-rank": (_factors(_wide), "rank 9 is outside [1, 8]"),
    "wrong-shape": (_factors(_shape), "lora_A is"),
    "forged-examples": (_metric("num-examples", 10**9), "num-examples 1000000000 is outside [1, 1000000]"),
    "duplicate-partition": (_metric("partition-id", 0), "partition-id 0 was already sent this round"),
    "missing-module": (_drop_module, "lacks module"),
    "malformed": (_metric("train-loss", None), "metric train-loss is missing"),
    "no-metrics": (lambda content: content.__delitem__(METRICS), "malformed reply"),
    "absurd-update": (_factors(_huge), "more than 1000x the norm"),
    "outlier-norm": (_every_module(_inflated), "more than 10x the round's median"),
    "zero-update": (_every_module(_zero), "less than 1/10 of the round's median"),
}


def test_every_hostile_or_broken_update_is_rejected_with_its_reason_and_the_rest_aggregated(tiny_model_dir, tmp_path):
    """One federation: three honest sites, then one site per kind of bad update."""
    nodes = {100 + k: k for k in range(3 + len(HOSTILE))}
    ranks = [2, 4, 8] + [4] * len(HOSTILE)
    config = federation_config(
        tiny_model_dir, tmp_path / "run", "florist", *FAST, f"federation.num_clients={len(nodes)}",
        f"federation.ranks={ranks}", "federation.rounds=1", "federation.min_clients=3", "output.save_client_adapters=true",
        "data.partition=\"iid\"",
    )
    grid = grid_for(config, nodes)
    for (name, (change, _)), node in zip(HOSTILE.items(), list(nodes)[3:]):
        grid.nodes[node].tamper = _tampered(change)
    # The duplicate's honest twin must arrive first: node 100 is partition 0 and is served first.
    path = serve(config, grid)
    record = read_rounds(path)[1]
    seen = events(record)
    for (name, (_, reason)), node in zip(HOSTILE.items(), list(nodes)[3:]):
        status, why = seen[node]
        assert status == "rejected" and reason in why, (name, why)
    assert [c["partition"] for c in record["clients"]] == [0, 1, 2]
    index = json.loads((path / "clients" / "round1" / "clients.json").read_text())
    assert [c["partition"] for c in index] == [0, 1, 2]


def test_a_size_cap_below_what_the_ranks_need_is_refused_before_any_training(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "validation.max_message_mb=0.001")
    grid = grid_for(config)
    with pytest.raises(ValueError, match=r"validation.max_message_mb 0.001 is below the 0.0\d+ MiB an adapter of rank 8 needs"):
        serve(config, grid)
    assert all(not node.received for node in grid.nodes.values())


def test_sampling_is_seeded_per_round_and_a_round_needs_only_its_sample(tiny_model_dir, tmp_path):
    nodes = {100 + k: k for k in range(6)}
    assert sample(list(nodes), 2, seed=0, server_round=1) == sample(list(reversed(nodes)), 2, seed=0, server_round=1)
    draws = {tuple(sample(list(nodes), 2, seed=0, server_round=r)) for r in range(1, 9)}
    assert len(draws) > 1
    config = federation_config(
        tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.num_clients=6", "federation.ranks=[4]",
        "federation.clients_per_round=2", "federation.rounds=2",
    )
    path = serve(config, grid_for(config, nodes))
    for record in read_rounds(path)[1:]:
        assert record["sampled"] == sample(list(nodes), 2, seed=0, server_round=record["round"])
        assert sorted(c["node"] for c in record["clients"]) == record["sampled"] and record["quorum"] == 2


def test_no_round_is_aggregated_from_fewer_than_min_sites_when_sites_drop_out(tiny_model_dir, tmp_path):
    """Round 2: site 3 has left, so 2 are sampled, whose quorum (half of them) would be 1; it stays
    at federation.min_sites = 2. Site 2 then sends nothing: the round fails, naming it, instead of
    sending site 1's own update back to every site as the aggregate."""
    config = federation_config(
        tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.round_retries=0", "evaluation.federated=true", "evaluation.every_round=true"
    )
    grid = grid_for(config)

    def leaves_after_round_one(grid: LocalGrid, messages: list[Message]) -> None:
        from florist.federation.messages import Instruction

        if messages and messages[0].metadata.message_type == "evaluate" and Instruction.read(messages[0]).round == 1:
            grid.nodes[303].connected = False
            grid.nodes[202].tamper = never_replies

    grid.before_push = leaves_after_round_one
    with pytest.raises(RoundFailed, match=r"round 2: 1 of 2 sampled clients delivered an update, below the quorum of 2, after 1 attempts \(node 202 late"):
        serve(config, grid)
    [first] = read_rounds(tmp_path / "run")[1:]
    assert first["quorum"] == 2 and [c["partition"] for c in first["clients"]] == [0, 1, 2]


def test_too_few_nodes_end_the_wait_with_a_message(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.min_clients=3")
    grid = grid_for(config)
    grid.nodes[303].connected = False
    with pytest.raises(NotEnoughNodes, match=r"only 2 nodes connected within federation.connect_timeout = 1 s, fewer than the 3 a round needs"):
        serve(config, grid)


def test_federated_evaluation_scores_each_node_and_combines_them_by_examples(tiny_model_dir, tmp_path):
    config = federation_config(
        tiny_model_dir, tmp_path / "run", "florist", "federation.round_timeout=30", "evaluation.federated=true",
        "evaluation.server=false", "evaluation.every_round=true",
    )
    path = serve(config, grid_for(config))
    rounds = read_rounds(path)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds:
        assert record["evaluation"] == {}
        federated = record["federated_evaluation"]
        nodes = federated["nodes"]
        assert [n["partition"] for n in nodes] == [0, 1, 2] and all(n["examples"] > 0 for n in nodes)
        tokens = sum(n["metrics"]["test_tokens"] for n in nodes)
        loss = sum(n["metrics"]["test_loss"] * n["metrics"]["test_tokens"] for n in nodes) / tokens
        assert federated["combined"]["test_loss"] == pytest.approx(loss)
        assert federated["combined"]["examples"] == sum(n["examples"] for n in nodes)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["final"] == rounds[-1]["federated_evaluation"]["combined"]


def test_a_crashed_server_resumes_from_its_last_round_and_ends_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    extra = [*FAST, "federation.rounds=3", "federation.round_timeout=30", "evaluation.every_round=true"]
    whole = serve(federation_config(tiny_model_dir, tmp_path / "whole", "florist", *extra), grid_for(federation_config(tiny_model_dir, tmp_path / "whole", "florist", *extra)))

    config = federation_config(tiny_model_dir, tmp_path / "crashed", "florist", *extra)
    grid = grid_for(config)

    grid.before_push = crash_before_round(2)
    with pytest.raises(ServerCrash):
        serve(config, grid)
    assert [r["round"] for r in read_rounds(tmp_path / "crashed")] == [0, 1]
    # A fresh server process and fresh node processes (a new Flower run: empty node state).
    resumed = serve(config, grid_for(config), resume=tmp_path / "crashed")
    assert resumed == tmp_path / "crashed"
    ours, theirs = read_rounds(resumed), read_rounds(whole)
    assert [r["round"] for r in ours] == [0, 1, 2, 3] and ours[2].get("resumed") is True
    for a, b in zip(ours, theirs):
        assert a["evaluation"] == b["evaluation"]
        assert a.get("ranks") == b.get("ranks")
        assert [c["train_loss"] for c in a.get("clients", [])] == [c["train_loss"] for c in b.get("clients", [])]
    _, final = read_adapter(resumed / "final" / "adapter")
    _, reference = read_adapter(whole / "final" / "adapter")
    for name in reference.modules:
        assert torch.equal(final.modules[name].B, reference.modules[name].B) and torch.equal(final.modules[name].A, reference.modules[name].A)


def test_resume_refuses_a_changed_method_and_a_directory_that_is_not_a_run(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.rounds=1")
    path = serve(config, grid_for(config))
    changed = federation_config(tiny_model_dir, tmp_path / "run", "fedit", *FAST)
    with pytest.raises(ValueError, match=r"setting aggregation.method \(was 'florist', now 'fedit'\) cannot change in the middle of a run"):
        serve(changed, grid_for(changed), resume=path)
    with pytest.raises(ValueError, match="it is not a run directory"):
        serve(config, grid_for(config), resume=tmp_path)
    # Rounds may be extended: the run continues from round 1.
    more = federation_config(tiny_model_dir, tmp_path / "run", "florist", *FAST, "federation.rounds=2")
    serve(more, grid_for(more), resume=path)
    assert [r["round"] for r in read_rounds(path)] == [0, 1, 2]


def test_automatic_tau_keeps_the_smallest_cut_the_clients_validation_cannot_tell_from_the_best(tiny_model_dir, tmp_path):
    extra = [*FAST, "federation.round_timeout=60", "data.validation_fraction=0.3", "aggregation.tau_candidates=[0.5, 0.9, 1.0]"]
    config = federation_config(tiny_model_dir, tmp_path / "strict", "florist", *extra)
    rounds = read_rounds(serve(config, grid_for(config)))
    for record in rounds[1:]:
        selection = record["tau_selection"]
        assert selection["candidates"] == [0.5, 0.9, 1.0] and len(selection["nodes"]) == 3
        nodes = selection["nodes"]
        tokens = sum(n["tokens"] for n in nodes)
        expected = [sum(n["loss"][i] * n["tokens"] for n in nodes) / tokens for i in range(3)]
        assert selection["validation_loss"] == pytest.approx(expected)
        best = min(expected)
        assert selection["chosen"] == next(t for t, loss in zip([0.5, 0.9, 1.0], expected) if loss <= best)
        assert sum(record["ranks"].values()) == selection["total_rank"][str(selection["chosen"])]
        assert record["communication"]["down_bytes"] > sum(c["bytes_down"] for c in record["clients"])  # the exact update, scored
    for record in rounds[2:]:
        # Every node scored the last round's candidate and takes the kept cut from it: nothing is sent again.
        assert [c["bytes_down"] for c in record["clients"]] == [0, 0, 0]
        assert not [e for e in record["events"] if e["status"] in ("resent", "failed")]
    # A tolerance of a whole nat: the smallest cut always wins, with the fewest components.
    loose = federation_config(tiny_model_dir, tmp_path / "loose", "florist", *extra, "aggregation.tau_tolerance=1.0")
    for record in read_rounds(serve(loose, grid_for(loose)))[1:]:
        selection = record["tau_selection"]
        assert selection["chosen"] == 0.5
        assert sum(record["ranks"].values()) == selection["total_rank"]["0.5"] < selection["total_rank"]["1.0"]


def test_automatic_tau_needs_florist_and_validation_examples(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="aggregation.tau_candidates choose FLoRIST's tau; method 'fedit' has none"):
        federation_config(tiny_model_dir, tmp_path, "fedit", "aggregation.tau_candidates=[0.9]", "data.validation_fraction=0.2")
    with pytest.raises(ValueError, match=r"aggregation.tau_candidates needs the clients' validation examples: set data.validation_fraction > 0"):
        federation_config(tiny_model_dir, tmp_path, "florist", "aggregation.tau_candidates=[0.9]")
