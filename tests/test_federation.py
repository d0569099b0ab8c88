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
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from florist.aggregation import make_aggregator
from florist.config import RunConfig, load_config
from florist.evaluation import instruction_loss
from florist.federation import client_app
from florist.federation.datasets import federated_data
from florist.federation.simulation import run_federation
from florist.files import umask
from florist.lora.adapters import read_adapter, read_adapters
from florist.lora.model import read_factors
from florist.reporting.run_directory import read_rounds

from federations import CLIENT_RANKS, ROUNDS, federation_config
from test_influence import level_by_bisection

WIRE_BYTES = 4  # float32 on the wire


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
        # No client holds more than validation.max_weight_share of the round: here the largest, 2/3 of the examples, is cut.
        share = config.validation.max_weight_share
        level = level_by_bisection([c["examples"] for c in clients], share)
        assert [c["weight"] for c in clients] == pytest.approx([float(min(c["examples"], level)) for c in clients])
        assert max(c["weight"] for c in clients) == pytest.approx(share * sum(c["weight"] for c in clients))
        assert all(c["clipped"] == {} for c in clients)  # honest updates are not clipped
        expected_loss = sum(c["train_loss"] * c["weight"] for c in clients) / sum(c["weight"] for c in clients)
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
        assert [c["weight"] for c in index] == [c["weight"] for c in record["clients"]]
        clients = read_adapters([folder / c["adapter"] for c in index], [c["weight"] for c in index])
        assert [max(f.rank for f in c.modules.values()) for c in clients] == [c["rank"] for c in record["clients"]]
        config = federation.config.aggregation
        aggregate = make_aggregator(config.method, **config.options()).aggregate(clients)
        assert {name: m.rank for name, m in aggregate.modules.items()} == record["ranks"]
    for name, module in aggregate.modules.items():
        expected = final.modules[name].scale * final.modules[name].B @ final.modules[name].A
        torch.testing.assert_close(module.delta(), expected, atol=1e-6, rtol=1e-5)


