"""Typed run configuration: a TOML file plus `section.key=value` overrides, validated up front."""

from __future__ import annotations

import math
import re
import string
import time
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer, model_validator

from florist.aggregation import DEFAULT_TAU, METHODS, ROUTES
from florist.sources import check_source

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_source(section: str, value: str, info: ValidationInfo) -> str:
    """A local path that does not exist is refused here, before anything loads; only hub ids go to the hub.

    Only when the configuration is checked for a run (`load_config`): a stored run's configuration is
    read back without its data."""
    if info.context and info.context.get("check_sources"):
        check_source(value, f"{section}.{info.field_name}")
    return value


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    """The embedded model's alias, a Hugging Face model id, or a local directory."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    lora_bias: Literal["none", "lora_only", "all"] = "none"
    """Biases trained beside the LoRA (peft's `bias`): "lora_only" those of the adapted layers, "all"
    every bias of the model. The server takes the clients' weighted mean, and the mean replaces the
    bias on every node: exact, since a bias only adds to its layer's output."""
    modules_to_save: list[str] = []
    """Modules trained in full beside the LoRA (peft's `modules_to_save`), e.g. ["lm_head"]: averaged
    as FedAvg averages dense weights (the clients' weighted mean), which replaces them on every node."""
    autocast: Literal["auto", "none", "bf16"] = "auto"
    """Mixed precision for training. "auto": bf16 on a GPU with bf16 and on a CPU with native bf16
    (avx512_bf16 or amx_bf16), fp32 elsewhere: emulated bf16 measured 20x slower than fp32
    (BENCHMARKS.md). The run's summary.json says what was chosen and why ("precision")."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """The clients' frozen base in 4-bit NormalFloat or 8-bit (bitsandbytes, QLoRA), or as loaded. In
    `florist run` every simulated client loads it so; in a deployment each site chooses its own
    (node config `quantization`) and the server's value is not sent. The server always evaluates and
    saves in full precision, and on a quantised base the global chain is held beside the weights,
    never merged into them (README, "Quantised bases")."""

    @field_validator("name")
    @classmethod
    def _local_model_exists(cls, value: str, info: ValidationInfo) -> str:
        return _check_source("model", value, info)

    @model_validator(mode="after")
    def _modules_to_save_apart_from_targets(self) -> ModelConfig:
        for name in self.modules_to_save:
            if not name or name in self.target_modules or self.modules_to_save.count(name) > 1:
                why = "is empty" if not name else "is also in model.target_modules" if name in self.target_modules else "is listed twice"
                raise ValueError(f"model.modules_to_save entry {name!r} {why}")
        return self


NODE_LOCAL = "node-local"
"""`data.source` of a deployment: each site trains on the files its own node config names."""


class DataConfig(Section):
    source: str = "embedded"
    """"embedded", a JSON/JSONL file, a directory of client_<k>.json files, or a Hugging Face dataset
    id, which `florist run` splits among its clients. A deployment records "node-local" here: its
    sites train on their own files, and the server holds none of them."""
    test_source: str = ""
    """Held-out examples the server evaluates on; empty means the source's own test split, and
    "embedded" the embedded task's."""
    template: Literal["alpaca", "chatml"] = "chatml"
    examples_per_category: int = Field(48, ge=1)
    test_per_category: int = Field(30, ge=1)
    partition: Literal["dirichlet", "iid", "given"] = "dirichlet"
    """"given" uses a client directory's own files as the clients."""
    dirichlet_alpha: float = Field(0.5, gt=0)
    min_client_examples: int = Field(8, ge=1)
    max_length: int = Field(128, ge=8)
    max_client_examples: int = Field(0, ge=0)
    """Cap per client (0: no cap), to scale real datasets down."""
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of each client's examples held out for validation (choosing tau, say), never trained on."""

    @field_validator("source", "test_source")
    @classmethod
    def _local_sources_exist(cls, value: str, info: ValidationInfo) -> str:
        return _check_source("data", value, info)


class FederationConfig(Section):
    num_clients: int = Field(8, ge=1)
    """Sites taking part: simulated nodes in `florist run`, SuperNodes expected in a deployment."""
    rounds: int = Field(3, ge=1)
    ranks: list[int] = [4, 4, 8, 8, 16, 16, 32, 64]
    """Rank per client by partition id; a single value applies to every client. A SuperNode's
    node configuration (`rank=...`) overrides it for that site."""
    alpha_per_rank: float = Field(2.0, gt=0)
    """lora_alpha = alpha_per_rank * rank, the paper's heterogeneous setting."""
    use_rslora: bool = False
    warm_start: bool = False
    """FLoRIST: each client starts its round's LoRA from the leading components of the last global
    update (moved out of its base, so its model is unchanged) instead of from B = 0, the way FlexLoRA's
    clients continue from the global adapter; the client uploads its change since the start and the
    server adds the start back, so the aggregate stays exact and the wire's error is relative to what
    was learned. False is the paper's fresh LoRA each round."""
    engine: Literal["ray", "inline"] = "ray"
    """How `florist run` runs the clients: "ray", Flower's simulation engine, `workers` clients in
    parallel; "inline", every client in the server's process one after another, sharing one copy of
    the model (no Ray start-up; for a single GPU, where Ray's workers would each hold the model)."""
    workers: int = Field(2, ge=1)
    """Clients trained in parallel by the "ray" engine (one worker per core)."""
    ffa_seed: int = 1234
    """Seed of FFA-LoRA's shared frozen A."""
    clients_per_round: int = Field(0, ge=0)
    """Nodes sampled per round (seeded); 0 samples `client_fraction` of `num_clients`."""
    client_fraction: float = Field(1.0, gt=0, le=1)
    min_clients: int = Field(0, ge=0)
    """Accepted replies a round needs (its quorum); 0 means `min_fraction` of the sampled nodes."""
    min_fraction: float = Field(0.5, gt=0, le=1)
    min_sites: int = Field(2, ge=1)
    """The fewest distinct sites a round's aggregate is built from: no quorum falls below it,
    whatever the nodes still connected. An aggregate of one site is that site's own update, sent
    unmixed to every other site; of two, each site can subtract its own weighted update and learn
    the other's exactly (README, "What a site learns from an aggregate")."""
    round_timeout: float = Field(600.0, gt=0)
    """Seconds a round (and an evaluation stage) waits for replies; later replies are dropped."""
    round_retries: int = Field(2, ge=0)
    """Times a round whose quorum was missed is tried again before the run stops."""
    connect_timeout: float = Field(300.0, gt=0)
    """Seconds to wait for enough nodes to connect before a round, then stop with a message."""

    @property
    def parallel_clients(self) -> int:
        return min(self.workers, self.num_clients) if self.engine == "ray" else 1

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"federation.ranks must all be >= 1, got {self.ranks}")
        if len(self.ranks) not in (1, self.num_clients):
            raise ValueError(
                f"federation.ranks has {len(self.ranks)} values for {self.num_clients} clients; give one or one per client"
            )
        if self.clients_per_round and self.client_fraction < 1:
            raise ValueError("federation.clients_per_round and federation.client_fraction are both set; set one")
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round {self.clients_per_round} is above federation.num_clients {self.num_clients}"
            )
        if self.min_clients > self.sample_size:
            raise ValueError(
                f"federation.min_clients {self.min_clients} is above the {self.sample_size} clients sampled per round"
            )
        if self.min_sites > self.sample_size:
            raise ValueError(
                f"federation.min_sites {self.min_sites} is above the {self.sample_size} clients sampled per round; "
                "set federation.min_sites = 1 to aggregate a single site's update"
            )
        if 0 < self.min_clients < self.min_sites:
            raise ValueError(
                f"federation.min_clients {self.min_clients} is below federation.min_sites {self.min_sites}, "
                "the fewest sites a round is aggregated from; lower federation.min_sites to allow it"
            )
        return self

    def rank_of(self, partition: int) -> int:
        return self.ranks[0] if len(self.ranks) == 1 else self.ranks[partition % len(self.ranks)]

    def alpha_of(self, partition: int) -> float:
        return self.alpha_per_rank * self.rank_of(partition)

    @property
    def sample_size(self) -> int:
        return self.clients_per_round or max(1, math.ceil(self.client_fraction * self.num_clients))

    def quorum(self, sampled: int) -> int:
        """Accepted replies a round of `sampled` nodes needs: never fewer than `min_sites`, even
        where fewer nodes were sampled (such a round cannot be aggregated)."""
        return max(self.min_sites, min(sampled, self.min_clients or math.ceil(self.min_fraction * sampled)))


