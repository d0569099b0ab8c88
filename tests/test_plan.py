"""The memory plan (florist plan), gradient checkpointing, and the node's memory-gib refusal."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config

from florist.aggregation import LoraFactors, make_aggregator
from florist.cli import main
from florist.config import load_config
from florist.data import encode, generate_embedded
from florist.federation import payload
from florist.federation.node_config import Refused
from florist.federation.node_policy import NodePolicy
from florist.lora.model import attach_lora, lora_layers, weightless_model
from florist.models import load_model
from florist.planning import GIB, ModelShape, SiteTraining, site_memory, weight_bytes
from florist.planning.memory import layer_activation_bytes
from florist.planning.plan import plan_run
from florist.training import response_loss, train_lora

LLAMA_2_7B = Path(__file__).parent / "fixtures" / "llama-2-7b"
"""Llama-2-7B's config.json as published with its weights: the sizes, no weights."""
QV = ("q_proj", "v_proj")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CLIP = torch.nn.utils.clip_grad_norm_


# -- gradient checkpointing --------------------------------------------------------------------------


def _train_observed(model, features, tokenizer, monkeypatch, checkpointing: bool) -> tuple[float, list[torch.Tensor], int]:
    """One step of train_lora: its loss, the gradients it clipped, and how often layer 0 ran forward."""
    gradients: list[torch.Tensor] = []

    def recording_clip(params, max_norm):
        gradients.extend(p.grad.detach().clone() for p in params)
        return CLIP(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    calls = []
    # On the attention block: the layer's own hooks stay outside the checkpoint, and the backward
    # pass's recomputation stops once it has what it needs (before the MLP's hooks would run).
    hook = model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    result = train_lora(
        model, features, steps=1, batch_size=4, learning_rate=1e-3, weight_decay=0.0, grad_clip=1.0, seed=0,
        pad_token_id=tokenizer.pad_token_id, autocast=False, gradient_checkpointing=checkpointing,
    )
    hook.remove()
    return result.loss, gradients, len(calls)


def test_gradient_checkpointing_recomputes_each_layer_for_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    base, tokenizer = load_model(str(tiny_model_dir))
    features = [encode(tokenizer, example, "chatml", 48) for example in generate_embedded(1, 0, split="train")[:4]]
    torch.manual_seed(0)
    plain = attach_lora(copy.deepcopy(base), rank=4, alpha=8.0, target_modules=ALL_PROJECTIONS)
    with torch.no_grad():  # B away from zero, so that A has a gradient too
        for layer in lora_layers(plain).values():
            layer.lora_B["default"].weight.normal_(std=0.1)
    checkpointed = copy.deepcopy(plain)

    loss, gradients, forwards = _train_observed(plain, features, tokenizer, monkeypatch, checkpointing=False)
    loss_ckpt, gradients_ckpt, forwards_ckpt = _train_observed(checkpointed, features, tokenizer, monkeypatch, checkpointing=True)

    assert (forwards, forwards_ckpt) == (1, 2)  # checkpointed: layer 0 ran again in the backward pass
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert len(gradients) == len(gradients_ckpt) == 2 * 2 * len(ALL_PROJECTIONS)  # A and B, 2 layers
    assert all(g.abs().max() > 0 for g in gradients)
    for g, g_ckpt in zip(gradients, gradients_ckpt, strict=True):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)
    # The model goes back to the workspace as it came: no checkpointing, no hook on its embeddings.
    inner = checkpointed.get_base_model()
    assert not inner.is_activation_checkpointing and not getattr(inner, "_require_grads_hooks", [])


# -- sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True),
        Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, vocab_size=700, tie_word_embeddings=False),
    ],
)
def test_the_shape_counts_the_models_parameters_and_adapted_modules(config):
    shape = ModelShape.from_config(config)
    model = weightless_model(config)
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))  # Qwen2's q, k, v
    assert shape.parameters == sum(p.numel() for p in model.parameters()) - biases
    linear = {name: (module.out_features, module.in_features) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name}
    assert shape.module_paths(ALL_PROJECTIONS) == linear


def test_a_target_the_plan_cannot_size_is_refused_naming_it():
    shape = ModelShape.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="^model.target_modules entry 'c_attn': the memory plan knows the decoder projections q_proj"):
        shape.adapted(["q_proj", "c_attn"])


def test_llama_2_7b_weights_match_the_published_sizes():
    """Llama-2-7B: 6,738,415,616 parameters; 13.5 GB in fp16 (its published checkpoint), about
    7 GB in int8 and 3.9 GB in nf4 (bitsandbytes' 4-bit, as quoted for QLoRA)."""
    shape = ModelShape.from_config(AutoConfig.from_pretrained(LLAMA_2_7B))
    assert shape.parameters == 6_738_415_616
    assert shape.parameters * 2 == pytest.approx(13.5e9, rel=0.01)
    assert weight_bytes(shape, "none", 4) == pytest.approx(27e9, rel=0.01)  # florist loads float32
    assert weight_bytes(shape, "int8", 2) == pytest.approx(7.0e9, rel=0.05)
    assert weight_bytes(shape, "nf4", 2) == pytest.approx(3.9e9, rel=0.08)


