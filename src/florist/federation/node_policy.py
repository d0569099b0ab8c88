"""A site's own policy: what its node reads, loads, trains and sends, whatever the server asks.

A SuperNode is started with `--node-config 'partition-id=0 data="/site/train.jsonl" ...'` (or a TOML
file of those keys); NODE_KEYS lists them. The policy is decoded from it once per process, and every
instruction is checked against it before the node reads any file:

- From the server the node takes only the shared settings (`RunConfig.shared_settings`), which
  travel in the instruction with their fingerprint. It never opens a path the server names: the
  files it reads are the ones its node config names (data, test-data, a model directory), and
  the only model it loads is its own `model`.
- Caps bound what a server may ask: rank, sequence length, local steps, batch size, new tokens,
  merged updates in the chain, and the instruction's size.
- Tensors trained in full (biases, `modules_to_save`) leave the node only if it allows them; a LoRA
  on anything but a linear layer (an embedding's would show which token rows the data touched) is refused.
- Per-category scores leave it only for categories of at least `min-category-examples` examples
  (under florist-secure, at least privacy.min_category_count).

A refusal is one line naming the key (`Refused`), which the node sends back as its reply's error;
it sends nothing of its files. `florist run` builds its nodes in its own process, from the
operator's own run configuration: their policy (`NodePolicy.for_run`) allows what that
configuration asks.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from florist.config import RunConfig, from_shared_settings, is_shared_setting
from florist.data import Example
from florist.federation import node_config as read
from florist.federation.identity import settings_fingerprint
from florist.federation.messages import Instruction
from florist.federation.node import NodeSettings
from florist.federation.node_config import Refused
from florist.federation.node_privacy import DEFAULT_MAX_DELTA, PrivacyDemands
from florist.federation.node_signing import node_signing
from florist.models import EMBEDDED_MODEL
from florist.planning import GIB
from florist.planning.plan import model_config, site_peak

MIB = 2**20
LORA_BIAS = ("none", "lora_only", "all")
"""model.lora_bias from least to most trained in full: "all" trains every bias "lora_only" does."""


@dataclass(frozen=True)
class Caps:
    """The most a server may ask of this node. The defaults hold the default federation and
    FLoRIST's heterogeneous ranks with room to spare, and stop a server from asking for what
    would exhaust the site's memory or time (a rank or a sequence length of 1e8)."""

    rank: int = 64
    max_length: int = 1024
    local_steps: int = 500
    batch_size: int = 64
    new_tokens: int = 256
    chain_length: int = 100
    """The node holds every merged update of the chain in its state and applies them to its base."""
    message_mb: float = 1024.0


CAP_KEYS = {
    "max-rank": "rank",
    "max-length": "max_length",
    "max-local-steps": "local_steps",
    "max-batch-size": "batch_size",
    "max-new-tokens": "new_tokens",
    "max-chain-length": "chain_length",
    "max-message-mb": "message_mb",
}
"""Node-config key of each cap."""

DEFAULT_CAPS = Caps()
DEFAULT_MIN_CATEGORY_EXAMPLES = 10

