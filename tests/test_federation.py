"""The Flower federation: whole simulated runs checked from their run directories, and the round
semantics of the strategy and the ClientApp checked message by message, without a simulation."""

from __future__ import annotations

import io
import json
import math
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from florist.aggregation import ClientAdapter, GlobalModule, LoraFactors, make_aggregator
from florist.config import RunConfig, load_config
from florist.evaluation import instruction_loss
from florist.federation import client_app, payload
from florist.federation.client_app import UPDATE_PREFIX, train_round
from florist.federation.datasets import federated_data
from florist.federation.simulation import run_federation
from florist.federation.strategy import LoraStrategy
from florist.files import umask
from florist.lora.adapters import read_adapter, read_adapters
from florist.lora.model import frozen_lora_A, lora_layers, read_factors
from florist.reporting.run_directory import read_rounds

CLIENT_RANKS = [2, 4, 8]
ROUNDS = 2
WIRE_BYTES = 4  # float32 on the wire


def federation_config(model_dir: Path, run_dir: Path, method: str, *extra: str) -> RunConfig:
    """Three clients of ranks 2, 4, 8 on the tiny model and a small slice of the embedded task."""
    return load_config(
        None,
        [
            f"model.name={json.dumps(str(model_dir))}",
            'model.autocast="none"',
            "data.examples_per_category=4",
            "data.test_per_category=1",
            "data.min_client_examples=2",
            f"federation.num_clients={len(CLIENT_RANKS)}",
            f"federation.ranks={CLIENT_RANKS}",
            f"federation.rounds={ROUNDS}",
            f"aggregation.method={json.dumps(method)}",
            "training.local_steps=2",
            "training.batch_size=4",
            "training.learning_rate=0.05",
            "evaluation.max_new_tokens=2",
            f"output.run_dir={json.dumps(str(run_dir))}",
            *extra,
        ],
    )


def npy_overhead(shape: tuple[int, ...]) -> int:
    """The .npy header flwr's Array stores in front of a float32 array's raw bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=np.float32))
    return buffer.tell() - math.prod(shape) * WIRE_BYTES


def payload_bytes(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], factors: str = "AB") -> int:
    """What ArrayRecord.count_bytes counts for LoRA factors: raw float32 data, each array's .npy
    header, and each key's characters; the data alone is (m + n) * r * 4 bytes per module."""
    total = 0
    for name, (m, n) in shapes.items():
        r = ranks[name]
        arrays = {"A": (r, n), "B": (m, r)}
        for factor in factors:
            shape = arrays[factor]
            total += math.prod(shape) * WIRE_BYTES + npy_overhead(shape) + len(f"{name}.{factor}")
    return total


