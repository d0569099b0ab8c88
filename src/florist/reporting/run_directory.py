"""A run's directory: the configuration used, per-round metrics (JSONL), final model, plots."""

from __future__ import annotations

import json
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
    """The directory appears when the run first writes into it (`claim`), so a run that fails
    before it has anything to record leaves none behind."""

    path: Path
    config: RunConfig
    rounds: list[dict] = field(default_factory=list)
    _claimed: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, config: RunConfig) -> RunDirectory:
        """Name the directory (refused if taken); nothing is written yet."""
        path = Path(config.output.resolved_run_dir(config.aggregation.method))
        _refuse_if_taken(path)
        return cls(path, config)

    @classmethod
    def reopen(cls, path: Path, config: RunConfig, rounds: list[dict]) -> RunDirectory:
        """A run directory being resumed, with the rounds its checkpoint holds (metrics.jsonl is
        rewritten from them: a round recorded after the checkpoint is run again). config.toml
        takes the resumed configuration, which may only differ in resumable settings."""
        directory = cls(path, config, list(rounds), _claimed=True)
        write_atomically(path / "config.toml", tomli_w.dumps(config.model_dump(exclude_none=True)))
        write_atomically(directory.metrics_file, "".join(json.dumps(r) + "\n" for r in directory.rounds))
        return directory

    def claim(self) -> None:
        """Create the directory with its config.toml, once; whatever writes into the run directory calls this first."""
        if self._claimed:
            return
        # Checked again: another run may have taken the directory since `create`.
        _refuse_if_taken(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path / "config.toml", tomli_w.dumps(self.config.model_dump(exclude_none=True)))
        self._claimed = True

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def record_round(self, record: dict) -> None:
        self.claim()
        self.rounds.append(record)
        write_atomically(self.metrics_file, "".join(json.dumps(r) + "\n" for r in self.rounds))

    def write_json(self, name: str, data: dict) -> Path:
        self.claim()
        target = self.path / name
        write_atomically(target, json.dumps(data, indent=2) + "\n")
        return target


def read_rounds(path: Path) -> list[dict]:
    with open(path / "metrics.jsonl") as stream:
        return [json.loads(line) for line in stream if line.strip()]