NODE_KEYS = {
    "partition-id": "this site's index (0-based): seeds its training and names it in the run directory",
    "num-partitions": "how many sites there are (set by the simulation; informational)",
    "data": "a JSON/JSONL file or a directory of this site's training examples (required)",
    "test-data": "a JSON/JSONL file or directory of this site's held-out examples (federated evaluation)",
    "model": f"the base model this node loads: a local model directory, a Hugging Face hub id, or {EMBEDDED_MODEL} (default)",
    "model-digest": "the weights digest its model must have (16 hex digits, as the server's log and a refusal print it)",
    "rank": "this site's LoRA rank (default: federation.ranks by partition id)",
    "alpha": "this site's lora_alpha (default: federation.alpha_per_rank * rank)",
    "device": "cpu, cuda or cuda:N (default: cuda when available)",
    "threads": "torch threads for this site's training (default: the cores this process may use)",
    "quantization": "how this site holds its frozen base: none (default), nf4 or int8 (bitsandbytes); the chain stays beside it, exact",
    "max-rank": f"the largest LoRA rank it trains (default {DEFAULT_CAPS.rank})",
    "max-length": f"the largest data.max_length, in tokens (default {DEFAULT_CAPS.max_length})",
    "max-local-steps": f"the largest training.local_steps (default {DEFAULT_CAPS.local_steps})",
    "max-batch-size": f"the largest training.batch_size and evaluation.batch_size (default {DEFAULT_CAPS.batch_size})",
    "max-new-tokens": f"the largest evaluation.max_new_tokens (default {DEFAULT_CAPS.new_tokens})",
    "max-chain-length": f"the most merged updates an instruction may list (default {DEFAULT_CAPS.chain_length})",
    "max-message-mb": f"the largest instruction it accepts, MiB (default {DEFAULT_CAPS.message_mb:g})",
    "lora-bias": "the most model.lora_bias it trains and sends in full: none (default), lora_only or all",
    "modules-to-save": "the modules it may train and send in full (model.modules_to_save), comma-separated (default: none)",
    "min-category-examples": f"the examples a category needs before its score is sent (default {DEFAULT_MIN_CATEGORY_EXAMPLES})",
    "memory-gib": "the memory its device has for training, GiB: a run whose planned peak (florist plan) is above it is refused (default: no limit)",
    "require-secure-sum": "true: it trains only for runs whose server reads nothing but sums (florist-secure with privacy.secure_aggregation)",
    "max-epsilon": "it trains only for runs with client-level DP, summed securely, planning at most this epsilon (default: no demand)",
    "max-delta": f"with max-epsilon, the largest privacy.delta (default {DEFAULT_MAX_DELTA:g})",
    "privacy-ledger": "with max-epsilon, a JSON file of this site's own: every private upload it makes, over all runs, is recorded there, and one that would bring their epsilon (at a sampling rate of 1) above max-epsilon is refused",
    "secure-sum-key": "this site's own node private key (OpenSSH EC, as --auth-supernode-private-key): it signs its secure-sum keys",
    "secure-sum-peers": "a file of the federation's node public keys (OpenSSH, one a line, this site's among them): the only signers of secure-sum keys it accepts",
    "worker-socket": "the Unix socket of this site's resident worker (`florist site-worker --socket PATH`), which then answers every message",
}


