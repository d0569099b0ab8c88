"""PEFT LoRA adapter directories <-> the aggregation engine's tensors.

A directory is what `PeftModel.save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors`. Module names are peft's module paths inside the base model,
e.g. `model.layers.0.self_attn.q_proj`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from florist.aggregation import ClientAdapter, GlobalModule, LoraFactors, lora_scale
from florist.files import follow_umask
from florist.lora.model import PEFT_PREFIX as _PREFIX

# peft prefixes every saved key with the PeftModel's path to the base model.
_FACTOR_KEY = re.compile(rf"^{re.escape(_PREFIX)}(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

# Saved tensors that are neither LoRA factors nor trained in full, and why they cannot be aggregated.
_UNSUPPORTED = (
    ("lora_magnitude_vector", "is a DoRA magnitude vector, which has no low-rank form to aggregate"),
    ("lora_embedding_", "is an embedding LoRA, which this aggregator does not support"),
    ("lora_B.bias", "is a LoRA bias (lora_bias=True), which has no low-rank form to aggregate"),
)


def adapter_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """The config and weights file of a PEFT adapter directory."""
    return Path(path) / CONFIG_NAME, Path(path) / SAFETENSORS_WEIGHTS_NAME


def adapter_bytes(path: str | os.PathLike) -> int:
    """Size on disk of an adapter's config and weights."""
    return sum(f.stat().st_size for f in adapter_files(path))


def read_config(path: str | os.PathLike) -> dict:
    """The adapter_config.json of a PEFT LoRA directory, refused unless it is one this project can aggregate."""
    path = Path(path)
    config_file, weights_file = adapter_files(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such adapter directory")
    if not config_file.is_file():
        raise ValueError(f"{path}: missing {CONFIG_NAME}; expected a directory written by PeftModel.save_pretrained")
    if not weights_file.is_file():
        hint = f" (only safetensors is read: re-save its {WEIGHTS_NAME} with safe_serialization=True)" if (path / WEIGHTS_NAME).is_file() else ""
        raise ValueError(f"{path}: missing {SAFETENSORS_WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file}: invalid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: not a LoRA adapter (peft_type is {config.get('peft_type')!r}, expected 'LORA')")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise ValueError(f"{config_file}: '{key}' must be a number, got {config.get(key)!r}")
    if config.get("use_dora"):
        raise ValueError(f"{config_file}: use_dora is set; DoRA magnitude vectors have no low-rank form to aggregate")
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    weights_file = adapter_files(path)[1]
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_file}: unreadable safetensors file ({error})") from None


def _trained_in_full(name: str, config: Mapping) -> str | None:
    """Why the saved tensor `name` (a path in the base model) is one the adapter trains in full, or None.

    With `bias` "lora_only" or "all" peft saves the trained biases; with `modules_to_save` it saves
    each listed module's trained copy under the module's own name (e.g. lm_head.weight).
    """
    module = name.rpartition(".")[0]
    if any(module == target or module.endswith(f".{target}") for target in config.get("modules_to_save") or ()):
        return "a module in modules_to_save"
    if name.endswith(".bias") and config.get("bias", "none") in ("lora_only", "all"):
        return f"a bias trained with bias={config['bias']!r}"
    return None


def _split_tensors(
    tensors: Mapping[str, Tensor], config: Mapping, weights_file: Path, factors_only: bool
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """({module: {"A", "B"}}, {name: tensor trained in full}), refusing every other tensor."""
    pairs: dict[str, dict[str, Tensor]] = {}
    dense: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        match = _FACTOR_KEY.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["factor"]] = tensor
            continue
        unsupported = next((why for marker, why in _UNSUPPORTED if marker in key), None)
        full = None if unsupported or not key.startswith(_PREFIX) else _trained_in_full(key.removeprefix(_PREFIX), config)
        if full is None:
            reason = unsupported or (
                "is neither a LoRA factor (lora_A/lora_B) nor a tensor adapter_config.json declares trained in full "
                "(bias, modules_to_save)"
            )
            raise ValueError(f"{weights_file}: tensor {key} {reason}")
        if factors_only:
            raise ValueError(f"{weights_file}: tensor {key} is {full}, trained in full; only LoRA factors were asked for")
        dense[key.removeprefix(_PREFIX)] = tensor
    return pairs, dense


def _check_dense(dense: Mapping[str, Tensor], weights_file: Path) -> None:
    for name, tensor in dense.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_file}: {name} must be floating point, got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_file}: {name} holds NaN or Inf values")