WireFormat = Literal["float32", "bfloat16", "float16", "int8"]


class WireConfig(Section):
    """How adapters travel: a format per direction, and optional client-side truncation."""

    download: WireFormat = "float32"
    """The global update or adapter the server sends; int8 is per-row scaled (see federation/payload.py)."""
    upload: WireFormat = "float32"
    client_tau: float = Field(1.0, gt=0, le=1)
    """Below 1, a client uploads the smallest exact decomposition of its own update s B A that
    keeps this share of its spectral energy, instead of its full-rank factors."""


class AggregationConfig(Section):
    method: str = "florist"
    tau: float = Field(DEFAULT_TAU, gt=0, le=1)
    max_rank: int | None = Field(None, ge=1)
    download_budget_mb: float | None = Field(None, gt=0, allow_inf_nan=False)
    """florist: instead of tau, the most one client downloads per round (MiB): every byte of the
    instruction that carries the round's update, as Flower counts them. The rest of it after min_rank
    is spent on ranks across all modules at once (README, "A download budget instead of tau")."""
    budget_criterion: Literal["normalized", "absolute", "per-byte"] = "per-byte"
    """How a download budget ranks components: energy share within its module, energy, or energy
    share per byte of its module."""
    min_rank: int = Field(1, ge=1)
    """The rank every module gets under a download budget, whatever its spectrum."""
    route: str = "gram"
    memory_budget_mb: float = Field(1024.0, gt=0, allow_inf_nan=False)
    """florist: what the server holds of a round's client adapters. Within it, and while every
    module's stacked rank is at most min(m, n), FLoRIST is exact; past it, clients are folded into a
    running decomposition as they arrive (README, "Methods and round semantics")."""
    tau_candidates: list[float] = []
    """Automatic tau (FLoRIST): each round, the clients score these truncations of the exact
    aggregate on their own validation examples and the round keeps the smallest tau whose loss is
    within `tau_tolerance` of the best. Empty: the fixed `tau`."""
    tau_tolerance: float = Field(0.0, ge=0)
    """Nats of validation loss a smaller tau may lose against the best candidate and still win."""
    sketch_width: int | None = Field(None, ge=1)
    """florist-secure: the width l of every module's sketch (its second sketch is 2l wide; at most
    the module's min(m, n)). None: per module, twice the rank that module kept last round, at least
    aggregation.sketch.MIN_SKETCH_WIDTH (in round 1, the largest client rank), so each sketch holds
    what tau keeps with room for its error."""
    sketch_upload: float | None = Field(None, gt=0)
    """florist-secure: the most a site uploads a round, as a multiple of a mean client's adapter
    (the mean of federation.ranks, r (m + n) values a module): each module's width is capped at the
    widest whose sketch (`aggregation/sketch.sketch_entries`) holds at most this multiple of that module's share. None: no cap.
    The automatic width uploads 5-7x on the embedded model (BENCHMARKS.md, issue 21)."""

    @model_validator(mode="after")
    def _known_names(self) -> AggregationConfig:
        if self.method not in METHODS:
            raise ValueError(f"aggregation.method {self.method!r} is unknown; choose from {', '.join(METHODS)}")
        if self.route not in ROUTES:
            raise ValueError(f"aggregation.route {self.route!r} is unknown; choose from {', '.join(ROUTES)}")
        for key in ("sketch_width", "sketch_upload"):
            if getattr(self, key) is not None and self.method != "florist-secure":
                raise ValueError(f"aggregation.{key} sizes florist-secure's sketches; method {self.method!r} has none")
        if self.tau_candidates:
            if self.method != "florist":
                raise ValueError(f"aggregation.tau_candidates choose FLoRIST's tau; method {self.method!r} has none")
            if any(not 0 < tau <= 1 for tau in self.tau_candidates):
                raise ValueError(f"aggregation.tau_candidates must all be in (0, 1], got {self.tau_candidates}")
        if self.download_budget_mb is not None:
            if not self.is_florist:
                raise ValueError(f"aggregation.download_budget_mb chooses FLoRIST's ranks; method {self.method!r} has none")
            for key in ("tau", "tau_candidates"):
                if key in self.model_fields_set:
                    raise ValueError(
                        f"aggregation.{key} ({getattr(self, key)}) and aggregation.download_budget_mb "
                        f"({self.download_budget_mb}) are both set; set one"
                    )
        return self

    @model_serializer(mode="wrap")
    def _without_tau_under_a_budget(self, handler) -> dict:
        """A budget replaces tau: a dumped configuration (a run's config.toml) must load back."""
        data = handler(self)
        if self.download_budget_mb is not None:
            data.pop("tau", None)
            data.pop("tau_candidates", None)
        return data

    @property
    def automatic_tau(self) -> bool:
        return bool(self.tau_candidates)

    @property
    def is_florist(self) -> bool:
        """FLoRIST's rank rules (tau, a download budget), from the factors or from summed sketches."""
        return self.method in ("florist", "florist-secure")

    @property
    def secure(self) -> bool:
        """The server sums the clients' sketches and never reads one client's update (florist-secure)."""
        return self.method == "florist-secure"

    def options(self) -> dict:
        """Keyword options of the chosen aggregator (automatic tau aggregates exactly, then cuts);
        the bytes a download budget counts are the wire's, which the federation adds."""
        if not self.is_florist:
            return {}
        options = {"max_rank": self.max_rank, "route": self.route, "memory_budget_mb": self.memory_budget_mb}
        if self.download_budget_mb is None:
            return {**options, "tau": 1.0 if self.automatic_tau else self.tau}
        return {
            **options,
            "download_budget_mb": self.download_budget_mb,
            "budget_criterion": self.budget_criterion,
            "min_rank": self.min_rank,
        }


