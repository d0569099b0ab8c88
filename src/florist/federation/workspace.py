"""What a client process keeps between messages: the base model, merged once per global state.

Simulation workers run different clients in turn, and every client of a round starts from the
same merged base, so one copy per process serves them all. It is advanced in place when a
new global update arrives, and rebuilt from the pristine weights when a client's chain of
updates is not an extension of the cached one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from florist.config import RunConfig
from florist.data import Example
from florist.data.tokenize import encode
from florist.federation.delivery import GlobalUpdate, apply_update
from florist.federation.identity import identity_of
from florist.federation.messages import Identity
from florist.lora.model import model_tensor
from florist.models import load_model

Update = tuple[str, GlobalUpdate]
"""(identifier, update) of one merged global update; identifiers are unique within a run."""


@dataclass
class Workspace:
    config: RunConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    identity: Identity
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    tokenised: dict[int, list[dict]] = field(default_factory=dict)

    @classmethod
    def load(cls, config: RunConfig, device: str) -> Workspace:
        model, tokenizer = load_model(config.model.name, device)
        model.requires_grad_(False)
        return cls(config, model, tokenizer, identity_of(config, model))

    def base_after(self, chain: Sequence[Update]) -> nn.Module:
        """The base model with exactly `chain` merged, as a private copy the caller may wrap."""
        ids = [identifier for identifier, _ in chain]
        if ids[: len(self.merged)] != self.merged:
            self._restore()
        for identifier, update in chain[len(self.merged) :]:
            # Keyed as model_tensor finds them: the adapted weights, and the tensors trained in full.
            for name in [*(f"{module}.weight" for module in update.modules), *update.dense]:
                self.pristine.setdefault(name, model_tensor(self.model, name).detach().clone())
            apply_update(self.model, update)
            self.merged.append(identifier)
        return copy.deepcopy(self.model)

    def _restore(self) -> None:
        with torch.no_grad():
            for name, value in self.pristine.items():
                model_tensor(self.model, name).copy_(value)
        self.merged = []

    def features(self, partition: int, examples: list[Example]) -> list[dict]:
        """One client's training examples, tokenised once per process."""
        if partition not in self.tokenised:
            data = self.config.data
            self.tokenised[partition] = [encode(self.tokenizer, e, data.template, data.max_length) for e in examples]
        return self.tokenised[partition]


_current: tuple[str, Workspace] | None = None


def workspace_for(config: RunConfig, run_id: int, device: str) -> Workspace:
    """This process's workspace for a run; a new run, configuration or device replaces it."""
    global _current
    key = f"{run_id}:{device}:{config.model_dump_json()}"
    if _current is None or _current[0] != key:
        _current = (key, Workspace.load(config, device))
    return _current[1]
