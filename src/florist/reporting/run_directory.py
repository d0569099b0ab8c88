"""A run's directory: the configuration used, per-round metrics (JSONL), final model, plots."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from florist.config import RunConfig
from florist.files import write_atomically

__all__ = ["RunDirectory", "read_rounds", "write_atomically"]


def _refuse_if_taken(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"run directory {path} exists and is not empty; choose another output.run_dir")


@dataclass
class RunDirectory:
    """The directory appears with the run's first record, so a run that fails before it leaves none behind."""

    path: Path
    config: RunConfig
    rounds: list[dict] = field(default_factory=list)
    _written: bool = field(default=False, init=False, repr=False)

    @classmethod
    def create(cls, config: RunConfig) -> RunDirectory:
        """Name the directory (refused if taken); nothing is written yet."""
        path = Path(config.output.run_dir.format(time=time.strftime("%Y%m%d-%H%M%S"), method=config.aggregation.method))
        _refuse_if_taken(path)
        return cls(path, config)

    def _materialise(self) -> None:
        if self._written:
            return
        # Checked again: another run may have taken the directory since `create`.
        _refuse_if_taken(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path / "config.toml", tomli_w.dumps(self.config.model_dump(exclude_none=True)))
        self._written = True

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def record_round(self, record: dict) -> None:
        self._materialise()
        self.rounds.append(record)
        write_atomically(self.metrics_file, "".join(json.dumps(r) + "\n" for r in self.rounds))

    def write_json(self, name: str, data: dict) -> Path:
        self._materialise()
        target = self.path / name
        write_atomically(target, json.dumps(data, indent=2) + "\n")
        return target


def read_rounds(path: Path) -> list[dict]:
    with open(path / "metrics.jsonl") as stream:
        return [json.loads(line) for line in stream if line.strip()]
