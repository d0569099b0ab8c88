"""What a client process keeps between messages: the base model, merged once per global state.

Simulation workers run different clients in turn, and every client of a round starts from the
same merged base, so one model per process serves them all. It is advanced in place when a
new global update arrives, and rebuilt from the pristine weights when a client's chain of
updates is not an extension of the cached one. Each client wraps that same model with its LoRA
in place; the next client's call takes the LoRA off again (a copy of the model per client cost
seconds per message).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from florist.aggregation import GlobalModule
from florist.config import RunConfig
from florist.data.tokenize import encode
from florist.federation.datasets import federated_data
from florist.lora.model import detach_lora, merge_into_base
from florist.models import Precision, best_device, hardware_precision, load_model

Update = tuple[str, dict[str, GlobalModule]]
"""(identifier, modules) of one merged global update; identifiers are unique within a run."""


@dataclass
class Workspace:
    config: RunConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    precision: Precision
    pristine: dict[str, torch.Tensor]
    merged: list[str] = field(default_factory=list)
    features: dict[int, list[dict]] = field(default_factory=dict)

    @classmethod
    def load(cls, config: RunConfig) -> Workspace:
        device = best_device()
        model, tokenizer = load_model(config.model.name, device)
        model.requires_grad_(False)
        return cls(config, model, tokenizer, hardware_precision(config.model.autocast, device), {})

    def base_after(self, chain: Sequence[Update]) -> nn.Module:
        """The base model with exactly `chain` merged: the workspace's own model, which the caller
        may wrap with a LoRA in place (`attach_lora`) and train, until the next call takes it off."""
        detach_lora(self.model)
        ids = [identifier for identifier, _ in chain]
        if ids[: len(self.merged)] != self.merged:
            self._restore()
        for identifier, modules in chain[len(self.merged) :]:
            for name in modules:
                self.pristine.setdefault(name, self.model.get_submodule(name).weight.detach().clone())
            merge_into_base(self.model, modules)
            self.merged.append(identifier)
        return self.model

    def _restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.pristine.items():
                self.model.get_submodule(name).weight.copy_(weight)
        self.merged = []

    def client_features(self, partition: int) -> list[dict]:
        """Tokenised training examples of one client, tokenised once per process."""
        if partition not in self.features:
            examples = federated_data(self.config).clients[partition]
            data = self.config.data
            self.features[partition] = [encode(self.tokenizer, e, data.template, data.max_length) for e in examples]
        return self.features[partition]


_current: tuple[str, Workspace] | None = None


def workspace_for(config: RunConfig, run_id: int) -> Workspace:
    """This process's workspace for a run; a new run or configuration replaces it."""
    global _current
    key = f"{run_id}:{config.model_dump_json()}"
    if _current is None or _current[0] != key:
        _current = (key, Workspace.load(config))
    return _current[1]