def lora_data_bytes(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    return sum((m + n) * ranks[name] * WIRE_BYTES for name, (m, n) in shapes.items())


def numerical_rank(matrix: torch.Tensor) -> int:
    values = torch.linalg.svdvals(matrix.double())
    return int((values > values[0] * 1e-4).sum()) if values[0] > 0 else 0


# ---------------------------------------------------------------------------------------------
# Whole simulated runs: one per round-semantics family (merge: FLoRIST; continue: FlexLoRA).


@dataclass
class Federation:
    config: RunConfig
    path: Path
    rounds: list[dict]
    base: torch.nn.Module
    shapes: dict[str, tuple[int, int]]

    @property
    def method(self) -> str:
        return self.config.aggregation.method


@pytest.fixture(scope="module", params=["florist", "flexlora"])
def federation(request, tiny_model_dir, tmp_path_factory) -> Federation:
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    # FLoRIST on two simulation workers, FlexLoRA on one (every client in one process, one Ray actor to start).
    workers = 2 if request.param == "florist" else 1
    config = federation_config(
        tiny_model_dir, run_dir, request.param, "data.validation_fraction=0.25", f"federation.workers={workers}",
        "output.save_client_adapters=true",
    )
    path = run_federation(config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rounds = read_rounds(path)
    shapes = {name: tuple(base.get_submodule(name).weight.shape) for name in rounds[1]["ranks"]}
    return Federation(config, path, rounds, base, shapes)


def test_run_directory_holds_config_metrics_plots_summary_and_final_model(federation):
    path = federation.path
    assert path == Path(federation.config.output.run_dir)
    assert load_config(path / "config.toml") == federation.config
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (path / "final" / name).stat().st_size > 0, name
    plots = list((path / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 0 for p in plots)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["method"] == federation.method and summary["rounds"] == ROUNDS
    assert summary["base"] == federation.rounds[0]["evaluation"]
    assert summary["final"] == federation.rounds[-1]["evaluation"]
    assert not [*path.glob(".*"), *path.parent.glob(".*"), *path.glob("final/.*")], "staging left behind"


def test_every_file_of_the_run_directory_follows_the_umask(federation):
    # safetensors writes 0600 whatever the umask: the final model and every adapter must not keep it.
    mask = umask()
    for path in [federation.path, *federation.path.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~mask, path


def test_metrics_have_every_round_with_per_client_reports(federation):
    rounds, config = federation.rounds, federation.config
    data = federated_data(config)
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert "clients" not in rounds[0] and math.isfinite(rounds[0]["evaluation"]["test_loss"])
    assert all(rounds[k]["evaluation"] == {} for k in range(1, ROUNDS))  # evaluation.every_round is off
    for record in rounds[1:]:
        clients = record["clients"]
        assert [c["partition"] for c in clients] == list(range(len(CLIENT_RANKS)))
        assert [c["rank"] for c in clients] == CLIENT_RANKS
        assert [c["examples"] for c in clients] == [len(examples) for examples in data.clients]
        assert len({c["node"] for c in clients}) == len(CLIENT_RANKS)
        assert all(math.isfinite(c["train_loss"]) and c["train_tokens"] > 0 for c in clients)
        assert record["aggregation_seconds"] >= 0
        expected_loss = sum(c["train_loss"] * c["examples"] for c in clients) / sum(c["examples"] for c in clients)
        assert record["train_loss"] == pytest.approx(expected_loss)
        assert set(record["ranks"]) == set(federation.shapes) and len(federation.shapes) == 4
        assert record["total_rank"] == sum(record["ranks"].values())
        for name, rank in record["ranks"].items():
            if federation.method == "flexlora":  # the shared adapter is the largest client truncation
                assert rank == max(CLIENT_RANKS)
            else:
                assert 1 <= rank <= min(sum(CLIENT_RANKS), *federation.shapes[name])
                assert 0.9 <= record["energy"][name] <= 1.0 + 1e-9  # tau = 0.9


def test_bytes_up_are_each_clients_factors(federation):
    for record in federation.rounds[1:]:
        for client in record["clients"]:
            ranks = {name: client["rank"] for name in federation.shapes}
            assert client["bytes_up"] == payload_bytes(federation.shapes, ranks)
            overhead = client["bytes_up"] - lora_data_bytes(federation.shapes, ranks)
            assert 0 < overhead <= 2 * len(federation.shapes) * (128 + 64)  # .npy header + key per array


def test_bytes_down_are_what_each_client_had_not_received(federation):
    first, second = federation.rounds[1], federation.rounds[2]
    assert [c["bytes_down"] for c in first["clients"]] == [0] * len(CLIENT_RANKS)
    for client in second["clients"]:
        if federation.method == "florist":  # the round-1 global update, to be merged into the base
            expected = payload_bytes(federation.shapes, first["ranks"])
        else:  # FlexLoRA: this client's own truncation of the round-1 update, at its rank
            expected = payload_bytes(federation.shapes, {name: client["rank"] for name in federation.shapes})
        assert client["bytes_down"] == expected


def test_final_model_and_adapter_are_the_servers_final_state(federation, tiny_model_dir):
    final = federation.path / "final"
    merged_base = AutoModelForCausalLM.from_pretrained(final / "model", dtype=torch.float32)
    base_weights, merged_weights = federation.base.state_dict(), merged_base.state_dict()
    assert merged_weights.keys() == base_weights.keys()
    for key, weight in merged_weights.items():
        module = key.removesuffix(".weight")
        if module not in federation.shapes:
            assert torch.equal(weight, base_weights[key]), key
        elif federation.method == "florist":  # round 1's global update is merged, at its kept rank
            assert numerical_rank(weight - base_weights[key]) == federation.rounds[1]["ranks"][module], key
        else:  # FlexLoRA continues from the global adapter: nothing is merged
            assert torch.equal(weight, base_weights[key]), key

    _, adapter = read_adapter(final / "adapter")
    assert {name: f.rank for name, f in adapter.modules.items()} == federation.rounds[-1]["ranks"]

    model = PeftModel.from_pretrained(merged_base, final / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(final / "model")
    config = federation.config
    data = federated_data(config)
    summary = json.loads((federation.path / "summary.json").read_text())

    def loss(of: torch.nn.Module, examples) -> float:
        return instruction_loss(of, tokenizer, examples, template=config.data.template, max_length=config.data.max_length).mean_nll

    assert loss(model, data.test) == pytest.approx(summary["final"]["test_loss"], abs=1e-5)
    assert loss(model, data.validation) == pytest.approx(summary["final"]["val_loss"], abs=1e-5)
    assert loss(federation.base, data.test) == pytest.approx(summary["base"]["test_loss"], abs=1e-5)
    # The check can fail: the last adapter changes the loss by far more than the tolerance.
    with model.disable_adapter():
        assert abs(loss(model, data.test) - summary["final"]["test_loss"]) > 1e-4

    # Base plus every update of the run: rank at most the ranks kept over the rounds.
    final_weights = model.merge_and_unload().state_dict()
    for module in federation.shapes:
        kept = [record["ranks"][module] for record in federation.rounds[1:]]
        delta = final_weights[f"{module}.weight"] - base_weights[f"{module}.weight"]
        expected = min(sum(kept), *federation.shapes[module]) if federation.method == "florist" else kept[-1]
        assert numerical_rank(delta) == expected, module


def test_saved_client_adapters_aggregate_again_to_each_rounds_global_update(federation):
    """The adapters under clients/round<t> are what the server aggregated: the same aggregator on them gives
    the ranks the round recorded, and in the last round the final adapter itself."""
    _, final = read_adapter(federation.path / "final" / "adapter")
    for record in federation.rounds[1:]:
        folder = federation.path / "clients" / f"round{record['round']}"
        index = json.loads((folder / "clients.json").read_text())
        assert [c["partition"] for c in index] == [c["partition"] for c in record["clients"]]
        assert [c["weight"] for c in index] == [c["examples"] for c in record["clients"]]
        clients = read_adapters([folder / c["adapter"] for c in index], [c["weight"] for c in index])
        assert [max(f.rank for f in c.modules.values()) for c in clients] == [c["rank"] for c in record["clients"]]
        config = federation.config.aggregation
        aggregate = make_aggregator(config.method, **config.options()).aggregate(clients)
        assert {name: m.rank for name, m in aggregate.modules.items()} == record["ranks"]
    for name, module in aggregate.modules.items():
        expected = final.modules[name].scale * final.modules[name].B @ final.modules[name].A
        torch.testing.assert_close(module.delta(), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The strategy's messages, round by round, with hand-built client replies.

MODULES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}


class FakeGrid:
    """The one Grid method the strategy uses when sampling nodes."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture
def task_identity(monkeypatch):
    """Messages can only be built inside a Flower task; this process plays the ServerApp's."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def strategy_for(method: str, ranks: list[int] = CLIENT_RANKS) -> LoraStrategy:
    config = RunConfig.model_validate(
        {"federation": {"num_clients": len(ranks), "ranks": ranks}, "aggregation": {"method": method, "tau": 0.9}}
    )
    return LoraStrategy(config, {name: n for name, (_, n) in MODULES.items()})


def client_factors(rank: int, seed: int, method: str) -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (m, n) in MODULES.items():
        a = frozen_lora_A(name, rank, n, 1234) if method == "ffa" else torch.randn(rank, n, generator=generator)
        factors[name] = LoraFactors(A=a, B=torch.randn(m, rank, generator=generator), scale=2.0)
    return factors


def reply(instruction: Message, partition: int, rank: int, factors: dict[str, LoraFactors], method: str) -> Message:
    content = RecordDict()
    payload.put(content, "adapter", factors, "float32", factors="B" if method == "ffa" else "AB")
    content["metrics"] = MetricRecord(
        {
            "num-examples": 10 + partition,
            "partition-id": partition,
            "rank": rank,
            "train-loss": 1.0,
            "train-steps": 1,
            "train-tokens": 5,
            "train-seconds": 0.1,
            "peak-rss-mib": 1.0,
        }
    )
    return Message(content, reply_to=instruction)


def play_round(strategy: LoraStrategy, grid: FakeGrid, server_round: int, partition_of: dict[int, int], method: str):
    """configure_train, a reply from every node, aggregate_train; returns the instructions and the adapters sent."""
    messages = list(strategy.configure_train(server_round, None, ConfigRecord(), grid))
    adapters = {}
    replies = []
    for message in messages:
        partition = partition_of[message.metadata.dst_node_id]
        rank = CLIENT_RANKS[partition]
        adapters[partition] = client_factors(rank, seed=100 * server_round + partition, method=method)
        replies.append(reply(message, partition, rank, adapters[partition], method))
    strategy.aggregate_train(server_round, reversed(replies))
    return {m.metadata.dst_node_id: m for m in messages}, adapters


def sent_payloads(message: Message) -> list[str]:
    return [key for key in message.content if key != "config" and not key.endswith(":scales")]


def assert_modules_equal(received: dict[str, dict], expected: dict[str, GlobalModule], factors: str = "AB") -> None:
    assert list(received) == list(expected)
    for name, module in expected.items():
        assert set(received[name]) == {"scale", *factors}
        assert received[name]["scale"] == pytest.approx(module.scale)
        for factor in factors:
            assert torch.equal(received[name][factor], getattr(module, factor).float())


@pytest.mark.parametrize("method", ["florist", "flora"])
def test_merge_methods_send_each_update_once_to_each_node(method, task_identity):
    strategy = strategy_for(method)
    partition_of = {11: 0, 22: 1, 33: 2}
    grid = FakeGrid(list(partition_of))
    messages, _ = play_round(strategy, grid, 1, partition_of, method)
    assert all(sent_payloads(m) == [] for m in messages.values())
    assert all(m.content["config"]["round"] == 1 and m.metadata.message_type == MessageType.TRAIN for m in messages.values())
    assert all(strategy.reports[0].clients[k].bytes_down == 0 for k in range(3))

    messages, _ = play_round(strategy, grid, 2, partition_of, method)
    for message in messages.values():
        assert sent_payloads(message) == [f"{UPDATE_PREFIX}1"]
        assert_modules_equal(payload.take(message.content, f"{UPDATE_PREFIX}1"), strategy.updates[0])
    assert [c.bytes_down for c in strategy.reports[1].clients] == [message.content["update:1"].count_bytes()] * 3

    # A node that joins now (44 replaces 33 as partition 2) gets the whole chain; the others only the news.
    partition_of = {11: 0, 22: 1, 44: 2}
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(3, None, ConfigRecord(), FakeGrid(list(partition_of)))}
    assert sent_payloads(messages[11]) == sent_payloads(messages[22]) == [f"{UPDATE_PREFIX}2"]
    assert sent_payloads(messages[44]) == [f"{UPDATE_PREFIX}1", f"{UPDATE_PREFIX}2"]
    assert_modules_equal(payload.take(messages[44].content, f"{UPDATE_PREFIX}2"), strategy.updates[1])


def test_fedit_sends_the_global_adapter_to_every_node(task_identity):
    strategy = strategy_for("fedit")
    partition_of = {11: 0, 22: 1, 33: 2}
    grid = FakeGrid(list(partition_of))
    messages, adapters = play_round(strategy, grid, 1, partition_of, "fedit")
    assert all(sent_payloads(m) == [] for m in messages.values())
    reference = make_aggregator("fedit").aggregate([ClientAdapter(adapters[k], 10.0 + k) for k in range(3)])
    for name, module in reference.modules.items():
        assert torch.allclose(strategy.current.modules[name].delta(), module.delta(), atol=1e-5)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, ConfigRecord(), grid)}
    for node, message in messages.items():
        assert sent_payloads(message) == ["global"]
        assert_modules_equal(payload.take(message.content, "global"), strategy.current.modules)
        assert strategy.bytes_down[node] == message.content["global"].count_bytes()
    assert strategy.updates == []


def test_ffa_sends_B_only_and_the_server_rederives_the_shared_A(task_identity):
    strategy = strategy_for("ffa")
    partition_of = {11: 0, 22: 1, 33: 2}
    grid = FakeGrid(list(partition_of))
    _, adapters = play_round(strategy, grid, 1, partition_of, "ffa")
    weights = [10.0 + k for k in range(3)]
    reference = make_aggregator("ffa").aggregate([ClientAdapter(adapters[k], weights[k]) for k in range(3)])
    for name, module in reference.modules.items():
        assert torch.allclose(strategy.current.modules[name].delta(), module.delta(), atol=1e-6)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, ConfigRecord(), grid)}
    for message in messages.values():
        assert sent_payloads(message) == ["global"]
        assert all(key.endswith(".B") for key in message.content["global"])
        assert_modules_equal(payload.take(message.content, "global"), strategy.current.modules, factors="B")


