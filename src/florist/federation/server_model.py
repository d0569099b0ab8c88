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
from florist.evaluation import HeldOut, LossResult, evaluate, score_held_out
from florist.evaluation.cache import EvaluationCache, evaluation_key
from florist.evaluation.generation import stop_token_ids
from florist.evaluation.mmlu import Question
from florist.lora.adapters import write_adapter
from florist.lora.model import merge_into_base
from florist.models import best_device, cache_root, hardware_precision, load_model, resolve_model
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
        device = best_device()
        self.model, self.tokenizer = load_model(config.model.name, device)
        self.precision = hardware_precision(config.model.autocast, device)
        """What clients on this machine train in; the server evaluates in fp32 everywhere, so scores compare across machines."""
        self.model.requires_grad_(False)
        self.targets = adapted_modules(self.model, config.model.target_modules)
        if not self.targets:
            raise ValueError(f"model {config.model.name} has no linear layers named {config.model.target_modules}")
        self.pristine = {name: module.weight.detach().clone() for name, module in self.targets.items()}
        self.at_base = True
        self.evaluation_cache = EvaluationCache(cache_root() / "evaluations")
        self.last_evaluation_cached = False
        self._held_out: dict[tuple[Example, ...], HeldOut] = {}

    @property
    def in_features(self) -> dict[str, int]:
        return {name: module.in_features for name, module in self.targets.items()}

    @torch.no_grad()
    def set_state(self, merged: Sequence[Mapping[str, GlobalModule]], adapter: Mapping[str, GlobalModule] | None) -> None:
        """Weights = base + every merged update + the current adapter's update."""
        for name, module in self.targets.items():
            module.weight.copy_(self.pristine[name])
        updates = [*merged, *([adapter] if adapter else [])]
        for modules in updates:
            merge_into_base(self.model, modules)
        self.at_base = not updates

    def held_out(self, examples: Sequence[Example]) -> HeldOut:
        """`examples` tokenised, once per set of examples for the whole run."""
        key = tuple(examples)
        if key not in self._held_out:
            self._held_out[key] = HeldOut.tokenize(self.tokenizer, key, self.config.data.template)
        return self._held_out[key]

    def evaluate(self, examples: Sequence[Example], mmlu: Sequence[Question] | None, validation: Sequence[Example] = ()) -> dict:
        """Test metrics, MMLU when given, and the validation loss (`val_` keys) when there is a validation set.

        The base model's (no update merged) comes from the evaluation cache when an earlier run
        stored it under the same key; `last_evaluation_cached` says whether it did.
        """
        self.last_evaluation_cached = False
        if not (self.at_base and self.config.evaluation.cache):
            return self._evaluate(examples, mmlu, validation)
        key = self._base_key(examples, mmlu, validation)
        cached = self.evaluation_cache.get(key)
        if cached is not None:
            self.last_evaluation_cached = True
            return cached
        results = self._evaluate(examples, mmlu, validation)
        self.evaluation_cache.put(key, results, {"model": self.config.model.name, "data": self.config.data.source})
        return results

    def _base_key(self, examples: Sequence[Example], mmlu: Sequence[Question] | None, validation: Sequence[Example]) -> str:
        evaluation, data = self.config.evaluation, self.config.data
        return evaluation_key(
            self.model,
            tokenizer={
                "class": type(self.tokenizer).__name__,
                "size": len(self.tokenizer),
                "pad": self.tokenizer.pad_token_id,
                "stops": stop_token_ids(self.tokenizer),
            },
            test=self.held_out(examples) if examples else None,
            validation=self.held_out(validation) if validation else None,
            mmlu=list(mmlu or []),
            settings={
                "max_length": data.max_length,
                "max_new_tokens": evaluation.max_new_tokens,
                "batch_size": evaluation.batch_size,
                "mmlu_limit": evaluation.mmlu_limit,
            },
        )

    def _evaluate(self, examples: Sequence[Example], mmlu: Sequence[Question] | None, validation: Sequence[Example]) -> dict:
        evaluation = self.config.evaluation
        # Progress bars on a terminal only: in a log file they would be noise.
        progress = sys.stderr.isatty()
        results = {}
        if validation:
            scores = score_held_out(
                self.model, self.tokenizer, self.held_out(validation), max_length=self.config.data.max_length,
                max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size, answers=False,
                progress=progress,
            )
            loss = LossResult.of(scores.nlls, len(validation), self.config.data.max_length)
            results.update(val_loss=loss.mean_nll, val_perplexity=loss.perplexity)
        return results | evaluate(
            self.model,
            self.tokenizer,
            examples=self.held_out(examples) if examples else None,
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
        staging.rename(target)

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
