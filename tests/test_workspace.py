"""A client process's workspace: the merged base it shares between clients, and the copies it hands out."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from florist.aggregation import GlobalModule
from florist.federation.delivery import GlobalUpdate
from florist.federation.workspace import Workspace
from florist.lora.model import attach_lora, lora_layers

from federations import federation_config

TARGETS = ["q_proj", "v_proj"]


def an_update(model: torch.nn.Module, seed: int) -> GlobalUpdate:
    generator = torch.Generator().manual_seed(seed)
    return GlobalUpdate(
        {
            name: GlobalModule(
                A=torch.randn(2, module.in_features, generator=generator),
                B=0.1 * torch.randn(module.out_features, 2, generator=generator),
                scale=1.5,
            )
            for name, module in model.named_modules()
            if name.endswith(tuple(TARGETS)) and isinstance(module, torch.nn.Linear)
        }
    )


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 9).view(2, 4)).logits


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def test_a_trained_lora_on_the_shared_model_is_gone_at_the_next_call(tiny_model_dir, tmp_path):
    workspace = Workspace.load(federation_config(tiny_model_dir, tmp_path / "run", "florist"), "cpu")
    chain = [("update:1", an_update(workspace.model, seed=1))]
    merged = logits(workspace.base_after(chain))

    model = workspace.base_to_train(chain)
    assert model is workspace.model  # no copy for a client that only trains a LoRA
    wrapped = attach_lora(model, 4, 8.0, TARGETS)
    with torch.no_grad():
        for layer in lora_layers(wrapped).values():
            layer.lora_B["default"].weight.normal_()  # as trained
    assert not torch.allclose(logits(wrapped), merged)

    again = workspace.base_to_train(chain)
    assert again is workspace.model and not has_lora(again)
    torch.testing.assert_close(logits(again), merged, rtol=0, atol=0)
    # A caller that changes the model gets a copy without the LoRA, and the shared model stays.
    copy = workspace.base_after(chain)
    assert copy is not workspace.model and not has_lora(copy)
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    torch.testing.assert_close(logits(workspace.base_to_train(chain)), merged, rtol=0, atol=0)


def test_training_that_changes_base_tensors_gets_a_copy(tiny_model_dir, tmp_path):
    for setting in ('model.lora_bias="all"', 'model.modules_to_save=["lm_head"]'):
        workspace = Workspace.load(federation_config(tiny_model_dir, tmp_path / "run", "florist", setting), "cpu")
        assert workspace.base_to_train([]) is not workspace.model, setting
