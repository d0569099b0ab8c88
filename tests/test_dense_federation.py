"""Tensors trained in full (model.lora_bias, model.modules_to_save) through the federation: the real
server loop and ClientApp in this process (local_grid.py) on a tiny Qwen2, whose q/k/v projections
have biases and whose lm_head is its own. The global values are the clients' weighted mean, every
node trains on them the next round, the final model and adapter load in peft as the server
evaluated them, a resumed run equals an uninterrupted one, and a hostile tensor is rejected."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import Array, Message, RecordDict
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from florist.aggregation import LoraFactors
from florist.config import RunConfig
from florist.evaluation import instruction_loss
from florist.federation import client_app, payload
from florist.federation.client_app import build_client_app
from florist.federation.datasets import federated_data
from florist.federation.messages import ADAPTER, Instruction
from florist.federation.server_app import serve
from florist.federation.server_model import ServerModel
from florist.lora.adapters import read_adapter, read_adapters
from florist.lora.model import load_dense, model_tensor, read_dense
from florist.reporting.run_directory import read_rounds

from federations import ROUNDS, federation_config
from local_grid import LocalGrid, ServerCrash, crash_before_round

NODES = {101: 0, 202: 1, 303: 2}
BIASES = {i: [f"model.layers.{i}.self_attn.{m}_proj.base_layer.bias" for m in "qv"] for i in (0, 1)}
# A merging and a continuing method, each with biases and the lm_head trained in full.
SETTINGS = {
    "florist": ['model.lora_bias="all"', 'model.modules_to_save=["lm_head"]'],
    "fedit": ['model.lora_bias="lora_only"', 'model.modules_to_save=["lm_head"]'],
}
EXPECTED = {
    "florist": {*BIASES[0], *BIASES[1], "model.layers.0.self_attn.k_proj.bias", "model.layers.1.self_attn.k_proj.bias", "lm_head.weight"},
    "fedit": {*BIASES[0], *BIASES[1], "lm_head.weight"},
}


def dense_config(model_dir: Path, run_dir: Path, method: str, *extra: str) -> RunConfig:
    return federation_config(
        model_dir, run_dir, method, *SETTINGS[method], "federation.round_timeout=60", "output.save_client_adapters=true", *extra
    )


def grid_for(config: RunConfig, nodes: dict[int, int] = NODES) -> LocalGrid:
    return LocalGrid(build_client_app(config), {node: {"partition-id": p} for node, p in nodes.items()})


@dataclass
class Federation:
    method: str
    config: RunConfig
    path: Path
    started: dict[tuple[int, int], dict[str, torch.Tensor]]
    """(round, partition) -> the tensors trained in full as the client's training began."""


def run_federation(monkeypatch, config: RunConfig) -> Federation:
    """A federation whose clients' starting tensors trained in full are recorded."""
    started: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    train_lora, train_round = client_app.train_lora, client_app.train_round
    current: dict[str, int] = {}

    def spy(model, features, **options):
        started[(current["round"], current["partition"])] = read_dense(model)
        return train_lora(model, features, **options)

    def tracking(config, msg, context):
        current.update(round=Instruction.read(msg).round, partition=int(context.node_config["partition-id"]))
        return train_round(config, msg, context)

    monkeypatch.setattr(client_app, "train_lora", spy)
    monkeypatch.setattr(client_app, "train_round", tracking)
    path = serve(config, grid_for(config))
    return Federation(config.aggregation.method, config, path, started)


@pytest.fixture(scope="module", params=list(SETTINGS))
def federation(request, tiny_qwen2_dir, tmp_path_factory) -> Federation:
    method = request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        from flwr.supercore.task_identity import TaskIdentity

        threads = torch.get_num_threads()
        for key, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
            monkeypatch.setattr(TaskIdentity, key, value)
        config = dense_config(tiny_qwen2_dir, tmp_path_factory.mktemp(method) / "run", method)
        result = run_federation(monkeypatch, config)
        torch.set_num_threads(threads)
        return result