class PrivacyConfig(Section):
    """Client-level differential privacy (florist-secure only): each site clips its update's Frobenius
    norm to `clip_norm` and adds its share of Gaussian noise to its sketches, so that the sum carries
    `noise_multiplier` times the sketches' sensitivity (README, "Client-level differential privacy").
    Flat keys, not a [privacy.dp] table: `--set` overrides are section.key."""

    dp: bool = False
    clip_norm: float | None = None
    """C: the largest Frobenius norm of a site's whole LoRA update (all modules together)."""
    noise_multiplier: float | None = None
    """sigma: the noise on the sum over its sensitivity. Give it or target_epsilon."""
    target_epsilon: float | None = None
    """The epsilon the whole run may spend: sigma is calibrated to it over federation.rounds."""
    delta: float = 1e-5
    min_category_count: int = Field(20, ge=1)
    """florist-secure: the held-out examples of one category a site needs before it sends that
    category's score (a node's own min-category-examples may ask more); below it the site sends
    none and counts the category as withheld (federation/evaluation_sums.py)."""
    masked_categories: list[str] = []
    """florist-secure with privacy.secure_aggregation: the categories whose exact match the masked
    evaluation sums carry (every site's sums hold the same entries, so they are fixed in advance).
    Empty: the embedded task's, else databricks-dolly-15k's eight. A site's category outside them is
    withheld and counted as such."""
    secure_aggregation: bool = False
    """florist-secure: the sites' sketches, and with evaluation.federated their evaluation sums, are
    summed by the secure-sum protocol (pairwise masks, Shamir shares; federation/secure_round.py), so
    that the server reads only their sum. Off by default: it costs three more round trips per round
    (and per federated evaluation), and runs without it keep their results."""
    secure_threshold: float = Field(2 / 3, gt=0.5, le=1)
    """The fraction of a round's sites whose shares unmask the sum (never below federation.min_sites):
    fewer survivors and the round is not aggregated; more sites than 1 - this fraction colluding with
    the server could unmask one site."""
    secure_bits: int = Field(24, ge=8, le=31)
    """Bits each value of a site's upload is quantised to; a round sums at most 2**32 // 2**bits sites."""
    secure_clip_range: float = Field(1e4, gt=0, allow_inf_nan=False)
    """The largest magnitude of any value of a site's upload: its sketches weighted by its examples
    (by 1 under privacy.dp). A site whose upload exceeds it fails its round with this key named; each
    value is rounded to a step of 2 * secure_clip_range / (2**secure_bits - 1). Counts (examples,
    tokens) and the weight need no range: counts are summed exactly, and a float of any size travels
    as its whole part, a count, and its quantised fraction (secure_sum/quantization.py)."""

    @field_validator("clip_norm", "noise_multiplier", "target_epsilon")
    @classmethod
    def _positive(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            why = {"noise_multiplier": "without noise epsilon is infinite", "target_epsilon": "no noise reaches it"}.get(info.field_name, "")
            raise ValueError(f"privacy.{info.field_name} must be a finite number > 0{f' ({why})' if why else ''}, got {value!r}")
        return value

    @field_validator("masked_categories")
    @classmethod
    def _category_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.strip() or any(mark in name for mark in "/:"):
                raise ValueError(f"privacy.masked_categories: {name!r} is not a category name (empty, or holding '/' or ':')")
        if len(set(value)) != len(value):
            raise ValueError(f"privacy.masked_categories names a category twice: {sorted(value)}")
        return sorted(value)

    @field_validator("delta")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), where epsilon is defined, got {value!r}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> PrivacyConfig:
        if not self.dp:
            return self
        if self.clip_norm is None:
            raise ValueError("privacy.clip_norm must be set with privacy.dp: without a clip one site's influence is unbounded")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy.noise_multiplier and privacy.target_epsilon: set exactly one with privacy.dp")
        return self