def _check_pairs(pairs: Mapping[str, Mapping[str, Tensor]], weights_file: Path) -> None:
    if not pairs:
        raise ValueError(f"{weights_file}: holds no LoRA factors")
    for module, pair in pairs.items():
        if len(pair) != 2:
            have, lacks = ("lora_A", "lora_B") if "A" in pair else ("lora_B", "lora_A")
            raise ValueError(f"{weights_file}: module {module} has {have} but no {lacks}")


def _module_factors(module: str, pair: Mapping[str, Tensor], config: Mapping, weights_file: Path) -> LoraFactors:
    A, B = pair["A"], pair["B"]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{weights_file}: module {module}: rank mismatch, lora_A is {tuple(A.shape)} but lora_B is {tuple(B.shape)}")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise ValueError(f"{weights_file}: module {module}: LoRA factors must be floating point, got {A.dtype} and {B.dtype}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    # peft's own lookup, so a pattern means here exactly what it meant when the adapter was built.
    configured_rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    rank = A.shape[0]
    if rank != configured_rank:
        raise ValueError(f"{weights_file}: module {module}: tensors have rank {rank} but adapter_config.json says {configured_rank}")
    for label, tensor in (("lora_A", A), ("lora_B", B)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_file}: module {module}: {label} holds NaN or Inf values")
    return LoraFactors(A=A, B=B, scale=lora_scale(alpha, rank, bool(config.get("use_rslora"))))


def read_adapter(path: str | os.PathLike, weight: float = 1.0, *, factors_only: bool = False) -> tuple[dict, ClientAdapter]:
    """A PEFT LoRA directory as (its adapter_config.json, the engine's ClientAdapter with `weight`).

    Tensors trained in full (biases, modules_to_save) become the ClientAdapter's `dense`, named
    by their path in the base model; `factors_only` refuses them instead.
    """
    path = Path(path)
    config = read_config(path)
    weights_file = adapter_files(path)[1]
    pairs, dense = _split_tensors(_read_tensors(path), config, weights_file, factors_only)
    _check_pairs(pairs, weights_file)
    _check_dense(dense, weights_file)
    modules = {module: _module_factors(module, pair, config, weights_file) for module, pair in sorted(pairs.items())}
    return config, ClientAdapter(modules=modules, weight=weight, dense=dict(sorted(dense.items())))


def _check_compatible(paths: Sequence[Path], configs: Sequence[Mapping], clients: Sequence[ClientAdapter]) -> None:
    """Every adapter against the first: same base model, same modules, same adapted shapes."""
    first, reference = paths[0], clients[0].modules
    for path, config, client in zip(paths[1:], configs[1:], clients[1:]):
        base, expected = config.get("base_model_name_or_path"), configs[0].get("base_model_name_or_path")
        if base != expected:
            raise ValueError(f"{path} was trained on base model {base!r} but {first} on {expected!r}")
        extra, missing = set(client.modules) - set(reference), set(reference) - set(client.modules)
        if extra or missing:
            module = sorted(extra or missing)[0]
            holder, lacker = (path, first) if extra else (first, path)
            raise ValueError(f"{holder} adapts module {module} but {lacker} does not; adapters must target the same modules")
        for module, factors in client.modules.items():
            if factors.shape != reference[module].shape:
                (m, n), (m0, n0) = factors.shape, reference[module].shape
                raise ValueError(f"module {module} adapts a {m}x{n} weight in {path} but {m0}x{n0} in {first}")
        extra, missing = set(client.dense) - set(clients[0].dense), set(clients[0].dense) - set(client.dense)
        if extra or missing:
            name = sorted(extra or missing)[0]
            holder, lacker = (path, first) if extra else (first, path)
            raise ValueError(f"{holder} trains {name} in full but {lacker} does not; adapters must train the same tensors")
        for name, tensor in client.dense.items():
            if tensor.shape != clients[0].dense[name].shape:
                shape, shape0 = tuple(tensor.shape), tuple(clients[0].dense[name].shape)
                raise ValueError(f"{name} is {shape} in {path} but {shape0} in {first}")


def read_adapters(
    paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, *, factors_only: bool = False
) -> list[ClientAdapter]:
    """Several adapters to aggregate (weights default to equal), checked against each other."""
    if not paths:
        raise ValueError("no adapter directories given")
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"got {len(weights)} weights for {len(paths)} adapters")
    paths = [Path(p) for p in paths]
    configs, clients = zip(*(read_adapter(path, weight, factors_only=factors_only) for path, weight in zip(paths, weights)))
    _check_compatible(paths, configs, clients)
    return list(clients)


