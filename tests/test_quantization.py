"""Quantised bases (issue 20) on the embedded SmolLM2-135M: a site holds its frozen base in nf4 or
int8, the global chain stays beside the quantised weights, exactly, and the federation around it
(identity, delivery, evaluation, the final adapter) sees a full-precision base."""

from __future__ import annotations

import json
import sys

import bitsandbytes.functional as bnb
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from peft import PeftModel

from florist.aggregation import GlobalModule
from florist.config import load_config
from florist.federation import client_app, payload
from florist.federation.client_app import train_round
from florist.federation.delivery import GlobalUpdate, update_digest
from florist.federation.identity import identity_of, model_digest
from florist.federation.messages import IDENTITY, TRAINED, Instruction, instruction_content, update_key
from florist.federation.node_config import Refused
from florist.federation.node_policy import NodePolicy
from florist.federation.simulation import prepare, run_federation
from florist.federation.workspace import Workspace
from florist.lora.beside import held_beside
from florist.lora.model import attach_lora, lora_layers, merge_into_base
from florist.models import EMBEDDED_MODEL, load_model
from florist.quantization import dequantised_weight, stored_as_integers, unsupported

pytestmark = pytest.mark.usefixtures("server_task")

TARGETS = ("q_proj", "v_proj")
ROUNDS = 5
TOLERANCE = 1e-5
"""Float32 rounding of five updates summed in two orders (merged one by one, or stacked)."""