class ValidationConfig(Section):
    """What the server accepts from a client; a reply outside these bounds is rejected for its round."""

    max_rank: int | None = Field(None, ge=1)
    """Largest LoRA rank a client may send; default: the largest of federation.ranks."""
    max_message_mb: float | None = Field(None, gt=0)
    """Largest adapter payload (MiB); default: what an adapter of rank max_rank needs in the wire dtype."""
    min_examples: int = Field(1, ge=1)
    max_examples: int = Field(1_000_000, ge=1)
    """Bounds on a client's claimed number of examples, its aggregation weight."""
    norm_factor: float = Field(10.0)
    """A client's update norm ||s B A||_F may be at most this factor above the round's median, and
    at least the median divided by it (a zero or near-zero update is no round's training)."""
    clip_factor: float = Field(5.0)
    """An admitted update whose norm is above this factor times the round's median is scaled down to
    it. 5 clips none of the honest updates we have seen: their norms grow about as the square root
    of the rank, and were at most 2.8x their round's median in the test federations (ranks 2 to 8,
    FedIT's continuing clients included) and about 2.4x for the default ranks 4 to 64. rsLoRA, whose
    updates grow about as the rank, may need more."""
    max_weight_share: float = Field(0.5, gt=0, le=1)
    """The most of a round's weight one node may hold: claimed examples above that are counted as
    that (README, "Faults, untrusted replies and resume"). 0.5: no node outweighs all the others
    together, so every aggregate mixes sites, and FedAvg's weighting by examples is left as it is
    unless one site holds more than half of a round's examples (the largest of the default 8 sites
    holds 18-30% over seeds 0-9). A coalition of k nodes holds at most k times this share: a lower
    value bounds colluders more tightly, at the cost of weighing large honest sites down."""
    max_relative_update: float = Field(1000.0, gt=0)
    """A module's update, measured by its factors as |s| ||B||_F ||A||_F (at least ||s B A||_F, and
    large too when factors are huge but their products cancel), may be at most this many times the
    norm of the base weight it adapts, in every round however few replies it has. Honest updates
    reach 20x on the tests' random tiny model (weights of norm 0.6, learning rate 0.05, rsLoRA);
    the bound keeps every reply far inside what float32 aggregation and a float16 download carry."""

    @model_validator(mode="after")
    def _sane(self) -> ValidationConfig:
        if not self.norm_factor > 1:
            raise ValueError(f"validation.norm_factor must be > 1, got {self.norm_factor}")
        if not 1 <= self.clip_factor <= self.norm_factor:
            raise ValueError(f"validation.clip_factor must be in [1, validation.norm_factor = {self.norm_factor:g}], got {self.clip_factor}")
        if self.min_examples > self.max_examples:
            raise ValueError(f"validation.min_examples {self.min_examples} is above validation.max_examples {self.max_examples}")
        return self


