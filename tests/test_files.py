"""Every file florist writes follows the umask, including those whose writers make private files (safetensors, mkdtemp)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from test_adapters import save_lora, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

import florist.cli
from florist import models
from florist.aggregation import GlobalModule
from florist.config import load_config
from florist.federation.delivery import GlobalUpdate
from florist.federation.server_model import ServerModel
from florist.files import follow_umask
from florist.lora.adapters import read_adapter, write_adapter
from florist.reporting.plots import plot_run
from florist.reporting.run_directory import RunDirectory

UMASK = 0o027


@pytest.fixture
def umask():
    previous = os.umask(UMASK)
    yield UMASK
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Every file's and directory's permission bits under `root` (itself included), by relative path."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def assert_follows_umask(root: Path) -> None:
    expected = {name: (0o777 if (root / name).is_dir() else 0o666) & ~UMASK for name in modes(root)}
    assert modes(root) == expected


def test_follow_umask_opens_private_files_and_directories(tmp_path, umask):
    (tmp_path / "tree" / "deep").mkdir(parents=True)
    for path, mode in ((tmp_path / "tree" / "deep" / "weights", 0o600), (tmp_path / "tree" / "config", 0o600)):
        path.write_text("x")
        path.chmod(mode)
    (tmp_path / "tree" / "deep").chmod(0o700)
    follow_umask(tmp_path / "tree")
    assert_follows_umask(tmp_path / "tree")


def test_write_adapter_follows_the_umask(tmp_path, umask):
    save_lora(tiny_llama(), tmp_path / "client", seed=1, r=4, lora_alpha=8)
    config, client = read_adapter(tmp_path / "client")
    write_adapter(tmp_path / "out", {n: GlobalModule(A=f.A, B=f.B, scale=f.scale) for n, f in client.modules.items()}, config)
    assert_follows_umask(tmp_path / "out")


def test_florist_aggregate_output_follows_the_umask(tmp_path, umask, monkeypatch):
    monkeypatch.setattr(florist.cli, "SUBCOMMANDS", ("aggregate",))
    base = tiny_llama()
    for k in range(2):
        save_lora(base, tmp_path / f"client_{k}", seed=k, r=4, lora_alpha=8)
    argv = ["aggregate", "--method", "florist", "--out", str(tmp_path / "out"), str(tmp_path / "client_0"), str(tmp_path / "client_1")]
    assert florist.cli.main(argv) == 0
    assert_follows_umask(tmp_path / "out")


def test_the_final_model_and_adapter_follow_the_umask(tmp_path, umask, tiny_model_dir):
    config = load_config(None, [f"model.name={json.dumps(str(tiny_model_dir))}"])
    server = ServerModel(config)
    generator = torch.Generator().manual_seed(0)
    adapter = GlobalUpdate({
        name: GlobalModule(A=torch.randn(2, module.in_features, generator=generator), B=torch.randn(module.out_features, 2, generator=generator))
        for name, module in server.targets.items()
    })
    server.save(tmp_path / "final", [adapter], adapter)
    assert (tmp_path / "final" / "model" / "model.safetensors").is_file()
    assert_follows_umask(tmp_path / "final")


def test_run_directory_files_and_plots_follow_the_umask(tmp_path, umask):
    run = RunDirectory.create(load_config(None, [f"output.run_dir={json.dumps(str(tmp_path / 'run'))}"]))
    clients = [{"partition": 0, "train_loss": 1.0, "rank": 2, "bytes_down": 10, "bytes_up": 10}]
    run.record_round({"round": 0, "evaluation": {"test_loss": 2.0}})
    run.record_round({"round": 1, "clients": clients, "train_loss": 1.0, "ranks": {"model.layers.0.q_proj": 2}, "evaluation": {}})
    plot_run(run.rounds, run.path / "plots")
    run.write_json("summary.json", {})
    assert {"config.toml", "metrics.jsonl", "summary.json", "plots/loss.png"} <= set(modes(run.path))
    assert_follows_umask(run.path)


class WithoutGguf:
    """A transformers Auto class that loads a plain model directory, ignoring the GGUF file name."""

    def __init__(self, auto):
        self.auto = auto

    def from_pretrained(self, path, gguf_file, **options):
        return self.auto.from_pretrained(path, **options)


def test_the_embedded_models_cached_copy_follows_the_umask(tmp_path, umask, monkeypatch, tiny_model_dir):
    # The copy is made as for the embedded GGUF model, with the tiny model standing in for its package.
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_embedded_package_dir", lambda: tiny_model_dir)
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(models, auto.__name__, WithoutGguf(auto))
    copy = models._dequantised_copy()
    assert (copy / "model.safetensors").is_file()
    assert_follows_umask(tmp_path / "cache")