def test_flexlora_sends_each_node_its_own_truncation(task_identity):
    strategy = strategy_for("flexlora")
    partition_of = {11: 0, 22: 1, 33: 2}
    grid = FakeGrid(list(partition_of))
    _, adapters = play_round(strategy, grid, 1, partition_of, "flexlora")
    reference = make_aggregator("flexlora").aggregate([ClientAdapter(adapters[k], 10.0 + k) for k in range(3)])
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, ConfigRecord(), grid)}
    for node, partition in partition_of.items():
        received = payload.take(messages[node].content, "global")
        # Its rank, or the module's full rank when that is smaller (a truncation of u s v^T).
        assert {name: module["B"].shape[1] for name, module in received.items()} == {
            name: min(CLIENT_RANKS[partition], *shape) for name, shape in MODULES.items()
        }
        for name, module in received.items():
            expected = reference.per_client[partition][name]
            got = module["scale"] * module["B"] @ module["A"]
            assert torch.allclose(got, expected.delta(), atol=1e-5), (node, name)
        assert strategy.bytes_down[node] == messages[node].content["global"].count_bytes()


# ---------------------------------------------------------------------------------------------
# The ClientApp's train_round on the tiny model: what each client starts its round from.


@dataclass
class Observed:
    """A client's LoRA and the weights under it when training began, and its LoRA when it ended."""

    start: dict[str, LoraFactors]
    base: dict[str, torch.Tensor]
    a_trainable: dict[str, bool]
    end: dict[str, LoraFactors]


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
        calls.append(Observed(start, base, trainable, read_factors(model)))
        return result

    monkeypatch.setattr(client_app, "train_lora", spy)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)  # train_round sets one thread per simulation worker


