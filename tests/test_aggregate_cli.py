"""`florist aggregate` end to end: peft adapters in, a peft adapter out whose update is the method's."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_adapters import PREFIX, lora_layers, save_lora, save_trained_in_full, tiny_llama, tiny_qwen2, trained_in_full

import florist.cli
from florist.aggregation import make_aggregator
from florist.lora.adapters import read_adapters

WEIGHTS = [3.0, 1.0, 2.0]
CLIENTS = [
    {"r": 4, "lora_alpha": 8},
    {"r": 8, "lora_alpha": 16, "use_rslora": True},
    {"r": 2, "lora_alpha": 4, "rank_pattern": {"model.layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"model.layers.1.self_attn.q_proj": 3}},
]


@pytest.fixture(autouse=True)
def aggregate_only(monkeypatch):
    # The dispatcher imports every subcommand; these tests are about `aggregate` alone.
    monkeypatch.setattr(florist.cli, "SUBCOMMANDS", ("aggregate",))


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def clients(base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("clients")
    for k, options in enumerate(CLIENTS):
        save_lora(base, root / f"client_{k}", seed=10 + k, **options)
    return [root / f"client_{k}" for k in range(len(CLIENTS))]


@pytest.fixture(scope="module")
def ffa_clients(base, tmp_path_factory) -> list[Path]:
    """FFA-LoRA adapters: every client's A is a prefix of one shared frozen matrix."""
    root = tmp_path_factory.mktemp("ffa")
    frozen = torch.randn(8, 32, generator=torch.Generator().manual_seed(20))
    paths = []
    for k, rank in enumerate([4, 8, 2]):
        path = root / f"client_{k}"
        save_lora(base, path, seed=30 + k, r=rank, lora_alpha=2 * rank)
        tensors = load_file(path / "adapter_model.safetensors")
        for key, tensor in tensors.items():
            if key.endswith("lora_A.weight"):
                tensor.copy_(frozen[:rank, : tensor.shape[1]])
        save_file(tensors, path / "adapter_model.safetensors")
        paths.append(path)
    return paths


