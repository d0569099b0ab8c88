"""The base model on the server: put into any global state, evaluated, and saved at the end."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from florist.aggregation import ClientAdapter, GlobalModule
from florist.config import RunConfig
from florist.data import Example
from florist.evaluation import evaluate, instruction_loss
from florist.evaluation.mmlu import Question
from florist.federation.identity import identity_of
from florist.files import follow_umask
from florist.lora.adapters import write_adapter
from florist.lora.model import merge_into_base
from florist.models import best_device, load_model, resolve_model
from florist.reporting.run_directory import write_atomically


def adapted_modules(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The linear layers a LoRA on `target_modules` adapts, matched as peft matches a list of names."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }


class ServerModel:
    def __init__(self, config: RunConfig):
        self.config = config
        self.model, self.tokenizer = load_model(config.model.name, best_device())
        self.model.requires_grad_(False)
        self.targets = adapted_modules(self.model, config.model.target_modules)
        if not self.targets:
            raise ValueError(f"model {config.model.name} has no linear layers named {config.model.target_modules}")
        self.pristine = {name: module.weight.detach().clone() for name, module in self.targets.items()}
        self.identity = identity_of(config, self.model)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(m, n) of every adapted weight: what a client's factors must fit."""
        return {name: (module.out_features, module.in_features) for name, module in self.targets.items()}

    @torch.no_grad()
    def set_state(self, merged: Sequence[Mapping[str, GlobalModule]], adapter: Mapping[str, GlobalModule] | None) -> None:
        """Weights = base + every merged update + the current adapter's update."""
        for name, module in self.targets.items():
            module.weight.copy_(self.pristine[name])
        for modules in [*merged, *([adapter] if adapter else [])]:
            merge_into_base(self.model, modules)

    def evaluate(self, examples: Sequence[Example], mmlu: Sequence[Question] | None, validation: Sequence[Example] = ()) -> dict:
        """Test metrics, MMLU when given, and the validation loss (`val_` keys) when there is a validation set."""
        evaluation = self.config.evaluation
        # Progress bars on a terminal only: in a log file they would be noise.
        progress = sys.stderr.isatty()
        results = {}
        if validation:
            loss = instruction_loss(
                self.model, self.tokenizer, validation, template=self.config.data.template,
                max_length=self.config.data.max_length, batch_size=evaluation.batch_size, progress=progress,
            )
            results.update(val_loss=loss.mean_nll, val_perplexity=loss.perplexity)
        return results | evaluate(
            self.model,
            self.tokenizer,
            examples=examples or None,
            mmlu=mmlu or None,
            template=self.config.data.template,
            max_new_tokens=evaluation.max_new_tokens,
            max_length=self.config.data.max_length,
            batch_size=evaluation.batch_size,
            mmlu_limit=evaluation.mmlu_limit or None,
            progress=progress,
        )

    def save(self, target: Path, merged: Sequence[Mapping[str, GlobalModule]], adapter: Mapping[str, GlobalModule]) -> None:
        """`target/model`: base + merged updates, loadable by transformers; `target/adapter`: the
        last global adapter as a PEFT LoRA on top of it. Together they are the final global model."""
        self.set_state(merged, None)
        staging = target.with_name(f".{target.name}-partial")
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging / "model")
        self.tokenizer.save_pretrained(staging / "model")
        write_adapter(staging / "adapter", dict(adapter), self.adapter_config)
        follow_umask(staging)
        # A resumed run that goes past a finished one replaces its final model; the old one is
        # removed only once the new one is in place.
        previous = target.with_name(f".{target.name}-previous")
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
        staging.rename(target)
        shutil.rmtree(previous, ignore_errors=True)

    @property
    def adapter_config(self) -> dict:
        """What a PEFT adapter_config.json of this run holds besides the ranks and alphas."""
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": resolve_model(self.config.model.name),
            "target_modules": list(self.config.model.target_modules),
            "task_type": "CAUSAL_LM",
        }

    def save_clients(self, target: Path, clients: Sequence[ClientAdapter], partitions: Sequence[int]) -> None:
        """`target/<partition>/`: each client's adapter as received; `target/clients.json`: partitions and weights."""
        for partition, client in zip(partitions, clients, strict=True):
            write_adapter(target / str(partition), client.modules, self.adapter_config, overwrite=True)
        index = [{"partition": p, "weight": c.weight, "adapter": str(p)} for p, c in zip(partitions, clients)]
        write_atomically(target / "clients.json", json.dumps(index, indent=2) + "\n")