class TrainingConfig(Section):
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    deterministic: bool = False
    """torch's deterministic algorithms on every node: a resumed run then equals an uninterrupted one."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' activation checkpointing): the same gradients, for less memory and about a
    third more compute (`florist plan` shows what it saves)."""


class EvaluationConfig(Section):
    server: bool = True
    """The server evaluates the global model on held-out data it holds (the embedded task's test
    split, data.test_source, evaluation.mmlu)."""
    federated: bool = False
    """Each node scores the global model on its own held-out split; the server combines the
    scores weighted by examples (for a server that holds no data). Under florist-secure the nodes
    send sums only (federation/evaluation_sums.py)."""
    base: bool = True
    """Evaluate the base model before round 1 (a grid of runs on one base needs it once)."""
    every_round: bool = False
    """Evaluate after every round, not only the base model and the final one."""
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    mmlu: str = ""
    """An MMLU file (mmlu_1444.json format) or a hub dataset with cais/mmlu's columns ("cais/mmlu"); empty skips MMLU."""
    mmlu_limit: int = Field(0, ge=0)
    cache: bool = True
    """Keep the base model's evaluation under florist's cache root and reuse it in any later run of the
    same model, data and evaluation settings (the key covers the weights, the items and the code)."""

    @field_validator("mmlu")
    @classmethod
    def _local_mmlu_exists(cls, value: str, info: ValidationInfo) -> str:
        return _check_source("evaluation", value, info)