def ideal_update(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """dW = sum_k p_k s_k B_k A_k in float64, read straight from the files with peft's scale rule."""
    total = sum(weights)
    updates: dict[str, torch.Tensor] = {}
    for path, weight in zip(paths, weights):
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
        for key, A in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            B = tensors[key.replace("lora_A", "lora_B")].double()
            rank = A.shape[0]
            alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
            scale = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
            updates[name] = updates.get(name, 0) + weight / total * scale * B @ A.double()
    return updates


def method_update(method: str, options: dict, paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    aggregate = make_aggregator(method, **options).aggregate(read_adapters(paths, weights))
    return {name: module.delta().double() for name, module in aggregate.modules.items()}


def run(*argv) -> int:
    return florist.cli.main(["aggregate", *map(str, argv)])


def assert_adapter_applies(base, out: Path, updates: dict[str, torch.Tensor]) -> None:
    """Per module, peft's delta is `updates`; and the adapted model's logits are the base's with them added."""
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    layers = lora_layers(loaded)
    assert set(layers) == set(updates)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_delta_weight("default").double(), updates[name], rtol=1e-5, atol=1e-5)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, update in updates.items():
            merged.get_submodule(name).weight += update.float()
    tokens = torch.arange(24).reshape(2, 12) * 5 % 128
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, merged(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, flags", [("florist", ["--tau", "1"]), ("flora", [])], ids=["florist-tau1", "flora"])
def test_exact_methods_write_the_ideal_update(base, clients, tmp_path, capsys, method, flags):
    out = tmp_path / "out"
    assert run("--method", method, *flags, "--weights", ",".join(map(str, WEIGHTS)), "--out", out, *clients) == 0
    ideal = ideal_update(clients, WEIGHTS)
    engine = method_update(method, {"tau": 1.0} if method == "florist" else {}, clients, WEIGHTS)
    torch.testing.assert_close(engine, ideal, rtol=1e-5, atol=1e-5)
    assert_adapter_applies(base, out, ideal)
    printed = capsys.readouterr().out
    written = sum(f.stat().st_size for f in out.iterdir())
    assert f"{written:,} bytes" in printed and "model.layers.1.self_attn.q_proj" in printed


@pytest.mark.parametrize(
    "method, flags, options",
    [
        ("florist", ["--tau", "0.9"], {"tau": 0.9}),
        ("florist", ["--tau", "1", "--max-rank", "3"], {"tau": 1.0, "max_rank": 3}),
        ("fedit", [], {}),
        ("flexlora", ["--rank", "5"], {"ranks": [5, 5, 5]}),
    ],
    ids=["florist-tau0.9", "florist-max-rank", "fedit", "flexlora-rank5"],
)
def test_lossy_methods_write_their_own_result(base, clients, tmp_path, method, flags, options):
    out = tmp_path / "out"
    assert run("--method", method, *flags, "--weights", ",".join(map(str, WEIGHTS)), "--out", out, *clients) == 0
    expected = method_update(method, options, clients, WEIGHTS)
    assert not all(torch.allclose(expected[n], u) for n, u in ideal_update(clients, WEIGHTS).items())
    assert_adapter_applies(base, out, expected)


def test_ffa_writes_the_average_of_B_over_the_frozen_A(base, ffa_clients, tmp_path):
    out = tmp_path / "out"
    assert run("--method", "ffa", "--out", out, *ffa_clients) == 0
    assert_adapter_applies(base, out, method_update("ffa", {}, ffa_clients, [1.0, 1.0, 1.0]))


def test_flexlora_without_rank_keeps_a_common_client_rank(base, ffa_clients, tmp_path):
    same_rank = [ffa_clients[0], ffa_clients[0]]
    assert run("--method", "flexlora", "--allow-duplicates", "--out", tmp_path / "out", *same_rank) == 0
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    assert {layer.r["default"] for layer in lora_layers(loaded).values()} == {4}
    assert_adapter_applies(base, tmp_path / "out", ideal_update(same_rank, [1.0, 1.0]))


def corrupt_copy(path: Path, into: Path, edit_config=None, edit_tensors=None) -> Path:
    into.mkdir()
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (into / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, into / "adapter_model.safetensors")
    return into


def test_refuses_different_target_modules(base, clients, tmp_path, capsys):
    odd = tmp_path / "q_only"
    save_lora(base, odd, seed=40, r=4, lora_alpha=8, target_modules=["q_proj"])
    assert_refused(tmp_path, capsys, ["--method", "florist", *clients[:2], odd], [str(odd), str(clients[0]), "v_proj"])


def test_refuses_different_base_models(clients, tmp_path, capsys):
    odd = corrupt_copy(clients[1], tmp_path / "other_base", edit_config=lambda c: c.update(base_model_name_or_path="org/other"))
    assert_refused(tmp_path, capsys, ["--method", "flora", clients[0], odd], [str(odd), str(clients[0]), "org/other"])


def test_refuses_mismatched_shapes(clients, tmp_path, capsys):
    wide = tiny_llama(hidden=48)
    save_lora(wide, tmp_path / "wide", seed=41, r=4, lora_alpha=8)
    assert_refused(tmp_path, capsys, ["--method", "fedit", clients[0], tmp_path / "wide"], [str(tmp_path / "wide"), "48x48", "32x32"])


def test_refuses_nan(clients, tmp_path, capsys):
    key = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    odd = corrupt_copy(clients[2], tmp_path / "nan", edit_tensors=lambda t: t[key].view(-1)[3].fill_(math.nan))
    assert_refused(tmp_path, capsys, ["--method", "florist", clients[0], odd], [str(odd), "model.layers.1.self_attn.v_proj", "NaN"])


def test_refuses_a_non_lora_adapter(clients, tmp_path, capsys):
    odd = corrupt_copy(clients[0], tmp_path / "prefix", edit_config=lambda c: c.update(peft_type="PREFIX_TUNING"))
    assert_refused(tmp_path, capsys, ["--method", "florist", odd, clients[1]], [str(odd), "PREFIX_TUNING"])


def test_refuses_missing_files(clients, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path, capsys, ["--method", "florist", clients[0], tmp_path / "empty"], [str(tmp_path / "empty"), "adapter_config.json"])


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--weights", "3,-1,2"], ["--weights", "-1"]),
        (["--weights", "0,0,0"], ["--weights", "sum to 0"]),
        (["--weights", "1,2"], ["--weights", "2 values for 3 adapters"]),
        (["--weights", "1,two,3"], ["--weights", "'two'"]),
        (["--tau", "0"], ["tau", "0.0"]),
        (["--tau", "1.5"], ["tau", "1.5"]),
        (["--max-rank", "0"], ["max_rank", "0"]),
        (["--rank", "4"], ["--rank", "florist"]),
        (["--tau", "0.9", "--download-budget-mb", "1"], ["tau", "download_budget_mb", "not both"]),
        (["--min-rank", "2"], ["--min-rank", "--download-budget-mb"]),
        (["--download-budget-mb", "0"], ["download_budget_mb", "0.0"]),
    ],
    ids=["negative", "zero-sum", "count", "not-a-number", "tau-0", "tau-1.5", "max-rank-0", "rank-for-florist", "tau-and-budget", "min-rank-alone", "budget-0"],
)
def test_refuses_bad_options_before_reading(tmp_path, capsys, flags, named):
    # The adapter directories do not exist: the option must be refused before any is read.
    missing = [tmp_path / f"never_{k}" for k in range(3)]
    assert_refused(tmp_path, capsys, ["--method", "florist", *flags, *missing], named)


