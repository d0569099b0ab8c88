"""PEFT LoRA directories <-> engine tensors, checked against peft's own layers."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from florist.aggregation import GlobalModule
from florist.lora.adapters import adapter_bytes, read_adapter, read_adapters, write_adapter

PREFIX = "base_model.model."


def tiny_llama(layers: int = 2, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {name.removeprefix(PREFIX): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def save_lora(base: LlamaForCausalLM, path: Path, seed: int, **lora_options) -> PeftModel:
    """A trained-looking LoRA: peft's config and init, then B (zero at init) drawn from `seed`."""
    options = {"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0} | lora_options
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            B = layer.lora_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=generator))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def adapter(base, tmp_path) -> Path:
    save_lora(base, tmp_path / "adapter", seed=1, r=4, lora_alpha=8)
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    "options",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 8, "lora_alpha": 16, "use_rslora": True},
        {"r": 2, "lora_alpha": 4, "rank_pattern": {"model.layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"q_proj": 3}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_read_adapter_matches_peft_layers(base, tmp_path, options):
    model = save_lora(base, tmp_path / "a", seed=2, **options)
    config, client = read_adapter(tmp_path / "a", weight=7.0)
    layers = lora_layers(model)
    assert config["r"] == options["r"] and client.weight == 7.0
    assert set(client.modules) == set(layers)
    for name, layer in layers.items():
        factors = client.modules[name]
        assert factors.rank == layer.r["default"]
        assert factors.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        torch.testing.assert_close(factors.scale * factors.B @ factors.A, layer.get_delta_weight("default"), rtol=1e-6, atol=1e-6)


def global_module(m: int, n: int, rank: int, scale: float, generator: torch.Generator) -> GlobalModule:
    return GlobalModule(A=torch.randn(rank, n, generator=generator), B=torch.randn(m, rank, generator=generator), scale=scale)


def test_write_adapter_gives_each_module_its_own_rank_and_scale(tmp_path):
    # Twelve layers, so layer 1's pattern could also match layer 11's if it were not anchored.
    base = tiny_llama(layers=12, hidden=16)
    template = save_lora(base, tmp_path / "template", seed=3, r=4, lora_alpha=8)
    generator = torch.Generator().manual_seed(4)
    modules = {
        name: global_module(*layer.get_base_layer().weight.shape, rank=1 + i % 7, scale=0.5 + i / 10, generator=generator)
        for i, (name, layer) in enumerate(sorted(lora_layers(template).items()))
    }
    config, _ = read_adapter(tmp_path / "template")

    written = write_adapter(tmp_path / "out", modules, config)

    assert written == adapter_bytes(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "template"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    for name, layer in lora_layers(loaded).items():
        assert layer.r["default"] == modules[name].rank, name
        torch.testing.assert_close(layer.get_delta_weight("default"), modules[name].delta(), rtol=1e-5, atol=1e-6)
    _, reread = read_adapter(tmp_path / "out")
    for name, module in modules.items():
        torch.testing.assert_close(reread.modules[name].scale * reread.modules[name].B @ reread.modules[name].A, module.delta())


def test_write_adapter_refuses_an_existing_directory_unless_told(tmp_path, adapter):
    config, client = read_adapter(adapter)
    modules = {name: GlobalModule(A=f.A, B=f.B, scale=f.scale) for name, f in client.modules.items()}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous run")

    with pytest.raises(ValueError, match="out already exists"):
        write_adapter(tmp_path / "out", modules, config)
    assert (tmp_path / "out" / "old.txt").exists()

    write_adapter(tmp_path / "out", modules, config, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


def test_write_adapter_leaves_nothing_when_it_fails(tmp_path, adapter):
    config, client = read_adapter(adapter)
    modules = {name: GlobalModule(A=f.A, B=f.B, scale=f.scale) for name, f in client.modules.items()}
    unserialisable = config | {"base_model_name_or_path": object()}

    with pytest.raises(TypeError):
        write_adapter(tmp_path / "out", modules, unserialisable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# Each corruption of a valid adapter directory, and what the one-line error must name.
def _edit_config(path: Path, **changes) -> None:
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | changes))


def _edit_tensors(path: Path, edit) -> None:
    weights_file = path / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    edit(tensors)
    save_file(tensors, weights_file)


Q0 = "model.layers.0.self_attn.q_proj"
KEY_A, KEY_B = f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{Q0}.lora_B.weight"

CORRUPTIONS = {
    "missing directory": (lambda p: p.rename(p.with_name("gone")), ["no such adapter directory"]),
    "missing config": (lambda p: (p / "adapter_config.json").unlink(), ["adapter_config.json"]),
    "pickled weights only": (
        lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
        ["adapter_model.safetensors", "adapter_model.bin"],
    ),
    "invalid json": (lambda p: (p / "adapter_config.json").write_text("{r: 4"), ["adapter_config.json", "invalid JSON"]),
    "not lora": (lambda p: _edit_config(p, peft_type="PREFIX_TUNING"), ["adapter_config.json", "PREFIX_TUNING"]),
    "no alpha": (lambda p: _edit_config(p, lora_alpha=None), ["lora_alpha"]),
    "lora_A without lora_B": (lambda p: _edit_tensors(p, lambda t: t.pop(KEY_B)), [Q0, "no lora_B"]),
    "lora_B without lora_A": (lambda p: _edit_tensors(p, lambda t: t.pop(KEY_A)), [Q0, "no lora_A"]),
    "A and B ranks differ": (lambda p: _edit_tensors(p, lambda t: t.update({KEY_A: t[KEY_A][:3]})), [Q0, "(3, 32)", "(32, 4)"]),
    "rank differs from config": (lambda p: _edit_config(p, r=5), [Q0, "rank 4", "says 5"]),
    "nan": (lambda p: _edit_tensors(p, lambda t: t[KEY_B].view(-1)[7].fill_(math.nan)), [Q0, "lora_B", "NaN"]),
    "inf": (lambda p: _edit_tensors(p, lambda t: t[KEY_A].view(-1)[0].fill_(math.inf)), [Q0, "lora_A", "Inf"]),
    "dora tensor": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{PREFIX}{Q0}.lora_magnitude_vector": torch.ones(32)})),
        [Q0, "DoRA"],
    ),
    "modules_to_save tensor": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{PREFIX}lm_head.modules_to_save.weight": torch.ones(128, 32)})),
        ["lm_head", "modules_to_save"],
    ),
}


@pytest.mark.parametrize("corrupt, named", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_read_adapter_refuses_bad_input_in_one_line(adapter, corrupt, named):
    corrupt(adapter)
    with pytest.raises(ValueError) as error:
        read_adapter(adapter)
    message = str(error.value)
    assert "\n" not in message and str(adapter) in message
    for part in named:
        assert part in message


def test_read_adapter_refuses_dora(base, tmp_path):
    save_lora(base, tmp_path / "a", seed=5, r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(ValueError, match="DoRA") as error:
        read_adapter(tmp_path / "a")
    assert str(tmp_path / "a") in str(error.value)


# ---------------------------------------------------------------- tensors trained in full

# Qwen2's q, k and v projections have biases, as in the real model; lm_head is not tied to the embeddings.
TINY_QWEN2 = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
}


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2)).eval()


