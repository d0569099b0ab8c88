"""The base model's evaluation, cached on disk: read back only under the same model, data, settings and code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florist.aggregation import GlobalModule
from florist.config import load_config
from florist.data.prompts import Example
from florist.evaluation.cache import EvaluationCache, evaluation_key, model_digest
from florist.federation.datasets import federated_data
from florist.federation.delivery import GlobalUpdate
from florist.federation.server_model import ServerModel
from florist.files import umask


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "evaluations"


def server_config(model_dir: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.name={json.dumps(str(model_dir))}",
            "data.examples_per_category=4",
            "data.min_client_examples=2",
            "data.test_per_category=2",
            "federation.num_clients=2",
            "federation.ranks=[2]",
            "evaluation.max_new_tokens=3",
            *extra,
        ],
    )


def an_update(server: ServerModel, seed: int) -> GlobalUpdate:
    generator = torch.Generator().manual_seed(seed)
    return GlobalUpdate(
        {
            name: GlobalModule(
                A=torch.randn(2, module.in_features, generator=generator),
                B=torch.randn(module.out_features, 2, generator=generator),
                scale=0.5,
            )
            for name, module in server.targets.items()
        }
    )


def refuse_to_run(server: ServerModel, monkeypatch) -> None:
    def forward(*args, **kwargs):
        raise AssertionError("the model ran although its evaluation was cached")

    monkeypatch.setattr(server.model, "forward", forward)


def test_a_second_run_reads_the_base_evaluation_back_without_running_the_model(tiny_model_dir, cache_dir, monkeypatch):
    config = server_config(tiny_model_dir)
    test = federated_data(config).test
    first = ServerModel(config)
    computed = first.evaluate(test, None)
    assert not first.last_evaluation_cached and len(list(cache_dir.glob("*.json"))) == 1

    second = ServerModel(config)  # a new run: the model loaded again
    refuse_to_run(second, monkeypatch)
    assert second.evaluate(test, None) == computed
    assert second.last_evaluation_cached


def test_an_updated_model_is_always_evaluated(tiny_model_dir, cache_dir):
    config = server_config(tiny_model_dir)
    test = federated_data(config).test
    server = ServerModel(config)
    base = server.evaluate(test, None)
    server.set_state([an_update(server, 1)], None)
    updated = server.evaluate(test, None)
    assert not server.last_evaluation_cached and updated["test_loss"] != base["test_loss"]
    server.set_state([], None)  # back at the base: cached again
    assert server.evaluate(test, None) == base and server.last_evaluation_cached
    assert len(list(cache_dir.glob("*.json"))) == 1


def test_the_key_changes_with_weights_data_and_settings_and_only_with_them(tiny_model_dir, cache_dir):
    config = server_config(tiny_model_dir)
    test = federated_data(config).test
    server = ServerModel(config)
    key = server._base_key(test, None, ())
    assert ServerModel(config)._base_key(test, None, ()) == key  # the same model loaded again

    changed_item = [Example(e.instruction, e.response + " more", e.context, e.category) for e in test]
    assert server._base_key(changed_item, None, ()) != key
    assert server._base_key(test[:-1], None, ()) != key
    assert server._base_key(test, None, test[:1]) != key  # a validation set
    assert ServerModel(server_config(tiny_model_dir, "evaluation.max_new_tokens=4"))._base_key(test, None, ()) != key
    assert ServerModel(server_config(tiny_model_dir, "data.max_length=64"))._base_key(test, None, ()) != key

    digest = model_digest(server.model)
    weight = next(iter(server.targets.values())).weight
    with torch.no_grad():
        weight[0, 0] += 1e-6 * max(weight[0, 0].abs().item(), 1.0)  # the smallest change still counts
    assert model_digest(server.model) != digest and server._base_key(test, None, ()) != key


def test_an_unreadable_entry_is_recomputed_and_replaced(tiny_model_dir, cache_dir):
    config = server_config(tiny_model_dir)
    test = federated_data(config).test
    computed = ServerModel(config).evaluate(test, None)
    (entry,) = cache_dir.glob("*.json")
    entry.write_text('{"metrics": {"test_loss": ')  # a run killed mid-write by hand, say
    server = ServerModel(config)
    with pytest.warns(RuntimeWarning, match="unreadable cached evaluation"):
        assert server.evaluate(test, None) == computed
    assert not server.last_evaluation_cached
    assert json.loads(entry.read_text())["metrics"] == computed


def test_a_cache_that_cannot_be_written_costs_time_not_the_run(tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FLORIST_CACHE", str(blocker))
    config = server_config(tiny_model_dir)
    with pytest.warns(RuntimeWarning, match="could not cache the evaluation"):
        metrics = ServerModel(config).evaluate(federated_data(config).test, None)
    assert "test_loss" in metrics


def test_the_cache_can_be_turned_off(tiny_model_dir, cache_dir):
    config = server_config(tiny_model_dir, "evaluation.cache=false")
    test = federated_data(config).test
    server = ServerModel(config)
    server.evaluate(test, None)
    server.evaluate(test, None)
    assert not server.last_evaluation_cached and not cache_dir.exists()


def test_cache_entries_follow_the_umask(tmp_path):
    cache = EvaluationCache(tmp_path / "evaluations")
    model = torch.nn.Linear(2, 2)
    key = evaluation_key(model, data=[1, 2])
    cache.put(key, {"test_loss": 1.5}, {"model": "linear"})
    assert cache.get(key) == {"test_loss": 1.5}
    assert cache.path(key).stat().st_mode & 0o777 == 0o666 & ~umask()
