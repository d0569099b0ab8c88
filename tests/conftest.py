"""Shared fixtures: a tiny random Llama (and Qwen2) saved as a model directory that `model.name` can point to,
and the deployment tests' site files with the simulation they must match."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from federations import federation_config
from florist.federation.datasets import federated_data
from florist.federation.simulation import run_federation
from florist.models import EMBEDDED_MODEL, resolve_model
from loopback_sites import write_examples

# The same examples on every run: a property test that fails fails for everyone, on every run
# (a new seed is a one-line change here); HYPOTHESIS_PROFILE=explore searches afresh each time.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
"""Small enough to train in milliseconds; q_proj is 32 x 32 and v_proj 16 x 32 (2 KV heads of 8)."""

TINY_QWEN2 = {**TINY_LLAMA, "tie_word_embeddings": False}
"""The same sizes as Qwen2, whose q, k and v projections have biases, with an lm_head of its own."""


def _save_tiny(model_class, config_class, sizes: dict, path: Path) -> Path:
    """A random-init model of `sizes` with SmolLM2's real tokenizer, saved as transformers saves any model."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED_MODEL))
    config = config_class(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama with SmolLM2's real tokenizer (chatml, <|im_end|> as eos and pad), saved as
    transformers saves any model, so it goes through `florist.models.load_model` like a user's path.

    The tokenizer comes from the embedded model's de-quantised cache, the copy users get: made once
    (~20 s), then read in well under a second.
    """
    return _save_tiny(LlamaForCausalLM, LlamaConfig, TINY_LLAMA, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_model_dir` as a Qwen2: biased q/k/v projections and an untied lm_head, what peft's
    `bias` and `modules_to_save` train in full."""
    return _save_tiny(Qwen2ForCausalLM, Qwen2Config, TINY_QWEN2, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def server_task(monkeypatch):
    """This process plays a Flower task (messages can only be built inside one), and gets its torch
    thread count back afterwards (a ClientApp sets the node's)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def site_data(tiny_model_dir, tmp_path_factory) -> Path:
    """Each site's own training file, laid out as `data.partition = "given"` reads a directory
    (client_<k>.json beside test.json): the embedded task's split of the run's configuration, each
    client's examples reversed, so that a node that ignored its data= file and derived its part of
    the split instead would train on other batches, and its result would differ."""
    directory = tmp_path_factory.mktemp("sites")
    split = federated_data(federation_config(tiny_model_dir, directory / "unused", "florist"))
    for site, examples in enumerate(split.clients):
        write_examples(directory / f"client_{site}.json", examples[::-1])
    write_examples(directory / "test.json", split.test)
    return directory


@pytest.fixture(scope="module")
def simulated(tiny_model_dir, site_data, tmp_path_factory) -> Path:
    """The same federation in simulation, its clients reading the sites' files from one directory."""
    run_dir = tmp_path_factory.mktemp("simulation") / "run"
    given = [f"data.source={json.dumps(str(site_data))}", 'data.partition="given"']
    return run_federation(federation_config(tiny_model_dir, run_dir, "florist", *given))


LONGEST_FILES = ("test_deployment_faults.py", "test_deployment.py", "test_secure_deployment.py", "test_control_proxy.py", "test_resume.py")
"""Collected first, longest first (the slowest 30 durations `make test` prints): its xdist workers each
take whole files in collection order, and a deployment file started last would run alone at the end."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES else len(LONGEST_FILES))
