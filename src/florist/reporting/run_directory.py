"""A run's directory: the configuration used, per-round metrics (JSONL), final model, plots."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from florist.config import RunConfig


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the renamed file gets the mode a plain open() would give.
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


@dataclass
class RunDirectory:
    path: Path
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, config: RunConfig) -> RunDirectory:
        name = config.output.run_dir.format(time=time.strftime("%Y%m%d-%H%M%S"), method=config.aggregation.method)
        path = Path(name)
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"run directory {path} exists and is not empty; choose another output.run_dir")
        path.mkdir(parents=True, exist_ok=True)
        directory = cls(path)
        write_atomically(path / "config.toml", tomli_w.dumps(config.model_dump(exclude_none=True)))
        return directory

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def record_round(self, record: dict) -> None:
        """Append one round's line to metrics.jsonl, with the time it was written (`unix_time`)."""
        self.rounds.append({**record, "unix_time": time.time()})
        write_atomically(self.metrics_file, "".join(json.dumps(r) + "\n" for r in self.rounds))

    def write_json(self, name: str, data: dict) -> Path:
        target = self.path / name
        write_atomically(target, json.dumps(data, indent=2) + "\n")
        return target


def read_rounds(path: Path) -> list[dict]:
    with open(path / "metrics.jsonl") as stream:
        return [json.loads(line) for line in stream if line.strip()]
