"""The live peft bridge against peft's own layers, and the embedded SmolLM2 training through it."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from test_adapters import tiny_qwen2
from transformers import LlamaConfig, LlamaForCausalLM

from florist.aggregation import GlobalModule, lora_scale
from florist.data import encode, generate_embedded
from florist.lora.adapters import read_adapter
from florist.lora.model import (
    move_into_lora,
    attach_lora,
    detach_lora,
    freeze_shared_A,
    frozen_lora_A,
    load_dense,
    load_global,
    lora_layers,
    merge_into_base,
    read_dense,
    read_factors,
)
from florist.models import EMBEDDED_MODEL, load_model
from florist.data.tokenize import IGNORE_INDEX, pad_batch
from florist.training import response_loss, train_lora

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return LlamaForCausalLM(config).eval()


def randomise_B(model, seed: int) -> None:
    """peft starts B at zero; a trained-looking LoRA has both factors non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))


def global_adapter(model, rank: int, scale: float, seed: int, factors: str = "AB") -> dict[str, dict]:
    """What payload.take gives a client: {module: {"A"?, "B", "scale"}} in float32."""
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, layer in lora_layers(model).items():
        m, n = layer.get_base_layer().weight.shape
        module = {"A": torch.randn(rank, n, generator=generator), "B": torch.randn(m, rank, generator=generator), "scale": scale}
        adapter[name] = {key: value for key, value in module.items() if key in factors or key == "scale"}
    return adapter


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_read_factors_are_the_layers_factors_and_scale(base, use_rslora):
    model = attach_lora(copy.deepcopy(base), rank=4, alpha=12.0, target_modules=TARGETS, use_rslora=use_rslora)
    randomise_B(model, seed=1)
    factors = read_factors(model)
    layers = lora_layers(model)
    assert set(factors) == {f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS} == set(layers)
    for name, layer in layers.items():
        assert torch.equal(factors[name].A, layer.lora_A["default"].weight)
        assert torch.equal(factors[name].B, layer.lora_B["default"].weight)
        assert factors[name].scale == pytest.approx(lora_scale(12.0, 4, use_rslora))
        assert factors[name].A.data_ptr() != layer.lora_A["default"].weight.data_ptr()  # a copy, not a view


def test_merge_of_read_factors_reproduces_the_peft_model(base):
    model = attach_lora(copy.deepcopy(base), rank=4, alpha=8.0, target_modules=TARGETS)
    randomise_B(model, seed=2)
    merged = copy.deepcopy(base)
    merge_into_base(merged, read_factors(model))
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, merged(tokens).logits, atol=1e-5)
        assert not torch.allclose(base(tokens).logits, merged(tokens).logits, atol=1e-3)