def test_the_inline_engine_runs_the_same_federation_in_one_process(federation, tmp_path, monkeypatch):
    """federation.engine = "inline": every client in this process, one after another, no Ray; the rounds,
    the sampled clients, their losses and the final adapter are the simulation's (up to the rounding of
    a different number of torch threads)."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):  # as in a fresh `florist run` process
        monkeypatch.setattr(TaskIdentity, key, None)
    config = federation.config
    inline = config.model_copy(update={
        "federation": config.federation.model_copy(update={"engine": "inline"}),
        "output": config.output.model_copy(update={"run_dir": str(tmp_path / "inline")}),
    })
    rounds = read_rounds(run_federation(inline))
    assert len(rounds) == len(federation.rounds)
    for ours, theirs in zip(rounds[1:], federation.rounds[1:], strict=True):
        assert ours["ranks"] == theirs["ranks"]
        clients = [sorted((c["partition"], c["train_loss"]) for c in r["clients"]) for r in (ours, theirs)]
        assert [p for p, _ in clients[0]] == [p for p, _ in clients[1]]
        assert [loss for _, loss in clients[0]] == pytest.approx([loss for _, loss in clients[1]], rel=1e-4)
    _, ours = read_adapter(tmp_path / "inline" / "final" / "adapter")
    _, theirs = read_adapter(federation.path / "final" / "adapter")
    # Two rounds of training on another number of threads move each module by ~1e-5 of its norm
    # (measured 2e-6 to 6e-5); an element near zero can then differ by more than any elementwise rtol.
    for name, module in theirs.modules.items():
        delta = module.scale * module.B @ module.A
        difference = ours.modules[name].scale * ours.modules[name].B @ ours.modules[name].A - delta
        assert torch.linalg.norm(difference) <= 2e-4 * torch.linalg.norm(delta), name


def test_a_hundred_clients_with_a_tenth_sampled_per_round(tiny_model_dir, tmp_path):
    """Flower's simulation engine with 100 SuperNodes: each round trains and aggregates only the
    10 sampled, drawn afresh per round, and the server holds only their replies."""
    config = federation_config(
        tiny_model_dir, tmp_path / "run", "florist", "federation.num_clients=100", "federation.ranks=[4]",
        "federation.client_fraction=0.1", "data.partition=\"iid\"", "data.examples_per_category=20",
        "data.min_client_examples=1", "evaluation.base=false", "training.local_steps=1", "output.save_model=false",
    )
    rounds = read_rounds(run_federation(config))
    samples = []
    for record in rounds[1:]:
        assert len(record["sampled"]) == 10 and record["quorum"] == 5
        assert sorted(c["node"] for c in record["clients"]) == record["sampled"]
        assert all(e["status"] == "accepted" for e in record["events"])
        samples.append(set(record["sampled"]))
    assert samples[0] != samples[1]
    # The server's memory does not grow with the round: what it holds is the sampled replies only.
    assert rounds[-1]["server_peak_rss_mib"] - rounds[1]["server_peak_rss_mib"] < 64


def test_warm_started_clients_begin_from_the_last_update_and_the_server_aggregates_only_what_they_learned(tiny_model_dir, tmp_path, monkeypatch):
    """federation.warm_start, end to end: a client starts from the leading components of update 1 at its
    rank (test_client_app checks it starts there) and uploads its change since then; the server's saved
    copy is what the client learned, s B A - s B0 A0 from its LoRA at the start and the end of training,
    stacked as [B - B0 | B0] @ [A ; A0's change] (rank r + r0, its last r0 columns of B the start's),
    from which the round's aggregate follows."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, None)
    trainings = []  # (LoRA at the start, LoRA at the end) of every client, in the order they train
    train_lora = client_app.train_lora

    def spy(model, features, **options):
        began = read_factors(model)
        result = train_lora(model, features, **options)
        trainings.append((began, read_factors(model)))
        return result

    monkeypatch.setattr(client_app, "train_lora", spy)
    config = federation_config(
        tiny_model_dir, tmp_path / "run", "florist", "federation.warm_start=true", 'federation.engine="inline"',
        "output.save_client_adapters=true", "evaluation.base=false",
    )
    path = run_federation(config)
    rounds = read_rounds(path)
    aggregator = make_aggregator("florist", **config.aggregation.options())

    def saved(round_: int):
        folder = path / "clients" / f"round{round_}"
        index = json.loads((folder / "clients.json").read_text())
        return index, read_adapters([folder / c["adapter"] for c in index], [c["weight"] for c in index])

    _, first = saved(1)
    update = aggregator.aggregate(first).modules
    index, second = saved(2)
    # Round 2's clients are the warm-started ones, each of its own rank.
    warm = {next(iter(end.values())).rank: (began, end) for began, end in trainings if any(f.B.any() for f in began.values())}
    assert sorted(warm) == sorted(CLIENT_RANKS[entry["partition"]] for entry in index)
    for entry, client in zip(index, second, strict=True):
        rank = CLIENT_RANKS[entry["partition"]]
        began, end = warm[rank]
        for name, factors in client.modules.items():
            kept = min(rank, update[name].rank)
            assert factors.rank == rank + kept, name
            start = update[name].scale * update[name].B[:, :kept]
            torch.testing.assert_close(factors.scale * factors.B[:, rank:], start, atol=1e-6, rtol=1e-4)
            learned = end[name].scale * (end[name].B.double() @ end[name].A.double() - began[name].B.double() @ began[name].A.double())
            got = factors.scale * factors.B.double() @ factors.A.double()
            assert ((got - learned).norm() / learned.norm()).item() < 1e-5, name
    assert {name: m.rank for name, m in aggregator.aggregate(second).modules.items()} == rounds[2]["ranks"]