def _content_digest(client: ClientAdapter) -> bytes:
    """A digest of everything the adapter means (names, scales, shapes, dtypes, values), not of its weight."""
    digest = hashlib.sha256()
    tensors = [(f"{name}.A {factors.scale!r}", factors.A) for name, factors in client.modules.items()]
    tensors += [(f"{name}.B", factors.B) for name, factors in client.modules.items()]
    tensors += list(client.dense.items())
    for label, tensor in tensors:
        digest.update(f"{label} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.digest()


def find_duplicate(paths: Sequence[Path], clients: Sequence[ClientAdapter]) -> tuple[Path, Path, str] | None:
    """(an adapter, the earlier one it repeats, how) when one is given twice, else None.

    The same directory under another name (a symlink, another relative path) or a copy with
    identical content: aggregated twice, either would silently double that site's weight.
    """
    directories: dict[tuple[int, int], Path] = {}
    contents: dict[bytes, Path] = {}
    for path, client in zip(paths, clients, strict=True):
        status = path.stat()
        directory, content = (status.st_dev, status.st_ino), _content_digest(client)
        if directory in directories:
            return path, directories[directory], "the same directory as"
        if content in contents:
            return path, contents[content], "an identical copy of"
        directories[directory], contents[content] = path, path
    return None


def _most_common(values: Sequence) -> object:
    return Counter(values).most_common(1)[0][0]


def _lora_config(modules: Mapping[str, GlobalModule], base_config: Mapping) -> dict:
    """base_config with ranks and alphas so peft's scale (alpha / r) times B @ A is each module's delta."""
    ranks = {name: module.rank for name, module in modules.items()}
    alphas = {name: module.rank * module.scale for name, module in modules.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    # peft matches a pattern key as the regex `(.*\.)?(key)$`: an escaped full module path
    # matches that module only (layers.1 never matches layers.11, nor '.' any character).
    return {
        **base_config,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(name): rank for name, rank in ranks.items() if rank != r},
        "alpha_pattern": {re.escape(name): a for name, a in alphas.items() if a != alpha},
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def _write_contents(directory: Path, modules: Mapping[str, GlobalModule], dense: Mapping[str, Tensor], config: Mapping) -> None:
    # Clones: the engine's outputs may be views of one batched tensor, which safetensors refuses to share.
    tensors = {}
    for name, module in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = module.A.clone(memory_format=torch.contiguous_format)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = module.B.clone(memory_format=torch.contiguous_format)
    for name, tensor in dense.items():
        tensors[f"{_PREFIX}{name}"] = tensor.clone(memory_format=torch.contiguous_format)
    config_file, weights_file = adapter_files(directory)
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_adapter(
    out_dir: str | os.PathLike,
    modules: Mapping[str, GlobalModule],
    base_config: Mapping,
    overwrite: bool = False,
    dense: Mapping[str, Tensor] | None = None,
) -> int:
    """Write `modules` as a PEFT LoRA adapter at `out_dir`, all at once; returns the bytes written.

    `dense`: tensors trained in full (biases, modules_to_save), by their path in the base model, as
    `read_adapter` names them; `base_config`'s `bias` and `modules_to_save` must declare them.
    The directory appears complete or not at all. An existing `out_dir` is refused unless
    `overwrite`, which swaps the new directory in and then removes the old one.
    """
    out_dir = Path(out_dir)
    dense = dense or {}
    if not modules:
        raise ValueError(f"{out_dir}: no modules to write")
    for name, module in modules.items():
        if module.rank < 1 or not math.isfinite(module.scale) or module.scale == 0:
            raise ValueError(f"module {name}: cannot write rank {module.rank} with scale {module.scale} as a LoRA adapter")
    for name in dense:
        if _trained_in_full(name, base_config) is None:
            raise ValueError(f"{out_dir}: {name} is trained in full but the adapter's bias and modules_to_save do not declare it")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; choose another output directory or overwrite it explicitly")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0700 would outlive the rename; mkdir honours the umask.
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        _write_contents(staging, modules, dense, _lora_config(modules, base_config))
        follow_umask(staging)
        written = adapter_bytes(staging)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; an existing `out_dir` is set aside first and restored if that fails."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = staging.with_suffix(".old")
    out_dir.rename(retired)
    try:
        staging.rename(out_dir)
    except BaseException:
        retired.rename(out_dir)
        raise
    shutil.rmtree(retired)