@pytest.fixture(scope="module")
def pristine(tiny_model_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }


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


def train_message(server_round: int, node: int, payloads: dict[str, dict[str, GlobalModule]], factors: str = "AB") -> Message:
    content = RecordDict({"config": ConfigRecord({"round": server_round})})
    for key, modules in payloads.items():
        payload.put(content, key, modules, "float32", factors=factors)
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def client_context(node: int, partition: int) -> Context:
    return Context(run_id=7, node_id=node, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def merged(pristine: dict[str, torch.Tensor], *updates: dict[str, GlobalModule]) -> dict[str, torch.Tensor]:
    return {name: w + sum(update[name].delta() for update in updates) for name, w in pristine.items()}


def assert_weights_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def test_florist_client_merges_every_update_once_and_starts_a_fresh_lora(
    tiny_model_dir, tmp_path, pristine, observed, task_identity
):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    first, second = random_update(pristine, 3, 1.5, seed=1), random_update(pristine, 5, 0.7, seed=2)
    node = client_context(node=21, partition=1)

    train_round(config, train_message(1, 21, {}), node)
    answer = train_round(config, train_message(2, 21, {"update:1": first}), node)
    train_round(config, train_message(3, 21, {"update:2": second}), node)  # update:1 is in the node's state
    assert_weights_close(observed[0].base, pristine)
    assert_weights_close(observed[1].base, merged(pristine, first))
    assert_weights_close(observed[2].base, merged(pristine, first, second))
    for call in observed:
        for name, factors in call.start.items():
            assert factors.rank == CLIENT_RANKS[1] and factors.scale == pytest.approx(2.0)  # alpha = 2 r
            assert not factors.B.any() and factors.A.any(), name  # peft's init: a fresh LoRA every round
        assert any(not torch.equal(call.end[n].B, call.start[n].B) for n in call.end)

    # Another node whose chain is shorter than the process's cached base: rebuilt from pristine weights.
    train_round(config, train_message(2, 22, {"update:1": first}), client_context(node=22, partition=0))
    assert_weights_close(observed[3].base, merged(pristine, first))

    sent = payload.take(answer.content, "adapter")
    assert answer.metadata.dst_node_id == 0 and answer.metadata.src_node_id == 21
    assert answer.content["metrics"]["partition-id"] == 1 and answer.content["metrics"]["rank"] == CLIENT_RANKS[1]
    for name, factors in observed[1].end.items():
        assert torch.equal(sent[name]["A"], factors.A) and torch.equal(sent[name]["B"], factors.B)
        assert sent[name]["scale"] == factors.scale


def test_a_client_round_does_not_depend_on_what_the_process_ran_before(tiny_model_dir, tmp_path, observed, task_identity):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist")
    train_round(config, train_message(1, 21, {}), client_context(node=21, partition=1))
    torch.rand(1000)  # another client, or anything else, moves the global generator on
    train_round(config, train_message(1, 21, {}), client_context(node=21, partition=1))
    first, second = observed
    for name in first.start:
        assert torch.equal(first.start[name].A, second.start[name].A), name
        assert torch.equal(first.end[name].B, second.end[name].B), name


@pytest.mark.parametrize("partition", [0, 2], ids=["rank-below-global", "rank-above-global"])
def test_fedit_client_starts_from_the_global_adapter_at_its_rank(tiny_model_dir, tmp_path, pristine, observed, task_identity, partition):
    config = federation_config(tiny_model_dir, tmp_path / "run", "fedit")
    global_rank, global_scale = 5, 0.5
    update = random_update(pristine, global_rank, global_scale, seed=3)
    train_round(config, train_message(2, 31, {"global": update}), client_context(node=31, partition=partition))
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


def test_ffa_client_keeps_the_shared_seeded_A_frozen_and_sends_B_only(tiny_model_dir, tmp_path, pristine, observed, task_identity):
    config = federation_config(tiny_model_dir, tmp_path / "run", "ffa")
    update = {
        name: GlobalModule(A=frozen_lora_A(name, 8, w.shape[1], config.federation.ffa_seed), B=module.B, scale=3.0)
        for (name, w), module in zip(pristine.items(), random_update(pristine, 8, 3.0, seed=4).values())
    }
    answer = train_round(config, train_message(2, 41, {"global": update}, factors="B"), client_context(node=41, partition=1))
    (call,) = observed
    rank, scale = CLIENT_RANKS[1], 2.0
    for name, factors in call.start.items():
        shared = frozen_lora_A(name, rank, pristine[name].shape[1], config.federation.ffa_seed)
        assert torch.equal(factors.A, shared) and torch.equal(call.end[name].A, shared)
        assert not call.a_trainable[name]
        assert torch.allclose(factors.B, update[name].B[:, :rank] * 3.0 / scale)
        assert not torch.equal(call.end[name].B, factors.B)
    assert all(key.endswith(".B") for key in answer.content["adapter"])
    sent = payload.take(answer.content, "adapter")
    assert all(torch.equal(sent[name]["B"], call.end[name].B) for name in sent)