@pytest.fixture(scope="module")
def base(tiny_qwen2_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()


def pristine(base: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    return {name: model_tensor(base, name).detach() for name in names}


def clients_sent(path: Path, server_round: int) -> tuple[list, list[float]]:
    """The adapters the server received in a round, as saved under clients/round<t>, and their weights."""
    folder = path / "clients" / f"round{server_round}"
    index = json.loads((folder / "clients.json").read_text())
    weights = [c["weight"] for c in index]
    return read_adapters([folder / c["adapter"] for c in index], weights), weights


def weighted_mean(path: Path, server_round: int) -> dict[str, torch.Tensor]:
    """sum_k p_k T_k of what the clients sent, in float64: the dense reference."""
    clients, weights = clients_sent(path, server_round)
    total = sum(weights)
    return {
        name: sum(w / total * client.dense[name].double() for w, client in zip(weights, clients, strict=True))
        for name in clients[0].dense
    }


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor.double(), expected[name].double(), atol=atol, rtol=1e-6, msg=name)


def test_the_clients_send_what_the_settings_train_in_full(federation):
    for client in clients_sent(federation.path, 1)[0]:
        assert set(client.dense) == EXPECTED[federation.method]
    assert set(federation.started) == {(r, p) for r in range(1, ROUNDS + 1) for p in NODES.values()}


def test_every_node_trains_on_the_weighted_mean_of_the_previous_round(federation, base):
    start = pristine(base, EXPECTED[federation.method])
    for partition in NODES.values():
        assert_close(federation.started[(1, partition)], start, atol=0)
    mean = weighted_mean(federation.path, 1)
    # Can fail: a round moves every tensor trained in full away from the base's value.
    for name, tensor in mean.items():
        assert (tensor - start[name].double()).abs().max() > 1e-4, name
    for partition in NODES.values():
        assert_close(federation.started[(2, partition)], mean)


def test_the_final_adapter_holds_the_last_rounds_weighted_mean_and_declares_it(federation):
    config, adapter = read_adapter(federation.path / "final" / "adapter")
    assert_close(adapter.dense, weighted_mean(federation.path, ROUNDS))
    settings = federation.config.model
    assert config["bias"] == settings.lora_bias and config["modules_to_save"] == settings.modules_to_save


def test_the_final_model_and_adapter_loaded_with_peft_give_the_servers_final_evaluation(federation, base, tiny_qwen2_dir):
    final = federation.path / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final / "model", dtype=torch.float32), final / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(final / "model")
    config = federation.config
    test = federated_data(config).test
    summary = json.loads((federation.path / "summary.json").read_text())

    def loss(of: torch.nn.Module) -> float:
        return instruction_loss(of, tokenizer, test, template=config.data.template, max_length=config.data.max_length).mean_nll

    assert loss(model) == pytest.approx(summary["final"]["test_loss"], abs=1e-5)
    # Can fail: the tensors trained in full change the loss by far more than the tolerance.
    load_dense(model, pristine(base, EXPECTED[federation.method]))
    assert abs(loss(model) - summary["final"]["test_loss"]) > 1e-4


def test_a_resumed_run_equals_the_uninterrupted_one(federation, server_task, tmp_path):
    config = dense_config(federation.config.model.name, tmp_path / "crashed", federation.method)
    grid = grid_for(config)

    grid.before_push = crash_before_round(2)
    with pytest.raises(ServerCrash):
        serve(config, grid)
    path = serve(config, grid_for(config), resume=tmp_path / "crashed")
    ours, theirs = read_rounds(path), read_rounds(federation.path)
    assert [r["evaluation"] for r in ours] == [r["evaluation"] for r in theirs]
    _, final = read_adapter(path / "final" / "adapter")
    _, reference = read_adapter(federation.path / "final" / "adapter")
    assert final.dense.keys() == reference.dense.keys()
    for name, tensor in reference.dense.items():
        assert torch.equal(final.dense[name], tensor), name
    for name, module in reference.modules.items():
        assert torch.equal(final.modules[name].A, module.A) and torch.equal(final.modules[name].B, module.B), name


def _tampered(change):
    """A node that trains for real, then changes the tensors trained in full of its reply."""

    def tamper(instruction: Message, reply: Message) -> Message:
        content = RecordDict(dict(reply.content.items()))
        modules, dense = payload.take(content, ADAPTER), payload.take_dense(content, ADAPTER)
        change(dense)
        del content[ADAPTER], content[f"{ADAPTER}:scales"]
        factors = {name: LoraFactors(A=m["A"], B=m["B"], scale=m["scale"]) for name, m in modules.items()}
        payload.put(content, ADAPTER, factors, "float32")
        # Raw arrays: payload.put refuses a NaN, and a hostile node need not use it.
        for name, tensor in dense.items():
            content[ADAPTER][f"{payload.DENSE_PREFIX}{name}"] = Array(tensor.numpy())
        return Message(content, reply_to=instruction)

    return tamper


def _nan(dense):
    dense[BIASES[0][0]] = dense[BIASES[0][0]].clone()
    dense[BIASES[0][0]][3] = math.nan


def _shape(dense):
    dense[BIASES[1][1]] = torch.zeros(17)