# -- activations: the count against what autograd saves ----------------------------------------------


def _saved_bytes(config: LlamaConfig, targets, batch: int, length: int) -> int:
    """Bytes of every tensor autograd saves in one forward pass of response_loss (each storage once, parameters aside)."""
    torch.manual_seed(0)
    model = attach_lora(LlamaForCausalLM(config), 4, 8.0, targets)
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch, length))
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        response_loss(model, ids, torch.ones_like(ids), ids)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


@pytest.mark.parametrize("targets", [QV, ALL_PROJECTIONS])
@pytest.mark.parametrize("sizes", [dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2), dict(hidden_size=96, intermediate_size=80, num_attention_heads=6, num_key_value_heads=6)])
def test_a_layers_activations_are_what_autograd_saves_in_float32(targets, sizes):
    def config(layers: int) -> LlamaConfig:
        return LlamaConfig(num_hidden_layers=layers, vocab_size=300, tie_word_embeddings=True, **sizes)

    batch, length = 2, 24
    per_layer = _saved_bytes(config(3), targets, batch, length) - _saved_bytes(config(2), targets, batch, length)
    assert per_layer == layer_activation_bytes(ModelShape.from_config(config(2)), 4, targets, 4, 4) * batch * length


def test_checkpointing_and_quantisation_lower_the_planned_peak():
    shape = ModelShape.from_config(AutoConfig.from_pretrained(LLAMA_2_7B))

    def peak(**changes) -> int:
        settings = dict(rank=16, target_modules=QV, trained_in_full=0, batch_size=4, max_length=512, quantization="none", autocast=True, gradient_checkpointing=False)
        return site_memory(shape, SiteTraining(**(settings | changes))).peak

    assert peak(gradient_checkpointing=True) < peak() and peak(quantization="int8") < peak() and peak(quantization="nf4") < peak(quantization="int8")
    # QLoRA's setting (nf4, bf16, checkpointing) of a 7B at rank 16 fits a 24 GB GPU; float32 weights do not.
    assert peak(quantization="nf4", gradient_checkpointing=True) < 12 * GIB < 24 * GIB < peak()


# -- a run's plan ---------------------------------------------------------------------------------------


@pytest.fixture
def tiny_config(tiny_model_dir):
    return load_config(None, [f'model.name="{tiny_model_dir}"', "federation.ranks=[2, 4]", "federation.num_clients=2", "wire.upload=\"int8\""])


def test_a_sites_upload_is_the_bytes_its_reply_carries(tiny_config):
    plan = plan_run(tiny_config, device=torch.device("cpu"))
    shape = plan.shape
    for site in plan.sites:
        factors = {
            name: LoraFactors(A=torch.randn(site.rank, n), B=torch.randn(m, site.rank), scale=2.0)
            for name, (m, n) in shape.module_paths(QV).items()
        }
        reply = RecordDict()
        arrays = payload.put(reply, "adapter", factors, "int8")
        assert site.upload_bytes == arrays + reply["adapter:scales"].count_bytes()  # the factors and their scales
    assert [site.rank for site in plan.sites] == [2, 4]
    assert plan.sites[0].memory.peak < plan.sites[1].memory.peak


def secure_config(tiny_model_dir, *extra: str):
    return load_config(
        None,
        [f'model.name="{tiny_model_dir}"', 'aggregation.method="florist-secure"', "federation.ranks=[2, 4]", "federation.num_clients=2", *extra],
    )


@pytest.mark.parametrize("extra", [[], ["aggregation.sketch_width=3"], ["aggregation.sketch_upload=2"]])
def test_a_secure_sites_planned_upload_is_the_bytes_its_widest_and_its_first_sketches_carry(tiny_model_dir, extra, server_task):
    """Round 1's sketches and the widest any round sends (the widths of a kept rank min(m, n)), as
    the site's own upload code counts them."""
    from florist.federation.secure import SecureRounds
    from florist.federation.sketch_round import SketchRound, put_upload, site_upload

    config = secure_config(tiny_model_dir, *extra)
    plan = plan_run(config, device=torch.device("cpu"))
    modules = plan.shape.module_paths(QV)
    factors = {name: LoraFactors(A=torch.randn(4, n), B=torch.randn(m, 4), scale=2.0) for name, (m, n) in modules.items()}
    rounds = SecureRounds(config, make_aggregator("florist-secure"), modules)

    def sent(widths: dict[str, int]) -> int:
        sketch = SketchRound.of(5, widths, 2, 0.0, math.inf, config.federation.rounds)
        upload, _ = site_upload(config, sketch, factors, 10)
        return put_upload(RecordDict(), upload)

    assert plan.first_sketch_bytes == sent(rounds.widths())
    rounds.kept_ranks = {name: min(shape) for name, shape in modules.items()}
    assert {site.upload_bytes for site in plan.sites} == {sent(rounds.widths())}
    assert plan.first_sketch_bytes <= plan.sites[0].upload_bytes