def embedded_config(run_dir, *extra: str):
    """The embedded model on a sliver of the embedded task: one short step per client and round."""
    return load_config(
        None,
        [
            'model.autocast="none"',
            "data.examples_per_category=2",
            "data.test_per_category=1",
            "data.min_client_examples=1",
            "data.max_length=48",
            "federation.num_clients=2",
            "federation.ranks=[2, 4]",
            "federation.min_sites=1",
            "training.local_steps=1",
            "training.batch_size=1",
            "evaluation.max_new_tokens=2",
            "evaluation.batch_size=8",
            f"output.run_dir={json.dumps(str(run_dir))}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def full_model():
    model, _ = load_model(EMBEDDED_MODEL)
    return model


@pytest.fixture(scope="module")
def pristine(full_model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in full_model.named_modules() if name.endswith(TARGETS)}


def chain_of_updates(pristine: dict[str, torch.Tensor], rounds: int) -> list[dict[str, GlobalModule]]:
    """Round updates of rank 8 whose size, per module, is 1% of the weight's: a LoRA round's order of magnitude."""
    generator = torch.Generator().manual_seed(0)
    chain = []
    for _ in range(rounds):
        update = {}
        for name, weight in pristine.items():
            a, b = torch.randn(8, weight.shape[1], generator=generator), torch.randn(weight.shape[0], 8, generator=generator)
            scale = 0.01 * weight.norm().item() / (b @ a).norm().item()
            update[name] = GlobalModule(A=a, B=b, scale=scale)
        chain.append(update)
    return chain


def instruction(config, digest: str, server_round: int, chain: list[dict], payloads: dict) -> Message:
    identity = identity_of(config, None, digest)
    content = instruction_content(
        Instruction(server_round, [update_digest(GlobalUpdate(u)) for u in chain], identity.fingerprint, digest, identity.settings)
    )
    for key, modules in payloads.items():
        payload.put(content, key, modules, "float32")
    return Message(content, dst_node_id=21, message_type=MessageType.TRAIN)


def drift(effective: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], base_error: dict[str, torch.Tensor]) -> float:
    """How far a site's effective weights are from full precision's, beyond the base's own quantisation error."""
    return max((effective[name] - reference[name] - base_error[name]).abs().max().item() for name in reference)


def test_the_chain_beside_an_nf4_base_does_not_drift_over_five_rounds_where_merging_into_it_would(tmp_path, pristine, monkeypatch):
    """Five FLoRIST rounds through the ClientApp on an nf4 site: the weights it trains on (its
    de-quantised base plus the terms held beside it) equal full-precision base plus chain up to the
    base's quantisation error alone, every round. Merging each update into the 4-bit weights (de-quantise,
    add, re-quantise) drifts from it, more each round: the same check fails for it."""
    config = embedded_config(tmp_path / "run", f"federation.rounds={ROUNDS}")
    chain = chain_of_updates(pristine, ROUNDS)
    effective: list[dict[str, torch.Tensor]] = []

    def spy(model, features, **options):
        layers = lora_layers(model)
        weights = {}
        for name, layer in layers.items():
            base = layer.get_base_layer()
            assert stored_as_integers(base.weight), name  # never merged into, never de-quantised in place
            a, b = held_beside(base) or (torch.zeros(0, base.in_features), torch.zeros(base.out_features, 0))
            weights[name] = dequantised_weight(base) + b @ a
        effective.append(weights)
        return train_lora(model, features, **options)

    train_lora = client_app.train_lora
    monkeypatch.setattr(client_app, "train_lora", spy)
    node = Context(run_id=7, node_id=21, node_config={"partition-id": 1, "quantization": "nf4"}, state=RecordDict(), run_config={})
    digest = model_digest(load_model(EMBEDDED_MODEL)[0])
    for server_round in range(1, ROUNDS + 1):
        held = chain[: server_round - 1]
        payloads = {update_key(server_round - 1): held[-1]} if held else {}
        reply = train_round(config, instruction(config, digest, server_round, held, payloads), node)
        assert str(reply.content[IDENTITY]["status"]) == TRAINED

    base_error = {name: weights - pristine[name] for name, weights in effective[0].items()}
    assert max(error.abs().max().item() for error in base_error.values()) > 100 * TOLERANCE  # nf4 does round
    references = [{name: w + sum(u[name].delta() for u in chain[:t]) for name, w in pristine.items()} for t in range(ROUNDS)]
    beside = [drift(effective[t], references[t], base_error) for t in range(ROUNDS)]
    assert max(beside) < TOLERANCE, beside

    # The naive alternative, on the same weights and updates: each update merged into the 4-bit weights.
    quantised = {name: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4") for name, w in pristine.items()}
    naive = []
    for t in range(ROUNDS):
        weights = {name: bnb.dequantize_4bit(*quantised[name]) for name in pristine}
        naive.append(drift(weights, references[t], base_error))
        if t + 1 < ROUNDS:
            quantised = {name: bnb.quantize_4bit(weights[name] + chain[t][name].delta(), blocksize=64, quant_type="nf4") for name in pristine}
    assert naive[0] < TOLERANCE  # the same base
    assert all(later > earlier for earlier, later in zip(naive[1:], naive[2:])), naive
    assert naive[-1] > 1000 * TOLERANCE, naive


def test_terms_held_beside_a_quantised_layer_add_exactly_and_a_lora_trains_on_top(pristine):
    """On an int8 layer the hook adds x A^T (s B)^T to the layer's own output, peft wraps the layer with
    a trainable LoRA on top, and gradients reach the LoRA only."""
    model, _ = load_model(EMBEDDED_MODEL, quantization="int8")
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(name)
    update = chain_of_updates({name: pristine[name]}, 1)[0]
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    merge_into_base(model, update)
    assert stored_as_integers(layer.weight)
    expected = before + update[name].scale * (x @ update[name].A.T) @ update[name].B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)

    peft_model = attach_lora(model, 4, 8.0, list(TARGETS))
    wrapped = lora_layers(peft_model)[name]
    torch.nn.init.normal_(wrapped.lora_B["default"].weight)
    out = wrapped(x)
    lora = wrapped.scaling["default"] * wrapped.lora_B["default"](wrapped.lora_A["default"](x))
    torch.testing.assert_close(out, expected + lora, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert wrapped.lora_B["default"].weight.grad is not None
    assert held_beside(wrapped.get_base_layer())[0].grad is None


def test_a_quantised_site_carries_the_unquantised_base_digest(tmp_path, full_model):
    """int8 here; an nf4 site's agreement with the server is what lets the drift test above train."""
    config = embedded_config(tmp_path / "run")
    workspace = Workspace.load(config, "cpu", "int8")
    assert stored_as_integers(workspace.model.get_submodule("model.layers.0.self_attn.q_proj").weight)
    assert model_digest(workspace.model) != model_digest(full_model)
    assert workspace.identity == identity_of(config, full_model)


def test_a_federation_of_quantised_clients_finishes_and_its_adapter_loads_on_the_full_precision_base(tmp_path, full_model):
    """`florist run` (inline engine) with nf4 clients and the warm start: two rounds, and the sites'
    own evaluation of the global model; the server's final model and adapter are full precision, and
    peft loads the adapter on the unquantised base."""
    config = embedded_config(
        tmp_path / "run",
        'model.quantization="nf4"',
        'federation.engine="inline"',
        "federation.rounds=2",
        "federation.warm_start=true",
        "evaluation.base=false",
        "evaluation.federated=true",
    )
    run_dir = run_federation(config)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [record for record in rounds if record.get("clients")]
    assert len(trained) == 2 and all(len(record["clients"]) == 2 for record in trained)
    # The sites scored the global model on their quantised bases, with the chain and the adapter beside them.
    assert len(rounds[-1]["federated_evaluation"]["nodes"]) == 2
    base, _ = load_model(EMBEDDED_MODEL)
    adapter = PeftModel.from_pretrained(base, run_dir / "final" / "adapter")
    assert lora_layers(adapter)
    final = json.loads((run_dir / "final" / "model" / "config.json").read_text())
    assert final.get("quantization_config") is None  # saved as the full-precision model it is


def test_quantisation_bitsandbytes_cannot_do_or_does_not_know_is_refused_in_one_line_naming_the_key(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"model\.quantization") as error:
        embedded_config(tmp_path / "run", 'model.quantization="fp4"')
    assert "\n" not in str(error.value)
    with pytest.raises(Refused, match=r"node config quantization='fp4' must be one of none, nf4, int8"):
        NodePolicy.from_node_config({"partition-id": 0, "quantization": "fp4"})

    # A machine where bitsandbytes cannot be imported: both ways in are refused before anything loads.
    unsupported.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    try:
        with pytest.raises(Refused, match=r"^node config quantization='nf4': bitsandbytes is not importable") as refusal:
            NodePolicy.from_node_config({"partition-id": 0, "quantization": "nf4"})
        assert "\n" not in str(refusal.value)
        with pytest.raises(ValueError, match=r"^model\.quantization 'int8': bitsandbytes is not importable"):
            prepare(embedded_config(tmp_path / "run", 'model.quantization="int8"'))
        assert not (tmp_path / "run").exists()
    finally:
        unsupported.cache_clear()
