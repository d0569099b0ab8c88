"""What travels between the server and a node, in one place: record names and their fields.

An instruction (train or evaluate) holds `config` (the round, the server's fingerprint and
model digest, and the digests of the chain of merged updates 1..t-1), plus the payloads the
node lacks: `update:<i>` for merged updates, `global` for the adapter a client continues from.

A reply holds `identity` (the node's fingerprint, settings and model digest, and the reply's
status) and `metrics`; a trained reply also holds the `adapter`. A node whose chain has a gap
replies `gap` with the first update it lacks; one whose settings or base model differ from
the server's replies `mismatch` without training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict

CONFIG = "config"
IDENTITY = "identity"
METRICS = "metrics"
ADAPTER = "adapter"
GLOBAL = "global"
UPDATE_PREFIX = "update:"
CANDIDATE = "candidate"
"""Automatic tau: the round's exact update, whose cuts a node scores."""
CUTS = "cuts"

TRAINED, GAP, MISMATCH, EVALUATED, SCORED = "trained", "gap", "mismatch", "evaluated", "scored"


def update_key(index: int) -> str:
    """The payload key of merged update `index` (1-based: the update of round `index`)."""
    return f"{UPDATE_PREFIX}{index}"


@dataclass(frozen=True)
class Identity:
    """Who the sender says it is: a fingerprint of the settings it used, and its base model."""

    fingerprint: str
    settings: dict
    model_digest: str

    def record(self, status: str) -> ConfigRecord:
        return ConfigRecord(
            {
                "status": status,
                "fingerprint": self.fingerprint,
                "settings": json.dumps(self.settings, sort_keys=True),
                "model-digest": self.model_digest,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Identity:
        return cls(str(record["fingerprint"]), json.loads(str(record["settings"])), str(record["model-digest"]))


@dataclass(frozen=True)
class Instruction:
    """The config record of a train or evaluate instruction, as the node reads it."""

    round: int
    chain: list[str]
    fingerprint: str
    model_digest: str

    def record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": self.round,
                "chain": ",".join(self.chain),
                "fingerprint": self.fingerprint,
                "model-digest": self.model_digest,
            }
        )

    @classmethod
    def read(cls, message: Message) -> Instruction:
        record = message.content[CONFIG]
        chain = str(record["chain"])
        return cls(int(record["round"]), chain.split(",") if chain else [], str(record["fingerprint"]), str(record["model-digest"]))


class Malformed(ValueError):
    """A reply the server cannot read; the message is the reason."""


@dataclass(frozen=True)
class Reply:
    """A node's reply, decoded once: who it says it is, its status, the round and partition it
    answers for, and its metrics."""

    identity: Identity
    status: str
    round: int
    partition: int
    metrics: dict

    @classmethod
    def read(cls, message: Message) -> Reply:
        try:
            record = message.content[IDENTITY]
            metrics = dict(message.content[METRICS])
            return cls(Identity.from_record(record), str(record["status"]), int(metrics["round"]), int(metrics["partition-id"]), metrics)
        except (KeyError, ValueError, TypeError) as error:
            raise Malformed(f"malformed reply: {type(error).__name__}: {error}") from None

    def integer(self, key: str) -> int:
        try:
            return int(self.metrics[key])
        except (KeyError, ValueError, TypeError) as error:
            raise Malformed(f"malformed reply: {type(error).__name__}: {error}") from None

    def number(self, key: str) -> float:
        try:
            return float(self.metrics[key])
        except (KeyError, ValueError, TypeError) as error:
            raise Malformed(f"malformed reply: {type(error).__name__}: {error}") from None


def error_reason(message: Message) -> str:
    """The last line of an error reply's reason, or its code."""
    reason = (message.error.reason or "").strip()
    return reason.splitlines()[-1] if reason else f"error code {message.error.code}"


def instruction_content(instruction: Instruction) -> RecordDict:
    return RecordDict({CONFIG: instruction.record()})