def save_trained_in_full(base, path: Path, seed: int, scale: float = 1.0, **lora_options) -> PeftModel:
    """`save_lora`, with every tensor peft trains in full (biases, modules_to_save) moved from the base's
    value by `scale` times a seeded draw, as training would move it."""
    model = save_lora(base, path, seed=seed, **lora_options)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and ".lora_" not in name:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path)
    return model


def trained_in_full(model: PeftModel) -> dict[str, torch.Tensor]:
    """What the model trains in full, by its path in the base model, read straight off peft's modules."""
    tensors = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".lora_" not in name:
            tensors[name.removeprefix(PREFIX).replace(".modules_to_save.default", "")] = parameter.detach().clone()
    return tensors


@pytest.fixture(scope="module")
def qwen() -> Qwen2ForCausalLM:
    return tiny_qwen2()


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"bias": "lora_only"}, {f"model.layers.{i}.self_attn.{m}_proj.base_layer.bias" for i in (0, 1) for m in "qv"}),
        ({"bias": "all"}, {f"model.layers.{i}.self_attn.{m}_proj{'' if m == 'k' else '.base_layer'}.bias" for i in (0, 1) for m in "qkv"}),
        ({"modules_to_save": ["lm_head"]}, {"lm_head.weight"}),
        ({"bias": "lora_only", "modules_to_save": ["lm_head", "embed_tokens"]},
         {f"model.layers.{i}.self_attn.{m}_proj.base_layer.bias" for i in (0, 1) for m in "qv"} | {"lm_head.weight", "model.embed_tokens.weight"}),
    ],
    ids=["bias-lora_only", "bias-all", "modules_to_save", "both"],
)
def test_read_adapter_reads_what_peft_trained_in_full(qwen, tmp_path, options, expected):
    model = save_trained_in_full(qwen, tmp_path / "a", seed=6, r=4, lora_alpha=8, **options)
    config, client = read_adapter(tmp_path / "a")
    assert set(client.dense) == expected
    trained = trained_in_full(model)
    assert set(trained) == expected
    for name, tensor in client.dense.items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)
        assert not torch.equal(tensor, qwen.get_parameter(name.replace(".base_layer", ""))), "the trained value, not the base's"
    assert set(client.modules) == set(lora_layers(model))


@pytest.mark.parametrize("options", [{"bias": "lora_only"}, {"modules_to_save": ["lm_head"]}], ids=["bias", "modules_to_save"])
def test_factors_only_refuses_tensors_trained_in_full(qwen, tmp_path, options):
    save_trained_in_full(qwen, tmp_path / "a", seed=7, r=4, lora_alpha=8, **options)
    with pytest.raises(ValueError) as error:
        read_adapter(tmp_path / "a", factors_only=True)
    message = str(error.value)
    assert str(tmp_path / "a") in message and "trained in full" in message and "\n" not in message
    assert ("bias" if "bias" in options else "lm_head") in message