RUN_DIR_FIELDS = ("time", "method")


class OutputConfig(Section):
    run_dir: str = "runs/{time}-{method}"
    """A path; {time} and {method} are filled in when the run starts."""
    save_model: bool = True
    save_client_adapters: bool = False
    """Also write the adapters the clients sent, as PEFT adapters under clients/round<t>/<partition>/ with
    clients/round<t>/clients.json, to audit a round or aggregate it again offline (`florist aggregate`)."""

    @model_validator(mode="after")
    def _known_placeholders(self) -> OutputConfig:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(self.run_dir) if field is not None]
        except ValueError as error:
            raise ValueError(f"output.run_dir {self.run_dir!r} is not a valid template: {error}") from None
        unknown = [field for field in fields if field not in RUN_DIR_FIELDS]
        if unknown:
            raise ValueError(
                f"output.run_dir {self.run_dir!r} has an unknown placeholder {{{unknown[0]}}}; "
                f"use {', '.join('{' + f + '}' for f in RUN_DIR_FIELDS)}"
            )
        return self

    def resolved_run_dir(self, method: str) -> str:
        return self.run_dir.format(time=time.strftime("%Y%m%d-%H%M%S"), method=method)


SHARED_SETTINGS = (
    "model.target_modules",
    "model.lora_bias",
    "model.modules_to_save",
    "model.autocast",
    "data.template",
    "data.max_length",
    "data.validation_fraction",
    "data.max_client_examples",
    "federation.num_clients",
    "federation.ranks",
    "federation.alpha_per_rank",
    "federation.use_rslora",
    "federation.warm_start",
    "wire.*",
    "federation.ffa_seed",
    "aggregation.*",
    "privacy.*",
    "training.*",
    "evaluation.max_new_tokens",
    "evaluation.batch_size",
)
"""What the server sends every node with each instruction, and every node must agree on; both
sides fingerprint them. A node takes nothing else from the server: no path (model.name,
data.source, data.test_source, evaluation.mmlu, output.*), and nothing its own policy refuses
(federation/node_policy.py). The base model is compared by the digest of its weights, not by
name: a path may differ between machines that hold the same model."""

