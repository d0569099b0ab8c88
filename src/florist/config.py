"""Typed run configuration: a TOML file plus `section.key=value` overrides, validated up front."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from florist.aggregation import METHODS, ROUTES

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    """The embedded model's alias, a Hugging Face model id, or a local directory."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    autocast: Literal["auto", "none", "bf16"] = "auto"
    """Mixed precision for training. "auto": bf16 on a GPU with bf16 and on a CPU with native bf16
    (avx512_bf16 or amx_bf16), fp32 elsewhere: emulated bf16 measured 20x slower than fp32
    (BENCHMARKS.md). The run directory's precision.json says what was chosen and why."""


class DataConfig(Section):
    source: str = "embedded"
    """"embedded", a JSON/JSONL file, a directory of client_<k>.json files, or a Hugging Face dataset id."""
    test_source: str = ""
    """Held-out examples; empty means the source's own test split."""
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


class FederationConfig(Section):
    num_clients: int = Field(8, ge=1)
    rounds: int = Field(3, ge=1)
    ranks: list[int] = [4, 4, 8, 8, 16, 16, 32, 64]
    """Rank per client by partition id; a single value applies to every client."""
    alpha_per_rank: float = Field(2.0, gt=0)
    """lora_alpha = alpha_per_rank * rank, the paper's heterogeneous setting."""
    use_rslora: bool = False
    workers: int = Field(2, ge=1)
    """Clients trained in parallel (one simulation worker per core)."""
    wire_dtype: Literal["float32", "float16"] = "float32"
    ffa_seed: int = 1234
    """Seed of FFA-LoRA's shared frozen A."""

    @model_validator(mode="after")
    def _ranks_match_clients(self) -> FederationConfig:
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"federation.ranks must all be >= 1, got {self.ranks}")
        if len(self.ranks) not in (1, self.num_clients):
            raise ValueError(
                f"federation.ranks has {len(self.ranks)} values for {self.num_clients} clients; give one or one per client"
            )
        return self

    def rank_of(self, partition: int) -> int:
        return self.ranks[0] if len(self.ranks) == 1 else self.ranks[partition]

    def alpha_of(self, partition: int) -> float:
        return self.alpha_per_rank * self.rank_of(partition)


class AggregationConfig(Section):
    method: str = "florist"
    tau: float = Field(0.9, gt=0, le=1)
    max_rank: int | None = Field(None, ge=1)
    route: str = "gram"

    @model_validator(mode="after")
    def _known_names(self) -> AggregationConfig:
        if self.method not in METHODS:
            raise ValueError(f"aggregation.method {self.method!r} is unknown; choose from {', '.join(METHODS)}")
        if self.route not in ROUTES:
            raise ValueError(f"aggregation.route {self.route!r} is unknown; choose from {', '.join(ROUTES)}")
        return self

    def options(self) -> dict:
        """Keyword options of the chosen aggregator."""
        if self.method == "florist":
            return {"tau": self.tau, "max_rank": self.max_rank, "route": self.route}
        return {}


class TrainingConfig(Section):
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0


class EvaluationConfig(Section):
    base: bool = True
    """Evaluate the base model before round 1 (a grid of runs on one base needs it once)."""
    every_round: bool = False
    """Evaluate after every round, not only the base model and the final one."""
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    mmlu: str = ""
    """An MMLU file (mmlu_1444.json format) or "cais/mmlu"; empty skips MMLU."""
    mmlu_limit: int = Field(0, ge=0)
    cache: bool = True
    """Keep the base model's evaluation under florist's cache root and reuse it in any later run of the
    same model, data and evaluation settings (the key covers the weights, the items and the code)."""


class OutputConfig(Section):
    run_dir: str = "runs/{time}-{method}"
    save_model: bool = True
    save_client_adapters: bool = False
    """Also write the adapters the clients sent, as PEFT adapters under clients/round<t>/<partition>/ with
    clients/round<t>/clients.json, to audit a round or aggregate it again offline (`florist aggregate`)."""


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()


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
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    # Blame the --set override that supplied the value (or, for a section-wide check, one of its keys).
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if key == where or key.startswith(f"{where}."):
            source = f"--set {item}"
            break
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "no such configuration key"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] == "extra_forbidden" else f" (got {value!r})"
    if message.startswith(where):
        return f"{source}: {message}"
    return f"{source}: {where}: {message}{shown}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (default: the packaged default.toml), apply overrides, validate."""
    source = Path(path) if path else DEFAULT_CONFIG
    try:
        data = tomllib.loads(source.read_text())
    except FileNotFoundError:
        raise ValueError(f"configuration file {source} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: invalid TOML: {error}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ValueError(_describe(error, str(source), overrides or [])) from None
