"""What travels between the server and a node, in one place: record names and their fields.

An instruction (train or evaluate) holds `config` (the round, the shared settings and their
fingerprint, the server's model digest, and the digests of the chain of merged updates 1..t-1),
plus the payloads the node lacks: `update:<i>` for merged updates, `global` for the adapter a
client continues from. The shared settings are all a node takes from the server's configuration.

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
    settings: dict
    """The shared settings (`RunConfig.shared_settings`), which `fingerprint` covers."""

    def record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": self.round,
                "chain": ",".join(self.chain),
                "fingerprint": self.fingerprint,
                "model-digest": self.model_digest,
                "settings": json.dumps(self.settings, sort_keys=True),
            }
        )

    @classmethod
    def read(cls, message: Message) -> Instruction:
        record = message.content[CONFIG]
        chain = str(record["chain"])
        settings = json.loads(str(record["settings"]))
        if not isinstance(settings, dict):
            raise ValueError(f"settings are a JSON {type(settings).__name__}, not an object")
        return cls(int(record["round"]), chain.split(",") if chain else [], str(record["fingerprint"]), str(record["model-digest"]), settings)


def status_of(reply: Message) -> str:
    return str(reply.content[IDENTITY]["status"])


def instruction_content(instruction: Instruction) -> RecordDict:
    return RecordDict({CONFIG: instruction.record()})
