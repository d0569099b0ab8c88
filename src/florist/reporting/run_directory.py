"""A run's directory: the configuration used, per-round metrics (JSONL), final model, plots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from florist.config import RunConfig
from florist.files import write_atomically

__all__ = ["RunDirectory", "check_round_record", "read_rounds", "write_atomically"]


class _Read(BaseModel):
    """The fields of a metrics.jsonl record that the end of a run reads (the summary, the plots);
    others are kept as they are."""

    model_config = ConfigDict(strict=True, extra="allow")


class _Communication(_Read):
    down_bytes: NonNegativeInt
    up_bytes: NonNegativeInt


class _Client(_Read):
    partition: NonNegativeInt
    train_loss: float | None = None
    """None for a site of a secure-sum round, whose loss is only in the round's summed `totals`."""
    bytes_down: NonNegativeInt
    bytes_up: NonNegativeInt


class _Combined(_Read):
    combined: dict[str, float] = {}


class _RoundRecord(_Read):
    round: NonNegativeInt
    communication: _Communication
    evaluation: dict[str, float | dict[str, float]]
    train_loss: float | None = None
    clients: list[_Client] = []
    ranks: dict[str, NonNegativeInt] = {}
    federated_evaluation: _Combined | None = None


def check_round_record(record: object) -> str | None:
    """Why a stored metrics record could not be a run's (a field the summary or the plots read is
    missing or not a number of its kind), or None. Infinite losses are a run's own result, and pass."""
    try:
        _RoundRecord.model_validate(record)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg'].lower()}" if where else first["msg"].lower()
    return None


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