RESUMABLE_SETTINGS = (
    "validation.*",
    "federation.rounds",
    "federation.engine",
    "federation.workers",
    "federation.round_timeout",
    "federation.round_retries",
    "federation.connect_timeout",
    "federation.min_clients",
    "federation.min_fraction",
    "federation.min_sites",
    "evaluation.*",
    "output.save_model",
    "output.save_client_adapters",
)
"""The settings a resumed run may change; any other change would make it a different run."""


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    wire: WireConfig = WireConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    validation: ValidationConfig = ValidationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _secure_mode_is_consistent(self) -> RunConfig:
        if self.privacy.dp and not self.aggregation.secure:
            raise ValueError(
                f"privacy.dp needs aggregation.method = \"florist-secure\", whose server only sums noised sketches, not {self.aggregation.method!r}"
            )
        if self.privacy.secure_aggregation and not self.aggregation.secure:
            raise ValueError(
                f"privacy.secure_aggregation needs aggregation.method = \"florist-secure\", whose uploads are sums; not {self.aggregation.method!r}"
            )
        most_sites = (2**32 - 1) // (2**self.privacy.secure_bits - 1)
        key, sites = "federation.sample_size", self.federation.sample_size
        if self.evaluation.federated:  # an evaluation's sum is over every site
            key, sites = "federation.num_clients", self.federation.num_clients
        if self.privacy.secure_aggregation and sites > most_sites:
            raise ValueError(
                f"privacy.secure_bits {self.privacy.secure_bits}: a secure sum of {sites} sites "
                f"({key}) overflows 32 bits; at most {most_sites} sites fit, use fewer bits"
            )
        if not self.aggregation.secure:
            return self
        if self.model.lora_bias != "none" or self.model.modules_to_save:
            raise ValueError("model.lora_bias / model.modules_to_save: florist-secure sums LoRA sketches only, not tensors trained in full")
        if self.wire.upload != "float32":
            raise ValueError(f"wire.upload {self.wire.upload!r}: florist-secure uploads float32 sketches, whose values a half format would round")
        if self.aggregation.automatic_tau:
            raise ValueError("aggregation.tau_candidates: automatic tau has every site score cuts one by one, which florist-secure does not allow")
        return self

    @model_validator(mode="after")
    def _automatic_tau_has_validation_data(self) -> RunConfig:
        if self.aggregation.automatic_tau and not self.data.validation_fraction:
            raise ValueError(
                "aggregation.tau_candidates needs the clients' validation examples: set data.validation_fraction > 0"
            )
        return self

    @model_validator(mode="after")
    def _truncation_keeps_ffa_shared_A(self) -> RunConfig:
        if self.wire.client_tau < 1 and self.aggregation.method == "ffa":
            raise ValueError("wire.client_tau below 1 would change FFA-LoRA's shared frozen A; use it with another method")
        return self

    @model_validator(mode="after")
    def _warm_start_has_ordered_components(self) -> RunConfig:
        if not self.federation.warm_start:
            return self
        if self.aggregation.method != "florist":
            raise ValueError(
                f"federation.warm_start needs aggregation.method = \"florist\", whose update is ordered by singular "
                f"value, not {self.aggregation.method!r} (FedIT, FFA-LoRA and FlexLoRA clients already continue from the global adapter)"
            )
        if self.wire.client_tau < 1:
            raise ValueError(
                "wire.client_tau below 1 would truncate a warm-started client's change since its start, whose rows the server pairs with the start; "
                "use federation.warm_start or wire.client_tau, not both"
            )
        return self

    @model_validator(mode="after")
    def _rank_cap_holds_every_client(self) -> RunConfig:
        cap, largest = self.validation.max_rank, max(self.federation.ranks)
        if cap is not None and cap < largest:
            raise ValueError(f"validation.max_rank {cap} is below the largest configured client rank {largest} (federation.ranks)")
        return self

    @property
    def rank_cap(self) -> int:
        return self.validation.max_rank or max(self.federation.ranks)

    def flat(self) -> dict[str, object]:
        """Every setting as `section.key: value`."""
        return {f"{section}.{key}": value for section, values in self.model_dump().items() for key, value in values.items()}

    def shared_settings(self) -> dict[str, object]:
        return {key: value for key, value in self.flat().items() if is_shared_setting(key)}

    def fixed_settings(self) -> dict[str, object]:
        """The settings a resumed run must keep (everything but RESUMABLE_SETTINGS and the run directory)."""
        return {
            key: value
            for key, value in self.flat().items()
            if not _matches(key, RESUMABLE_SETTINGS) and key != "output.run_dir"
        }