def test_a_bias_tensor_the_config_does_not_declare_is_refused(qwen, tmp_path):
    save_trained_in_full(qwen, tmp_path / "a", seed=8, r=4, lora_alpha=8, bias="lora_only")
    _edit_config(tmp_path / "a", bias="none")
    with pytest.raises(ValueError, match="base_layer.bias is neither a LoRA factor") as error:
        read_adapter(tmp_path / "a")
    assert "bias, modules_to_save" in str(error.value)


def test_read_adapters_refuses_adapters_that_train_different_tensors_in_full(qwen, tmp_path):
    save_trained_in_full(qwen, tmp_path / "a", seed=9, r=4, lora_alpha=8, modules_to_save=["lm_head"])
    save_trained_in_full(qwen, tmp_path / "b", seed=10, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="trains lm_head.weight in full") as error:
        read_adapters([tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a") in str(error.value) and str(tmp_path / "b") in str(error.value)


def test_write_adapter_writes_tensors_trained_in_full_that_peft_loads(qwen, tmp_path):
    save_trained_in_full(qwen, tmp_path / "a", seed=11, r=4, lora_alpha=8, bias="all", modules_to_save=["lm_head"])
    config, client = read_adapter(tmp_path / "a")
    modules = {name: GlobalModule(A=f.A, B=f.B, scale=f.scale) for name, f in client.modules.items()}
    generator = torch.Generator().manual_seed(12)
    dense = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in client.dense.items()}

    write_adapter(tmp_path / "out", modules, config, dense=dense)

    loaded = PeftModel.from_pretrained(copy.deepcopy(qwen), tmp_path / "out")
    for name, tensor in dense.items():
        path, _, parameter = name.rpartition(".")
        module = loaded.get_base_model().get_submodule(path)
        live = getattr(module.modules_to_save["default"] if hasattr(module, "modules_to_save") else module, parameter)
        torch.testing.assert_close(live, tensor, rtol=0, atol=0)
    assert read_adapter(tmp_path / "out")[1].dense.keys() == dense.keys()


def test_write_adapter_refuses_dense_tensors_the_config_does_not_declare(adapter, tmp_path):
    config, client = read_adapter(adapter)
    modules = {name: GlobalModule(A=f.A, B=f.B, scale=f.scale) for name, f in client.modules.items()}
    with pytest.raises(ValueError, match="lm_head.weight is trained in full but"):
        write_adapter(tmp_path / "out", modules, config, dense={"lm_head.weight": torch.zeros(128, 32)})
    assert not (tmp_path / "out").exists()


def test_a_nan_in_a_tensor_trained_in_full_is_refused(qwen, tmp_path):
    save_trained_in_full(qwen, tmp_path / "a", seed=13, r=4, lora_alpha=8, modules_to_save=["lm_head"])
    _edit_tensors(tmp_path / "a", lambda t: t[f"{PREFIX}lm_head.weight"].view(-1)[5].fill_(math.nan))
    with pytest.raises(ValueError, match="lm_head.weight holds NaN") as error:
        read_adapter(tmp_path / "a")
    assert str(tmp_path / "a") in str(error.value)


def test_read_adapters_refuses_different_base_models(base, tmp_path):
    save_lora(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    save_lora(base, tmp_path / "b", seed=2, r=4, lora_alpha=8)
    _edit_config(tmp_path / "b", base_model_name_or_path="other/model")
    with pytest.raises(ValueError, match="other/model") as error:
        read_adapters([tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a") in str(error.value) and str(tmp_path / "b") in str(error.value)


def test_read_adapters_refuses_different_target_modules(base, tmp_path):
    save_lora(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    save_lora(base, tmp_path / "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="model.layers.0.self_attn.v_proj") as error:
        read_adapters([tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a") in str(error.value) and str(tmp_path / "b") in str(error.value)


def test_read_adapters_refuses_different_shapes(base, tmp_path):
    save_lora(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    save_lora(tiny_llama(hidden=48), tmp_path / "b", seed=2, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="48x48") as error:
        read_adapters([tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a") in str(error.value) and str(tmp_path / "b") in str(error.value)


def test_read_adapters_sets_weights_and_refuses_a_wrong_count(base, tmp_path):
    save_lora(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    save_lora(base, tmp_path / "b", seed=2, r=8, lora_alpha=8)
    clients = read_adapters([tmp_path / "a", tmp_path / "b"], weights=[3.0, 5.0])
    assert [c.weight for c in clients] == [3.0, 5.0]
    assert [next(iter(c.modules.values())).rank for c in clients] == [4, 8]
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        read_adapters([tmp_path / "a", tmp_path / "b"], weights=[1.0, 2.0, 3.0])