def test_flexlora_refuses_mixed_ranks_without_rank(clients, tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["--method", "flexlora", *clients], ["flexlora", "--rank", "[4, 8, 2]"])


def test_refuses_an_existing_out_dir(clients, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert run("--method", "flora", "--out", tmp_path / "out", *clients) != 0
    assert "already exists" in capsys.readouterr().err
    assert not any((tmp_path / "out").iterdir())
    assert run("--method", "flora", "--overwrite", "--out", tmp_path / "out", *clients) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def assert_refused(tmp_path: Path, capsys, argv: list, named: list[str]) -> None:
    out = tmp_path / "out"
    capsys.readouterr()
    assert run(*argv[:2], "--out", out, *argv[2:]) != 0
    error = capsys.readouterr().err
    assert error.startswith("florist: error: ") and error.count("\n") == 1, error
    for part in named:
        assert part in error, (part, error)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("criterion", ["normalized", "per-byte"])
def test_florist_with_a_download_budget_writes_at_most_that_many_bytes_of_factors(base, clients, tmp_path, capsys, criterion):
    modules = read_adapters(clients, WEIGHTS)[0].modules
    least = sum(sum(f.shape) * 4 for f in modules.values())  # rank 1 everywhere, fp32
    budget = 3 * least + 100
    out = tmp_path / "out"
    flags = ["--download-budget-mb", budget / 2**20, "--budget-criterion", criterion]
    assert run("--method", "florist", *flags, "--weights", ",".join(map(str, WEIGHTS)), "--out", out, *clients) == 0
    options = {"download_budget_mb": budget / 2**20, "budget_criterion": criterion}
    expected = make_aggregator("florist", **options).aggregate(read_adapters(clients, WEIGHTS)).modules
    tensors = load_file(out / "adapter_model.safetensors")
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    assert written == sum(sum(m.B.shape[0] + m.A.shape[1] for _ in range(m.rank)) * 4 for m in expected.values())
    assert least < written <= budget
    assert_adapter_applies(base, out, {name: m.delta().double() for name, m in expected.items()})
    assert "energy kept" in capsys.readouterr().out


def test_a_budget_without_a_criterion_uses_the_configuration_default():
    """`florist aggregate` and `florist run` spend a budget the same way unless told otherwise."""
    import argparse

    from florist.cli.aggregate import _aggregator
    from florist.config import AggregationConfig

    given = dict(tau=None, max_rank=None, rank=None, download_budget_mb=5.0, budget_criterion=None, min_rank=None, adapters=[])
    aggregator = _aggregator(argparse.Namespace(method="florist", **given))
    assert aggregator.budget_criterion == AggregationConfig().budget_criterion == "per-byte"


def test_florist_refuses_a_download_budget_below_the_minimum_ranks(clients, tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["--method", "florist", "--download-budget-mb", "0.0001", "--min-rank", "2", *clients], ["download budget", "below", "rank 2 in each of"])


# ---------------------------------------------------------------- an adapter given twice


def twin_of(path: Path, tmp_path: Path, how: str) -> Path:
    """`path` again, as a user might give it a second time."""
    if how == "same path":
        return path
    if how == "another spelling":
        return path.parent / ".." / path.parent.name / path.name
    if how == "symlink":
        (tmp_path / "link").symlink_to(path)
        return tmp_path / "link"
    if how == "copy":
        return Path(shutil.copytree(path, tmp_path / "copy"))
    # Re-saved: other file bytes (JSON layout, safetensors metadata), the same adapter.
    return corrupt_copy(path, tmp_path / "resaved")


@pytest.mark.parametrize("how", ["same path", "another spelling", "symlink", "copy", "re-saved"])
def test_an_adapter_given_twice_is_refused(clients, tmp_path, capsys, how):
    twin = twin_of(clients[0], tmp_path, how)
    assert_refused(tmp_path, capsys, ["--method", "flora", clients[0], clients[1], twin], [str(twin), str(clients[0]), "--allow-duplicates"])


def test_allow_duplicates_counts_a_repeated_adapter_twice(base, clients, tmp_path):
    out = tmp_path / "out"
    assert run("--method", "flora", "--allow-duplicates", "--out", out, clients[0], clients[1], clients[0]) == 0
    assert_adapter_applies(base, out, ideal_update([clients[0], clients[1]], [2.0, 1.0]))


def test_the_same_factors_at_another_alpha_are_not_a_duplicate(base, clients, tmp_path):
    other_alpha = corrupt_copy(clients[0], tmp_path / "alpha", edit_config=lambda c: c.update(lora_alpha=3 * c["lora_alpha"]))
    assert run("--method", "flora", "--out", tmp_path / "out", clients[0], other_alpha) == 0
    assert_adapter_applies(base, tmp_path / "out", ideal_update([clients[0], other_alpha], [1.0, 1.0]))


# ---------------------------------------------------------------- biases and modules_to_save


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_biases_and_modules_to_save_are_the_clients_weighted_mean(qwen, tmp_path, capsys, bias):
    """Against a dense reference: the base plus the exact LoRA update, every trained-in-full tensor
    set to the clients' weighted mean of the values peft's own modules hold."""
    paths, trained = [], []
    # The clients' biases and lm_head moved by amounts decades apart, as sites with more data and steps do.
    for k, (options, moved) in enumerate(zip(CLIENTS, [1e-3, 1.0, 30.0])):
        paths.append(tmp_path / f"client_{k}")
        model = save_trained_in_full(qwen, paths[-1], seed=50 + k, scale=moved, bias=bias, modules_to_save=["lm_head"], **options)
        trained.append(trained_in_full(model))
    out = tmp_path / "out"

    assert run("--method", "flora", "--weights", ",".join(map(str, WEIGHTS)), "--out", out, *paths) == 0

    reference = copy.deepcopy(qwen)
    total = sum(WEIGHTS)
    with torch.no_grad():
        for name, update in ideal_update(paths, WEIGHTS).items():
            reference.get_submodule(name).weight += update.float()
        for name in trained[0]:
            mean = sum(weight / total * values[name].double() for weight, values in zip(WEIGHTS, trained))
            reference.get_parameter(name.replace(".base_layer", "")).copy_(mean)
    loaded = PeftModel.from_pretrained(copy.deepcopy(qwen), out).eval()
    tokens = torch.arange(24).reshape(2, 12) * 5 % 128
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference(tokens).logits, rtol=1e-4, atol=1e-4)
    merged = loaded.merge_and_unload().state_dict()
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    assert "trained in full" in capsys.readouterr().out