def _unexpected(dense):
    dense["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(16)


def _missing(dense):
    del dense[BIASES[0][1]]


def _blown_up(dense):
    for name in dense:
        dense[name] = dense[name] * 1000


HOSTILE = {
    "nan": (_nan, f"tensor {BIASES[0][0]} holds NaN or Inf values"),
    "wrong-shape": (_shape, f"tensor {BIASES[1][1]} is (17,), expected (16,)"),
    "unexpected-name": (_unexpected, "sends tensor model.layers.0.self_attn.k_proj.bias, which model.lora_bias / model.modules_to_save do not train in full"),
    "missing": (_missing, f"lacks tensor {BIASES[0][1]}"),
    # Well-formed, but 1000x what it trained: the norm screen judges these tensors on their own median.
    "blown-up": (_blown_up, "tensors trained in full norm"),
}


def test_a_hostile_tensor_trained_in_full_is_rejected_with_its_reason(tiny_qwen2_dir, tmp_path, server_task):
    nodes = {100 + k: k for k in range(3 + len(HOSTILE))}
    config = federation_config(
        tiny_qwen2_dir, tmp_path / "run", "florist", 'model.lora_bias="lora_only"', "federation.rounds=1", "evaluation.base=false",
        "evaluation.server=false", f"federation.num_clients={len(nodes)}", f"federation.ranks={[2, 4, 8] + [4] * len(HOSTILE)}",
        "federation.min_clients=3", 'data.partition="iid"', "output.save_client_adapters=true",
    )
    grid = grid_for(config, nodes)
    for (change, _), node in zip(HOSTILE.values(), list(nodes)[3:], strict=True):
        grid.nodes[node].tamper = _tampered(change)
    record = read_rounds(serve(config, grid))[1]
    seen = {e["node"]: (e["status"], e["reason"]) for e in record["events"]}
    for (name, (_, reason)), node in zip(HOSTILE.items(), list(nodes)[3:], strict=True):
        status, why = seen[node]
        assert status == "rejected" and why.startswith(reason), (name, why)
    assert [c["partition"] for c in record["clients"]] == [0, 1, 2]
    # The honest sites' biases were aggregated.
    _, adapter = read_adapter(tmp_path / "run" / "final" / "adapter")
    assert_close(adapter.dense, weighted_mean(tmp_path / "run", 1))


def test_a_default_run_refuses_tensors_trained_in_full(tiny_qwen2_dir, tmp_path, server_task):
    config = federation_config(tiny_qwen2_dir, tmp_path / "run", "fedit", "federation.rounds=1", "evaluation.base=false", "federation.min_clients=2")
    grid = grid_for(config)
    grid.nodes[303].tamper = _tampered(lambda dense: dense.update({"lm_head.weight": torch.zeros(3, 3)}))
    record = read_rounds(serve(config, grid))[1]
    status, reason = {e["node"]: (e["status"], e["reason"]) for e in record["events"]}[303]
    assert status == "rejected" and reason.startswith("sends tensor lm_head.weight, which model.lora_bias")


@pytest.mark.parametrize(
    "model, settings, message",
    [
        ("qwen2", ['model.modules_to_save=["score"]'], "model.modules_to_save entry 'score': model .* has no such module"),
        ("llama", ['model.lora_bias="lora_only"'], "model.lora_bias 'lora_only': the adapted layers of model .* have no bias to train"),
        ("llama", ['model.modules_to_save=["lm_head"]'], "model.modules_to_save entry .lm_head.: lm_head.weight is tied to model.embed_tokens.weight"),
    ],
    ids=["no-such-module", "no-bias", "tied"],
)
def test_settings_that_would_train_nothing_or_a_tied_tensor_are_refused(tiny_qwen2_dir, tiny_model_dir, tmp_path, model, settings, message):
    directory = tiny_qwen2_dir if model == "qwen2" else tiny_model_dir
    with pytest.raises(ValueError, match=message):
        ServerModel(federation_config(directory, tmp_path / "run", "florist", *settings))


def test_automatic_tau_keeps_the_tensors_trained_in_full_with_the_chosen_cut(tiny_qwen2_dir, tmp_path, server_task, monkeypatch):
    config = dense_config(tiny_qwen2_dir, tmp_path / "run", "florist", "data.validation_fraction=0.3", "aggregation.tau_candidates=[0.5, 1.0]")
    federation = run_federation(monkeypatch, config)
    for partition in NODES.values():
        assert_close(federation.started[(2, partition)], weighted_mean(federation.path, 1))
    _, adapter = read_adapter(federation.path / "final" / "adapter")
    assert_close(adapter.dense, weighted_mean(federation.path, ROUNDS))
