"""Evaluations kept on disk under what determines them, so that a second run of the same base
model on the same data and settings reads the first run's result instead of paying for it again.

The key digests the model's weights and configuration, everything the caller says the result
depends on (data, settings), the library versions and the evaluation code itself: a change to
any of them is a different key, never a stale hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from florist.files import write_atomically

EVALUATION_SOURCES = Path(__file__).parent


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's class, configuration (less where it was loaded from) and every weight."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        settings = {key: value for key, value in config.to_dict().items() if not key.startswith("_")}
        settings.pop("transformers_version", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def source_digest() -> str:
    """SHA-256 of the evaluation package's source: changing how anything is scored changes every key."""
    digest = hashlib.sha256()
    for path in sorted(EVALUATION_SOURCES.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot key an evaluation on {type(value).__name__}")


def evaluation_key(model: torch.nn.Module, **depends_on) -> str:
    """The key of `model`'s evaluation given everything else it `depends_on` (JSON values or dataclasses)."""
    material = {
        "model": model_digest(model),
        "device": next(model.parameters()).device.type,
        "code": source_digest(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **depends_on,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=_jsonable).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class EvaluationCache:
    directory: Path

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored metrics, or None when there are none (or the file is unreadable: it is then recomputed)."""
        try:
            return json.loads(self.path(key).read_text())["metrics"]
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(f"ignoring unreadable cached evaluation {self.path(key)}: {error}", RuntimeWarning, stacklevel=2)
            return None

    def put(self, key: str, metrics: dict, about: dict) -> None:
        """Store `metrics` atomically; a cache that cannot be written costs the next run time, never this run."""
        record = {"metrics": metrics, "about": about, "stored": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            write_atomically(self.path(key), json.dumps(record, indent=1) + "\n")
        except OSError as error:
            warnings.warn(f"could not cache the evaluation in {self.directory}: {error}", RuntimeWarning, stacklevel=2)