def trained_qwen2(seed: int) -> tuple[torch.nn.Module, PeftModel]:
    """A tiny Qwen2 (biased q/k/v) and a PeftModel on a copy of it training biases and lm_head in full,
    with every trainable tensor moved from its start as training would."""
    base = tiny_qwen2()
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="all", modules_to_save=["lm_head"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    return base, model


def test_read_dense_is_what_peft_saves_and_read_adapter_reads(tmp_path):
    _, model = trained_qwen2(seed=20)
    dense = read_dense(model)
    model.save_pretrained(tmp_path / "saved")
    _, client = read_adapter(tmp_path / "saved")
    assert dense.keys() == client.dense.keys() and "lm_head.weight" in dense
    assert any(name.endswith("k_proj.bias") for name in dense) and any(name.endswith("q_proj.base_layer.bias") for name in dense)
    for name, tensor in dense.items():
        assert torch.equal(tensor, client.dense[name]), name
    head = model.get_base_model().lm_head.modules_to_save["default"].weight
    assert torch.equal(dense["lm_head.weight"], head) and dense["lm_head.weight"].data_ptr() != head.data_ptr()


def test_load_dense_into_a_plain_model_with_merged_factors_reproduces_the_peft_model():
    base, model = trained_qwen2(seed=21)
    merged = copy.deepcopy(base)
    merge_into_base(merged, read_factors(model))
    tokens = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Can fail: the factors alone leave the biases and lm_head at the base's values.
        assert not torch.allclose(model(tokens).logits, merged(tokens).logits, atol=1e-3)
        load_dense(merged, read_dense(model))
        torch.testing.assert_close(merged(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_load_dense_into_a_peft_model_sets_its_trained_copies():
    base, model = trained_qwen2(seed=22)
    _, fresh = trained_qwen2(seed=23)
    load_dense(fresh, read_dense(model))
    for name, tensor in read_dense(model).items():
        assert torch.equal(read_dense(fresh)[name], tensor), name
    # The frozen original behind modules_to_save keeps the base's value.
    assert torch.equal(fresh.get_base_model().lm_head.original_module.weight, base.lm_head.weight)


@pytest.mark.parametrize(
    "dense, named",
    [({"model.layers.0.mlp.nope.bias": torch.zeros(3)}, "no tensor model.layers.0.mlp.nope.bias"), ({"lm_head.weight": torch.zeros(3, 2)}, "(3, 2)")],
    ids=["unknown", "shape"],
)
def test_load_dense_names_what_does_not_fit(dense, named):
    _, model = trained_qwen2(seed=24)
    with pytest.raises(ValueError, match=re.escape(named)):
        load_dense(model, dense)


def test_merge_into_base_adds_scale_B_A_and_the_negative_sign_removes_it(base):
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(3)
    name = "model.layers.1.self_attn.v_proj"
    weight = model.get_submodule(name).weight
    before = weight.detach().clone()
    update = {name: GlobalModule(A=torch.randn(3, 32, generator=generator), B=torch.randn(16, 3, generator=generator), scale=0.25)}
    merge_into_base(model, update)
    assert torch.allclose(weight, before + 0.25 * update[name].B @ update[name].A, atol=1e-6)
    merge_into_base(model, update, sign=-1.0)
    assert torch.allclose(weight, before, atol=1e-6)
    for other, module in model.named_modules():
        if other != name and hasattr(module, "weight") and other:
            assert torch.equal(module.weight, base.get_submodule(other).weight), other


@pytest.mark.parametrize("global_rank", [2, 4, 7], ids=["smaller", "equal", "larger"])
def test_moving_an_update_into_the_lora_leaves_the_model_unchanged(base, global_rank):
    """A warm start: the LoRA starts from the update's leading components, the base loses exactly them."""
    rank, alpha, global_scale = 4, 12.0, 0.5
    model = attach_lora(copy.deepcopy(base), rank=rank, alpha=alpha, target_modules=TARGETS)
    adapter = global_adapter(model, global_rank, global_scale, seed=8)
    update = {name: GlobalModule(A=m["A"], B=m["B"], scale=m["scale"]) for name, m in adapter.items()}
    kept = {name: GlobalModule(A=m.A[:rank], B=m.B[:, :rank], scale=m.scale) for name, m in update.items()}
    move_into_lora(model, kept)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, base(tokens).logits, atol=1e-5)
    for name, factors in read_factors(model).items():
        kept_rank = min(rank, global_rank)
        assert factors.B[:, :kept_rank].abs().min() > 0  # not B = 0: training starts from the update
        # Past the update's rank, peft's fresh init: B = 0 and a random A, so those components still train.
        assert not factors.B[:, kept_rank:].any() and (factors.A[kept_rank:] != 0).all()
        # What the LoRA holds is the update's leading components, and the base lost exactly that.
        assert torch.allclose(factors.scale * factors.B @ factors.A, kept[name].delta(), atol=1e-5)
        weight = model.get_submodule(f"base_model.model.{name}").get_base_layer().weight
        assert torch.allclose(weight, base.get_submodule(name).weight - kept[name].delta(), atol=1e-5)


def test_a_start_with_more_components_than_the_lora_is_refused(base):
    """The start is cut to the LoRA's rank before it is moved in (start_of), as the server cuts it: a
    larger one is a caller's mistake, not silently cut a second way."""
    model = attach_lora(copy.deepcopy(base), rank=4, alpha=12.0, target_modules=TARGETS)
    update = {name: GlobalModule(A=m["A"], B=m["B"], scale=m["scale"]) for name, m in global_adapter(model, 7, 0.5, seed=8).items()}
    with pytest.raises(ValueError, match=r"module .*: the start has 7 components, more than the LoRA's rank 4"):
        move_into_lora(model, update)


@pytest.mark.parametrize("global_rank", [2, 4, 7], ids=["smaller", "equal", "larger"])
def test_load_global_takes_the_first_components_at_the_clients_scale(base, global_rank):
    rank, alpha, global_scale = 4, 12.0, 0.5
    model = attach_lora(copy.deepcopy(base), rank=rank, alpha=alpha, target_modules=TARGETS)
    randomise_B(model, seed=4)  # stale values the load must overwrite, padding included
    adapter = global_adapter(model, global_rank, global_scale, seed=5)
    load_global(model, adapter)
    kept = min(rank, global_rank)
    for name, factors in read_factors(model).items():
        source = adapter[name]
        assert factors.rank == rank and factors.scale == pytest.approx(alpha / rank)
        assert torch.equal(factors.A[:kept], source["A"][:kept]) and not factors.A[kept:].any()
        ratio = global_scale / (alpha / rank)
        assert torch.allclose(factors.B[:, :kept], source["B"][:, :kept] * ratio) and not factors.B[:, kept:].any()
        # The client's update is the global update's first `kept` components, exactly when nothing is cut.
        truncated = global_scale * source["B"][:, :kept] @ source["A"][:kept]
        assert torch.allclose(factors.scale * factors.B @ factors.A, truncated, atol=1e-5)


def test_load_global_without_A_keeps_the_clients_A(base):
    model = attach_lora(copy.deepcopy(base), rank=4, alpha=8.0, target_modules=TARGETS)
    before = read_factors(model)
    adapter = global_adapter(model, 6, 1.0, seed=6, factors="B")
    load_global(model, adapter)
    for name, factors in read_factors(model).items():
        assert torch.equal(factors.A, before[name].A)
        assert torch.allclose(factors.B, adapter[name]["B"][:, :4] * 1.0 / 2.0)


def test_load_global_names_a_missing_module(base):
    model = attach_lora(copy.deepcopy(base), rank=2, alpha=4.0, target_modules=TARGETS)
    adapter = global_adapter(model, 2, 1.0, seed=7)
    del adapter["model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        load_global(model, adapter)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.up_proj"]),
    low=st.integers(1, 8),
    extra=st.integers(0, 8),
    in_features=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_frozen_lora_A_of_a_lower_rank_is_a_prefix_of_a_higher_ones(name, low, extra, in_features, seed):
    small = frozen_lora_A(name, low, in_features, seed)
    large = frozen_lora_A(name, low + extra, in_features, seed)
    assert small.shape == (low, in_features) and large.shape == (low + extra, in_features)
    assert torch.equal(small, large[:low])
    assert small.abs().max() <= 1 / math.sqrt(in_features)


def test_frozen_lora_A_differs_by_module_and_seed():
    a = frozen_lora_A("model.layers.0.self_attn.q_proj", 4, 32, seed=1)
    assert torch.equal(a, frozen_lora_A("model.layers.0.self_attn.q_proj", 4, 32, seed=1))
    assert not torch.equal(a, frozen_lora_A("model.layers.0.self_attn.v_proj", 4, 32, seed=1))
    assert not torch.equal(a, frozen_lora_A("model.layers.0.self_attn.q_proj", 4, 32, seed=2))


def test_freeze_shared_A_sets_the_seeded_draw_and_stops_its_gradient(base):
    model = attach_lora(copy.deepcopy(base), rank=4, alpha=8.0, target_modules=TARGETS)
    freeze_shared_A(model, seed=9)
    for name, layer in lora_layers(model).items():
        a = layer.lora_A["default"].weight
        assert torch.equal(a, frozen_lora_A(name, 4, a.shape[1], 9))
        assert not a.requires_grad and layer.lora_B["default"].weight.requires_grad


def test_embedded_smollm2_trains_a_lora_step():
    model, tokenizer = load_model(EMBEDDED_MODEL)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    model = attach_lora(model, rank=2, alpha=4.0, target_modules=TARGETS)
    features = [encode(tokenizer, example, "chatml", 64) for example in generate_embedded(1, 0, split="train")[:2]]
    result = train_lora(
        model, features, steps=1, batch_size=2, learning_rate=1e-3, weight_decay=0.0,
        grad_clip=1.0, seed=0, pad_token_id=tokenizer.pad_token_id, autocast=False, gradient_checkpointing=False,
    )
    assert result.steps == 1 and math.isfinite(result.loss) and result.tokens > 0
    factors = read_factors(model)
    assert len(factors) == 2 * model.config.num_hidden_layers
    assert all(f.B.abs().max() > 0 for f in factors.values())  # B starts at zero; one step moves it


def test_detach_lora_gives_back_the_plain_model_for_the_next_client(base):
    model = copy.deepcopy(base)
    modules = {name: type(module) for name, module in model.named_modules()}
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inputs = torch.arange(12).view(2, 6)
    expected = model(input_ids=inputs).logits

    wrapped = attach_lora(model, rank=4, alpha=8.0, target_modules=TARGETS)
    randomise_B(wrapped, seed=1)
    assert not torch.allclose(wrapped(input_ids=inputs).logits, expected)
    detach_lora(model)
    assert {name: type(module) for name, module in model.named_modules()} == modules
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert torch.equal(model(input_ids=inputs).logits, expected) and not hasattr(model, "peft_config")

    # The next client's LoRA on the same model is the one it would get on a fresh copy.
    torch.manual_seed(3)
    again = attach_lora(model, rank=2, alpha=4.0, target_modules=TARGETS)
    torch.manual_seed(3)
    fresh = attach_lora(copy.deepcopy(base), rank=2, alpha=4.0, target_modules=TARGETS)
    for name, factors in read_factors(again).items():
        assert torch.equal(factors.A, read_factors(fresh)[name].A) and factors.rank == 2


def test_response_loss_is_the_models_own_loss_with_the_same_gradients(base):
    # Prompts of 3 to 12 tokens, responses of 1 to 4: most positions are unlabelled, as in real data.
    features = []
    for k in range(6):
        prompt, response = list(range(3 + 2 * k % 10)), [20 + k] * (1 + k % 4)
        features.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    inputs = pad_batch(features, pad_token_id=0)
    losses, gradients = [], []
    for loss_of in (lambda model: model(**inputs).loss, lambda model: response_loss(model, **inputs)):
        torch.manual_seed(0)
        model = attach_lora(copy.deepcopy(base), rank=4, alpha=8.0, target_modules=TARGETS)
        randomise_B(model, seed=2)
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.item())
        gradients.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for got, expected in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
