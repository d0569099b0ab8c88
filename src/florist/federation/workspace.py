"""What a client process keeps between messages: the base model, merged once per global state
(a quantised base holds the chain beside its weights instead: lora/beside.py).

Simulation workers run different clients in turn, and every client of a round starts from the
same merged base, so one model per process serves them all. It is advanced in place when a
new global update arrives, and rebuilt from the pristine weights when a client's chain of
updates is not an extension of the cached one. A client that only trains a LoRA wraps that same
model in place, and the next call takes the LoRA off again: a copy of the model per message cost
about 0.8 CPU-seconds for SmolLM2-135M (BENCHMARKS.md, issue 11).
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
from florist.federation.identity import identity_of, unquantised_digest
from florist.federation.messages import Identity
from florist.lora.beside import clear_beside
from florist.lora.model import detach_lora, model_tensor
from florist.models import Precision, hardware_precision, load_model, resolve_model
from florist.quantization import stored_as_integers

Update = tuple[str, GlobalUpdate]
"""(identifier, update) of one merged global update; identifiers are unique within a run."""


@dataclass
class Workspace:
    config: RunConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    identity: Identity
    precision: Precision
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    tokenised: dict[int, list[dict]] = field(default_factory=dict)

    @classmethod
    def load(cls, config: RunConfig, device: str, quantization: str = "none") -> Workspace:
        """The site's base, quantised as it chose (its node config's `quantization`), computing in
        the precision it trains in; its identity is the unquantised base's, as the server holds it."""
        precision = hardware_precision(config.model.autocast, torch.device(device))
        compute_dtype = torch.bfloat16 if precision.autocast else torch.float32
        model, tokenizer = load_model(config.model.name, device, quantization, compute_dtype)
        model.requires_grad_(False)
        digest = None if quantization == "none" else unquantised_digest(resolve_model(config.model.name))
        return cls(config, model, tokenizer, identity_of(config, model, digest), precision)

    def base_after(self, chain: Sequence[Update]) -> nn.Module:
        """The base model with exactly `chain` merged, as a private copy the caller may change."""
        return copy.deepcopy(self._merged(chain))

    def base_to_train(self, chain: Sequence[Update]) -> nn.Module:
        """The base model with exactly `chain` merged, for a client to wrap with its LoRA (`attach_lora`)
        and train: the workspace's own model, not a copy, which the next call takes the LoRA off.

        A copy all the same when training changes base tensors in place (`model.lora_bias` trains the
        model's own biases) or wraps modules other than the LoRA's (`model.modules_to_save`).
        """
        settings = self.config.model
        if settings.lora_bias != "none" or settings.modules_to_save:
            return self.base_after(chain)
        return self._merged(chain)

    def _merged(self, chain: Sequence[Update]) -> nn.Module:
        detach_lora(self.model)
        ids = [identifier for identifier, _ in chain]
        if ids[: len(self.merged)] != self.merged:
            self._restore()
        for identifier, update in chain[len(self.merged) :]:
            # Keyed as model_tensor finds them: the adapted float weights (a quantised one holds the
            # update beside it, and is never changed), and the tensors trained in full.
            merged_into = [f"{module}.weight" for module in update.modules if not self._quantised(module)]
            for name in [*merged_into, *update.dense]:
                self.pristine.setdefault(name, model_tensor(self.model, name).detach().clone())
            apply_update(self.model, update)
            self.merged.append(identifier)
        return self.model

    def _quantised(self, module: str) -> bool:
        return stored_as_integers(self.model.get_submodule(module).weight)

    def _restore(self) -> None:
        with torch.no_grad():
            for name, value in self.pristine.items():
                model_tensor(self.model, name).copy_(value)
        clear_beside(self.model)
        self.merged = []

    def features(self, partition: int, examples: list[Example]) -> list[dict]:
        """One client's training examples, tokenised once per process."""
        if partition not in self.tokenised:
            data = self.config.data
            self.tokenised[partition] = [encode(self.tokenizer, e, data.template, data.max_length) for e in examples]
        return self.tokenised[partition]


_current: tuple[str, Workspace] | None = None


def workspace_for(config: RunConfig, run_id: int, device: str, quantization: str = "none") -> Workspace:
    """This process's workspace for a run; a new run, configuration, device or quantisation replaces it."""
    global _current
    key = f"{run_id}:{device}:{quantization}:{config.model_dump_json()}"
    if _current is None or _current[0] != key:
        _current = (key, Workspace.load(config, device, quantization))
    return _current[1]