def test_a_private_plan_gives_the_runs_noise_its_epsilon_and_round_ones_noise_to_signal(tiny_model_dir):
    from florist.aggregation.sketch import sketch_entries
    from florist.federation.secure import round_widths, upload_caps
    from florist.privacy import noise_for_epsilon

    config = secure_config(tiny_model_dir, "privacy.dp=true", "privacy.clip_norm=1", "privacy.target_epsilon=4", "federation.rounds=3")
    privacy = plan_run(config, device=torch.device("cpu")).privacy
    modules = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model_dir)).module_paths(QV)
    values = sketch_entries(modules, round_widths(modules, config, None, upload_caps(modules, config)))
    sigma = noise_for_epsilon(4, 1e-5, 3, 1.0)
    assert (privacy.noise_multiplier, privacy.sites, privacy.sketch_values) == (pytest.approx(sigma), 2, values)
    assert privacy.epsilon == pytest.approx(4, rel=1e-3) and privacy.noise_to_signal == pytest.approx(sigma * math.sqrt(values) / 2)
    assert privacy.sites_for_ratio_one >= privacy.sites * privacy.noise_to_signal > privacy.sites_for_ratio_one - 1
    assert plan_run(secure_config(tiny_model_dir), device=torch.device("cpu")).privacy is None


def test_florist_plan_prints_every_site_and_the_server(tiny_model_dir, capsys):
    assert main(["plan", "--set", f'model.name="{tiny_model_dir}"', "--set", "federation.ranks=[4]", "--set", "training.gradient_checkpointing=true"]) == 0
    printed = capsys.readouterr().out
    assert "Per site" in printed and "Server: aggregation by florist" in printed
    assert sum(line.startswith("│ ") and "MiB" in line for line in printed.splitlines()) == 8 + 1  # 8 sites, the server


def test_florist_plan_of_a_private_secure_run_prints_its_sketches_and_its_privacy(tiny_model_dir, capsys):
    settings = [f'model.name="{tiny_model_dir}"', 'aggregation.method="florist-secure"', "privacy.dp=true", "privacy.clip_norm=1", "privacy.noise_multiplier=1"]
    assert main(["plan", *(item for setting in settings for item in ("--set", setting))]) == 0
    printed = capsys.readouterr().out
    assert "florist-secure: every site sends" in printed and "at most" in printed
    assert "Client-level DP (privacy.dp)" in printed and "noise / signal" in printed


def test_florist_plan_refuses_a_bad_key_in_one_line(capsys):
    assert main(["plan", "--set", "training.gradient_checkpointing=maybe"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("florist: error: --set training.gradient_checkpointing=maybe: training.gradient_checkpointing:") and error.count("\n") == 1


# -- a site's memory --------------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path, tiny_model_dir) -> dict:
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": f"q{i}", "response": f"a{i}", "category": "c"} for i in range(4)]))
    return {"partition-id": 0, "data": str(data), "model": str(tiny_model_dir), "threads": 1, "device": "cpu"}


def test_a_rank_beyond_the_sites_memory_is_refused_naming_memory_gib(site, tiny_config):
    low = load_config(None, [f'model.name="{site["model"]}"', "federation.ranks=[4]", "data.max_length=128"])
    high = load_config(None, [f'model.name="{site["model"]}"', "federation.ranks=[64]", "data.max_length=128"])
    needs = plan_run(low, device=torch.device("cpu")).sites[0].memory.peak
    limit = needs / GIB * 1.0001  # just above what rank 4 needs: rank 64 needs more
    policy = NodePolicy.from_node_config(site | {"memory-gib": limit})
    assert policy.admit(low).rank == 4
    with pytest.raises(Refused) as refused:
        policy.admit(high)
    assert str(refused.value).startswith(f"node config memory-gib={limit:g}: rank 64 at data.max_length 128 and training.batch_size 8 needs an estimated")
    assert NodePolicy.from_node_config(site).admit(high).rank == 64  # no memory-gib: no limit


def test_memory_gib_is_checked_against_the_base_as_the_site_holds_it(site):
    """The run's settings carry no quantization of a site's own: an nf4 site plans its nf4 base, so
    a limit between the nf4 and the full-precision peak admits it and refuses a full-precision site."""
    config = load_config(None, [f'model.name="{site["model"]}"', "federation.ranks=[8]", "data.max_length=128"])
    full = plan_run(config, device=torch.device("cpu")).sites[0].memory.peak
    nf4 = plan_run(config.model_copy(update={"model": config.model.model_copy(update={"quantization": "nf4"})}), device=torch.device("cpu"))
    assert nf4.sites[0].memory.peak < full
    limit = (nf4.sites[0].memory.peak + full) / 2 / GIB
    assert NodePolicy.from_node_config(site | {"memory-gib": limit, "quantization": "nf4"}).admit(config).rank == 8
    with pytest.raises(Refused, match=f"^node config memory-gib={limit:g}: rank 8 "):
        NodePolicy.from_node_config(site | {"memory-gib": limit}).admit(config)


@pytest.mark.parametrize("value", [0, -2, "lots"])
def test_a_bad_memory_gib_is_refused_naming_it(site, value):
    with pytest.raises(Refused, match="^node config memory-gib="):
        NodePolicy.from_node_config(site | {"memory-gib": value})
