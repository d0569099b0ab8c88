"""The base model on the server: put into any global state, evaluated, and saved at the end."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from florist.aggregation import ClientAdapter
from florist.config import ModelConfig, RunConfig
from florist.data import Example
from florist.evaluation import HeldOut, LossResult, evaluate, score_held_out
from florist.evaluation.cache import EvaluationCache, evaluation_key
from florist.evaluation.generation import stop_token_ids
from florist.evaluation.mmlu import Question
from florist.federation.delivery import GlobalUpdate, apply_update
from florist.federation.identity import identity_of
from florist.files import follow_umask
from florist.lora.adapters import write_adapter
from florist.lora.model import model_tensor, trained_in_full_shapes, weightless_model
from florist.models import best_device, cache_root, hardware_precision, load_model, resolve_model
from florist.reporting.run_directory import write_atomically


def adapted_modules(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The linear layers a LoRA on `target_modules` adapts, matched as peft matches a list of names."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }


def trained_in_full(settings: ModelConfig, model_config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor that `model.lora_bias` and `model.modules_to_save` train in full, by
    `read_dense` name, found on a weightless copy of the model; settings that would train nothing,
    or a module tied to another, are refused."""
    skeleton = weightless_model(model_config)
    owners: dict[int, list[str]] = {}
    for name, parameter in skeleton.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    for names in (names for names in owners.values() if len(names) > 1):
        for entry in settings.modules_to_save:
            module = next((n for n in names if _is_module(n.rpartition(".")[0], entry)), None)
            if module is not None:
                other = next(n for n in names if n != module)
                raise ValueError(
                    f"model.modules_to_save entry {entry!r}: {module} is tied to {other} in model {settings.name}; "
                    "averaging it would change both, which peft's adapter does not"
                )
    shapes = trained_in_full_shapes(skeleton, settings.target_modules, settings.lora_bias, settings.modules_to_save)
    if settings.lora_bias != "none" and not any(name.endswith(".bias") for name in shapes):
        layers = "adapted layers" if settings.lora_bias == "lora_only" else "layers"
        raise ValueError(f"model.lora_bias {settings.lora_bias!r}: the {layers} of model {settings.name} have no bias to train")
    for entry in settings.modules_to_save:
        if not any(_is_module(name.rpartition(".")[0], entry) for name in shapes):
            raise ValueError(f"model.modules_to_save entry {entry!r}: model {settings.name} has no such module")
    return shapes


def _is_module(path: str, entry: str) -> bool:
    """Whether a modules_to_save entry names the module at `path`, as peft matches it."""
    return path == entry or path.endswith(f".{entry}")


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
        self.dense_shapes = trained_in_full(config.model, self.model.config)
        # Keyed as model_tensor finds them: the adapted weights, and the tensors trained in full.
        tensors = [f"{name}.weight" for name in self.targets] + list(self.dense_shapes)
        self.pristine = {name: model_tensor(self.model, name).detach().clone() for name in tensors}
        self.identity = identity_of(config, self.model)
        self.at_base = True
        self.evaluation_cache = EvaluationCache(cache_root() / "evaluations")
        self.last_evaluation_cached = False
        self._held_out: dict[tuple[Example, ...], HeldOut] = {}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(m, n) of every adapted weight: what a client's factors must fit."""
        return {name: (module.out_features, module.in_features) for name, module in self.targets.items()}

    @property
    def base_norms(self) -> dict[str, float]:
        """||W||_F of every adapted base weight (float64): what an update's size is measured against."""
        return {name: self.pristine[f"{name}.weight"].double().norm().item() for name in self.targets}

    @torch.no_grad()
    def set_state(self, merged: Sequence[GlobalUpdate], adapter: GlobalUpdate | None) -> None:
        """Weights = base + every merged update + the current adapter's update; the tensors trained
        in full take the last value sent."""
        for name, value in self.pristine.items():
            model_tensor(self.model, name).copy_(value)
        updates = [*merged, *([adapter] if adapter else [])]
        for update in updates:
            apply_update(self.model, update)
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

    def save(self, target: Path, merged: Sequence[GlobalUpdate], adapter: GlobalUpdate) -> None:
        """`target/model`: base + merged updates, loadable by transformers; `target/adapter`: the
        last global adapter as a PEFT LoRA on top of it. Together they are the final global model."""
        self.set_state(merged, None)
        staging = target.with_name(f".{target.name}-partial")
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging / "model")
        self.tokenizer.save_pretrained(staging / "model")
        write_adapter(staging / "adapter", dict(adapter.modules), self.adapter_config, dense=adapter.dense)
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
            "bias": self.config.model.lora_bias,
            "modules_to_save": list(self.config.model.modules_to_save) or None,
            "task_type": "CAUSAL_LM",
        }

    def save_clients(self, target: Path, clients: Sequence[ClientAdapter], partitions: Sequence[int]) -> None:
        """`target/<partition>/`: each client's adapter as received; `target/clients.json`: partitions and weights."""
        for partition, client in zip(partitions, clients, strict=True):
            write_adapter(target / str(partition), client.modules, self.adapter_config, overwrite=True, dense=client.dense)
        index = [{"partition": p, "weight": c.weight, "adapter": str(p)} for p, c in zip(partitions, clients)]
        write_atomically(target / "clients.json", json.dumps(index, indent=2) + "\n")