@dataclass(frozen=True)
class NodePolicy:
    """A site's node config, decoded: where its files are, and what it allows a run to ask."""

    partition: int
    data: Path | None
    test_data: Path | None
    model: str
    model_digest: str | None
    rank: int | None
    alpha: float | None
    device: str
    threads: int | None
    quantization: str = "none"
    caps: Caps = DEFAULT_CAPS
    lora_bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    min_category_examples: int = DEFAULT_MIN_CATEGORY_EXAMPLES
    memory_gib: float | None = None
    privacy: PrivacyDemands = PrivacyDemands()
    in_process: bool = False
    """A node of `florist run`, inside the operator's own process: it may take its part of the run's
    split, shares the cores with the other simulated clients, and its failures keep their text."""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodePolicy:
        unknown = sorted(set(node_config) - set(NODE_KEYS))
        if unknown:
            raise Refused(f"node config key {unknown[0]!r} is unknown; known keys: {', '.join(NODE_KEYS)}")
        if "partition-id" not in node_config:
            raise Refused("node config lacks partition-id: start the SuperNode with --node-config \"partition-id=N ...\"")
        # Read with the rest, so that a bad key file is refused at the node's first message, not in its first secure sum.
        node_signing(node_config)
        caps = {
            field: read.number(node_config, key) if field == "message_mb" else read.integer(node_config, key, minimum=1)
            for key, field in CAP_KEYS.items()
            if key in node_config
        }
        return cls(
            partition=read.integer(node_config, "partition-id", minimum=0),
            data=read.existing_path(node_config, "data"),
            test_data=read.existing_path(node_config, "test-data"),
            model=read.model_source(node_config),
            model_digest=read.digest(node_config),
            rank=read.integer(node_config, "rank", minimum=1) if "rank" in node_config else None,
            alpha=read.number(node_config, "alpha") if "alpha" in node_config else None,
            device=read.device(node_config),
            threads=read.integer(node_config, "threads", minimum=1) if "threads" in node_config else None,
            quantization=read.quantization(node_config),
            caps=replace(DEFAULT_CAPS, **caps),
            lora_bias=read.choice(node_config, "lora-bias", LORA_BIAS),
            modules_to_save=read.names(node_config, "modules-to-save"),
            min_category_examples=(
                read.integer(node_config, "min-category-examples", minimum=1)
                if "min-category-examples" in node_config
                else DEFAULT_MIN_CATEGORY_EXAMPLES
            ),
            memory_gib=read.number(node_config, "memory-gib") if "memory-gib" in node_config else None,
            privacy=PrivacyDemands.from_node_config(node_config),
        )

    @classmethod
    def for_run(cls, node_config: Mapping[str, object], config: RunConfig) -> NodePolicy:
        """A node of `florist run`: its node config, with a policy that allows what `config` asks
        (the operator's own run, on the operator's own machine)."""
        policy = cls.from_node_config(node_config)
        training, evaluation = config.training, config.evaluation
        caps = Caps(
            rank=max(policy.rank or 1, max(config.federation.ranks)),
            max_length=config.data.max_length,
            local_steps=training.local_steps,
            batch_size=max(training.batch_size, evaluation.batch_size),
            new_tokens=evaluation.max_new_tokens,
            chain_length=config.federation.rounds,
            message_mb=math.inf,
        )
        return replace(
            policy,
            model=config.model.name,
            # A simulated node may still choose its own (a mixed federation on one machine).
            quantization=policy.quantization if "quantization" in node_config else config.model.quantization,
            caps=caps,
            lora_bias=config.model.lora_bias,
            modules_to_save=tuple(config.model.modules_to_save),
            min_category_examples=1,
            in_process=True,
        )

    # -- an instruction ----------------------------------------------------------------------

    def read_instruction(self, message: Message) -> Instruction:
        """The instruction, once its size, chain and fingerprint are within the policy; its
        payloads are not decoded yet."""
        size = message_bytes(message)
        if size > self.caps.message_mb * MIB:
            raise Refused(f"node config max-message-mb={self.caps.message_mb:g}: the instruction is {size / MIB:.3g} MiB")
        try:
            instruction = Instruction.read(message)
        except (KeyError, TypeError, ValueError, RecursionError) as error:
            raise Refused(f"the instruction's config record is malformed: {type(error).__name__}: {error}") from None
        if len(instruction.chain) > self.caps.chain_length:
            raise Refused(
                f"node config max-chain-length={self.caps.chain_length}: the instruction lists {len(instruction.chain)} merged updates"
            )
        if settings_fingerprint(instruction.settings) != instruction.fingerprint:
            raise Refused("the instruction's settings do not match its fingerprint")
        return instruction

    def run_config(self, settings: Mapping[str, object]) -> RunConfig:
        """The run's configuration on this node: the server's shared settings, this node's model."""
        for key in settings:
            if not is_shared_setting(key):
                raise Refused(
                    f"the server's settings set {key!r}, which is not a shared setting: "
                    "a node takes no path and nothing else from the server (its files and model are its node config's)"
                )
        try:
            return from_shared_settings(dict(settings), self.model)
        except ValueError as error:
            raise Refused(str(error)) from None

    def admit(self, config: RunConfig) -> NodeSettings:
        """This node's settings for a run of `config`, or the first thing it asks beyond the policy."""
        if self.data is None and not self.in_process:
            raise Refused("node config lacks data: a site trains only on the file its node config names")
        rank = self.rank or config.federation.rank_of(self.partition)
        training, evaluation = config.training, config.evaluation
        asked = [
            ("max-rank", self.caps.rank, rank, "rank (its node config's rank)" if self.rank else "rank (federation.ranks)"),
            ("max-length", self.caps.max_length, config.data.max_length, "data.max_length"),
            ("max-local-steps", self.caps.local_steps, training.local_steps, "training.local_steps"),
            ("max-batch-size", self.caps.batch_size, training.batch_size, "training.batch_size"),
            ("max-batch-size", self.caps.batch_size, evaluation.batch_size, "evaluation.batch_size"),
            ("max-new-tokens", self.caps.new_tokens, evaluation.max_new_tokens, "evaluation.max_new_tokens"),
        ]
        for key, cap, value, setting in asked:
            if value > cap:
                raise Refused(f"node config {key}={cap}: the run asks for {setting} {value}")
        bias = config.model.lora_bias
        if LORA_BIAS.index(bias) > LORA_BIAS.index(self.lora_bias):
            raise Refused(
                f"node config lora-bias={self.lora_bias!r}: the server asks model.lora_bias={bias!r}, which sends biases trained in full"
            )
        for module in config.model.modules_to_save:
            if module not in self.modules_to_save:
                raise Refused(
                    f"node config modules-to-save does not allow {module!r}: the server asks model.modules_to_save "
                    f"{config.model.modules_to_save}, which sends that module trained in full"
                )
        if self.memory_gib is not None:
            self._check_memory(config, rank)
        self.privacy.check(config)
        cores = len(os.sched_getaffinity(0))
        # A node of `florist run` shares the machine's cores with the clients training beside it (EMBEDDED.md).
        threads = self.threads or (max(1, cores // config.federation.parallel_clients) if self.in_process else cores)
        alpha = self.alpha or config.federation.alpha_per_rank * rank
        return NodeSettings(self.partition, self.data, self.test_data, rank, alpha, self.device, threads, self.quantization)

    def _check_memory(self, config: RunConfig, rank: int) -> None:
        """The run's planned training peak at this node's rank, on its base as it holds it, fits its
        memory-gib (from the model's config.json: nothing is loaded before the refusal)."""
        peak = site_peak(config, model_config(self.model), rank, torch.device(self.device), self.quantization).peak
        if peak > self.memory_gib * GIB:
            raise Refused(
                f"node config memory-gib={self.memory_gib:g}: rank {rank} at data.max_length {config.data.max_length} and "
                f"training.batch_size {config.training.batch_size} needs an estimated {peak / GIB:.3g} GiB (florist plan)"
            )

    def check_model(self, model: nn.Module, digest: str, config: RunConfig) -> None:
        """The loaded model is the one the node pinned, and the LoRA adapts only its linear layers."""
        if self.model_digest is not None and digest != self.model_digest:
            raise Refused(f"node config model-digest={self.model_digest}: its model's weights have digest {digest}")
        targets = config.model.target_modules
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):  # the workspace's model may still wear the last client's LoRA
                module = module.get_base_layer()
            if any(name == target or name.endswith(f".{target}") for target in targets) and not isinstance(module, nn.Linear):
                raise Refused(
                    f"model.target_modules: {name} is a {type(module).__name__}, not a linear layer; a node adapts linear layers only"
                )

    def category_minimum(self, config: RunConfig) -> int:
        """Under florist-secure, the examples a category needs before its score leaves the node
        (federation/evaluation_sums.py): its own min-category-examples, or the run's
        privacy.min_category_count if higher. A plain run's scores go through `shareable`."""
        return max(self.min_category_examples, config.privacy.min_category_count)

    def shareable(self, scores: Mapping[str, float], examples: list[Example]) -> dict[str, float]:
        """`scores` without the per-category ones (`metric/category`) of categories with fewer than
        `min_category_examples` examples: a category of one example would give that example's answer away."""
        counts = Counter(example.category for example in examples)
        return {
            key: value
            for key, value in scores.items()
            if "/" not in key or counts[key.partition("/")[2]] >= self.min_category_examples
        }


def message_bytes(message: Message) -> int:
    """The bytes of a message's arrays and of its config values, as they travel (Flower's own
    `count_bytes` refuses a config record holding an empty string, as a first round's chain is)."""
    size = 0
    for key, record in message.content.items():
        size += len(key)
        if isinstance(record, ArrayRecord):
            size += record.count_bytes()
        else:
            size += sum(len(name) + len(str(value)) for name, value in record.items())
    return size


def node_policy(node_config: Mapping[str, object]) -> NodePolicy:
    """The policy of a SuperNode's node config, decoded once per process."""
    return _decoded(tuple(sorted(node_config.items())))


@lru_cache(maxsize=4)
def _decoded(items: tuple[tuple[str, object], ...]) -> NodePolicy:
    return NodePolicy.from_node_config(dict(items))