def is_shared_setting(key: str) -> bool:
    return _matches(key, SHARED_SETTINGS)


def from_shared_settings(settings: dict[str, object], model: str) -> RunConfig:
    """The configuration a node runs by: `settings` (shared settings only, as `section.key`) over
    the defaults, and the node's own `model`. A bad value is a one-line error naming its key."""
    sections: dict[str, dict[str, object]] = {"model": {"name": model}}
    for key, value in settings.items():
        if not is_shared_setting(key):
            raise ValueError(f"setting {key!r} is not a shared setting (config.SHARED_SETTINGS)")
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    try:
        return RunConfig.model_validate(sections)
    except ValidationError as error:
        raise ValueError(_describe(error, "the server's settings", [])) from None


def first_difference(ours: dict[str, object], theirs: dict[str, object], labels: tuple[str, str] = ("ours", "theirs")) -> str | None:
    """The first key whose value differs (or is missing on one side), described for a log line."""
    for key in sorted(set(ours) | set(theirs)):
        mine, other = ours.get(key, "<missing>"), theirs.get(key, "<missing>")
        if mine != other:
            return f"{key} ({labels[0]} {mine!r}, {labels[1]} {other!r})"
    return None


def _parse_value(text: str):
    """A TOML value (number, bool, list, quoted string), else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` pairs applied on a nested dict (a copy)."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = parts
        if not isinstance(merged.setdefault(section, {}), dict):
            raise ValueError(f"override {item!r}: {section!r} is not a section")
        merged[section][name] = _parse_value(value.strip())
    return merged


def _describe(error: ValidationError, source: str, overrides: list[str]) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not where:  # a check across sections names its key first
        where = message.split(" ", 1)[0] if re.fullmatch(r"[a-z_]+\.[a-z_]+", message.split(" ", 1)[0]) else "(top level)"
    # Blame the --set override that supplied the value (or, for a section-wide check, one of its keys).
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if key == where or key.startswith(f"{where}."):
            source = f"--set {item}"
            break
    if first["type"] == "extra_forbidden":
        message = "no such configuration key"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] == "extra_forbidden" else f" (got {value!r})"
    if message.startswith(where):
        return f"{source}: {message}"
    return f"{source}: {where}: {message}{shown}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, check_sources: bool = True) -> RunConfig:
    """Read a TOML file (default: the packaged default.toml), apply overrides, validate.

    `check_sources`: refuse a model, data or MMLU source that looks like a local path and does not
    exist (off only to read back a finished run's configuration, whose data may be gone)."""
    source = Path(path) if path else DEFAULT_CONFIG
    try:
        data = tomllib.loads(source.read_text())
    except FileNotFoundError:
        raise ValueError(f"configuration file {source} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: invalid TOML: {error}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data, context={"check_sources": check_sources})
    except ValidationError as error:
        raise ValueError(_describe(error, str(source), overrides or [])) from None