def test_factors_only_refuses_tensors_trained_in_full_in_one_line(qwen, tmp_path, capsys):
    save_trained_in_full(qwen, tmp_path / "a", seed=60, r=4, lora_alpha=8, modules_to_save=["lm_head"])
    save_trained_in_full(qwen, tmp_path / "b", seed=61, r=4, lora_alpha=8, modules_to_save=["lm_head"])
    argv = ["--method", "florist", "--factors-only", tmp_path / "a", tmp_path / "b"]
    assert_refused(tmp_path, capsys, argv, [str(tmp_path / "a"), "lm_head.weight", "trained in full"])


def test_a_download_budget_counts_the_tensors_trained_in_full_the_adapter_file_holds(qwen, tmp_path):
    """Biases and an lm_head are written beside the factors: the tensors of the file stay within the
    budget, and it is spent to within one component."""
    paths = []
    for k, options in enumerate(CLIENTS[:2]):
        paths.append(tmp_path / f"client_{k}")
        save_trained_in_full(qwen, paths[-1], seed=70 + k, scale=1.0, bias="lora_only", modules_to_save=["lm_head"], **options)
    first = read_adapters(paths, [1.0, 1.0])[0]
    dense = sum(t.numel() * t.element_size() for t in first.dense.values())
    component = {name: sum(f.shape) * f.A.element_size() for name, f in first.modules.items()}
    budget = dense + 3 * sum(component.values())
    out = tmp_path / "out"
    assert run("--method", "florist", "--download-budget-mb", budget / 2**20, "--out", out, *paths) == 0
    written = sum(t.numel() * t.element_size() for t in load_file(out / "adapter_model.safetensors").values())
    assert budget - max(component.values()) < written <= budget
