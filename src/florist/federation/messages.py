"""What travels between the server and a node, in one place: record names and their fields.

An instruction (train or evaluate) holds `config` (the round, the shared settings and their
fingerprint, the server's model digest, and the digests of the chain of merged updates 1..t-1),
plus the payloads the node lacks: `update:<i>` for merged updates, `global` for the adapter a
client continues from. The shared settings are all a node takes from the server's configuration.

A reply holds `identity` (the node's fingerprint, settings and model digest, and the reply's
status) and `metrics`; a trained reply also holds the `adapter`. A node whose chain has a gap
replies `gap` with the first update it lacks; one whose settings or base model differ from
the server's replies `mismatch` without training.

The server decodes a reply once (`Reply.read`) and trusts none of it: every field it reads has
a type and a bound, and a reply that breaks one is `Malformed`, naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

CONFIG = "config"
IDENTITY = "identity"
METRICS = "metrics"
ADAPTER = "adapter"
GLOBAL = "global"
UPDATE_PREFIX = "update:"
CANDIDATE = "candidate"
"""Automatic tau: the round's exact update, whose cuts a node scores."""
CUTS = "cuts"
SECURE_SUM = "secure-sum"
"""privacy.secure_aggregation: the record of a secure-sum message, both ways (the setup's rides in the
train instruction, and an evaluation sums' in the evaluate instruction)."""
SECURE_SUM_ACTION = "secure_sum"
SECURE_SUM_TYPE = f"{MessageType.TRAIN}.{SECURE_SUM_ACTION}"
"""The message type of the secure sum's later stages (share, collect, unmask), a training sum's or an
evaluation's (the session tells them apart, secure_site.sum_state): the ClientApp's train action `secure_sum`."""

TRAINED, GAP, MISMATCH, EVALUATED, SCORED = "trained", "gap", "mismatch", "evaluated", "scored"

MAX_TEXT = 1024
"""Characters of a string a node sends (a status, a digest, a metric's name), its settings aside."""
MAX_SETTINGS_TEXT = 2**20
"""Characters of a node's settings JSON: a thousand times what florist's settings take."""
MAX_SETTINGS_DEPTH = 16
"""Nesting of a node's settings JSON; florist's are two deep."""
MAX_METRICS = 4096
"""Entries of a reply's metrics: the most florist's evaluation sends is about 70 (MMLU's subjects)."""
MAX_MAGNITUDE = 1e300
"""The largest magnitude of a float metric: beyond any score, and far enough below float's
largest that a weighted mean of any number of them stays finite."""
MAX_INTEGER = 2**63 - 1
"""The largest integer metric: what Flower's records carry (int64)."""


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
        """The identity a node sends, or `Malformed` naming the field that is missing, not text, too
        long, or (its settings) not a JSON object of at most MAX_SETTINGS_DEPTH levels."""
        text = _text(record, "settings", MAX_SETTINGS_TEXT)
        try:
            settings = json.loads(text)
        except RecursionError:
            raise Malformed("identity settings are nested too deeply") from None
        except ValueError as error:
            raise Malformed(f"identity settings are not JSON ({error})") from None
        if not isinstance(settings, dict):
            raise Malformed(f"identity settings are a JSON {type(settings).__name__}, not an object")
        if _depth(settings) > MAX_SETTINGS_DEPTH:
            raise Malformed(f"identity settings are nested more than {MAX_SETTINGS_DEPTH} levels deep")
        return cls(_text(record, "fingerprint"), settings, _text(record, "model-digest"))


@dataclass(frozen=True)
class Instruction:
    """The config record of a train or evaluate instruction, as the node reads it."""

    round: int
    chain: list[str]
    fingerprint: str
    model_digest: str
    settings: dict
    """The shared settings (`RunConfig.shared_settings`), which `fingerprint` covers."""

    @classmethod
    def of(cls, server_round: int, chain: list[str], identity: Identity) -> Instruction:
        """The server's instruction for a round whose nodes hold `chain`, under the server's identity."""
        return cls(server_round, chain, identity.fingerprint, identity.model_digest, identity.settings)

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


class Malformed(ValueError):
    """A reply the server cannot read; the message is the reason."""

    def __init__(self, what: str):
        super().__init__(f"malformed reply: {what}")


Metric = int | float


@dataclass(frozen=True)
class Reply:
    """A node's reply, decoded once: who it says it is, its status, the round and partition it
    answers for, and its metrics, each a number of magnitude at most MAX_MAGNITUDE."""

    identity: Identity
    status: str
    round: int
    partition: int
    metrics: dict[str, Metric]

    @classmethod
    def read(cls, message: Message) -> Reply:
        """The reply, or `Malformed` naming the first record or field that is missing, of the wrong
        type or out of its bounds."""
        identity = _record(message.content, IDENTITY, ConfigRecord)
        metrics = _metrics(_record(message.content, METRICS, MetricRecord))
        return cls(
            Identity.from_record(identity),
            _text(identity, "status"),
            _integer(metrics, "round", -MAX_INTEGER),
            _integer(metrics, "partition-id"),
            metrics,
        )

    def integer(self, key: str, low: int = 0, high: int = MAX_INTEGER) -> int:
        """Metric `key`, an integer in [low, high]."""
        return _integer(self.metrics, key, low, high)

    def number(self, key: str) -> float:
        """Metric `key`, an integer or a float."""
        if key not in self.metrics:
            raise Malformed(f"metric {key} is missing")
        return float(self.metrics[key])


def _record(content: RecordDict, key: str, kind: type) -> ConfigRecord | MetricRecord:
    if key not in content:
        raise Malformed(f"no {key} record")
    record = content[key]
    if not isinstance(record, kind):
        raise Malformed(f"the {key} record is a {type(record).__name__}, not a {kind.__name__}")
    return record


def _text(record: ConfigRecord, key: str, limit: int = MAX_TEXT) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise Malformed(f"identity {key} is {'missing' if value is None else f'a {type(value).__name__}'}, not text")
    if len(value) > limit:
        raise Malformed(f"identity {key} is {len(value)} characters long, above {limit}")
    return value


def _depth(value: object) -> int:
    """How deeply JSON containers nest in `value` (1: none), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _metrics(record: MetricRecord) -> dict[str, Metric]:
    if len(record) > MAX_METRICS:
        raise Malformed(f"{len(record)} metrics, above {MAX_METRICS}")
    metrics = {}
    for key, value in record.items():
        if len(key) > MAX_TEXT:
            raise Malformed(f"a metric's name is {len(key)} characters long, above {MAX_TEXT}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Malformed(f"metric {key} is a {type(value).__name__}, not a number")
        if isinstance(value, int) and not -MAX_INTEGER - 1 <= value <= MAX_INTEGER:
            raise Malformed(f"metric {key} is an integer of {value.bit_length()} bits, beyond the 64 Flower's records carry")
        if not abs(value) <= MAX_MAGNITUDE:  # NaN fails it too
            raise Malformed(f"metric {key} is {value!r}, not a finite number of magnitude at most {MAX_MAGNITUDE:g}")
        metrics[key] = value
    return metrics


def _integer(metrics: dict[str, Metric], key: str, low: int = 0, high: int = MAX_INTEGER) -> int:
    if key not in metrics:
        raise Malformed(f"metric {key} is missing")
    value = metrics[key]
    if not isinstance(value, int):
        raise Malformed(f"metric {key} is {value!r}, not an integer")
    if not low <= value <= high:
        raise Malformed(f"metric {key} is {value}, outside [{low}, {high}]")
    return value


def error_reason(message: Message) -> str:
    """The last line of an error reply's reason, or its code."""
    reason = str(message.error.reason or "").strip()
    return reason.splitlines()[-1] if reason else f"error code {message.error.code}"


def node_unavailable(message: Message) -> bool:
    """Whether this is the SuperLink's error for a node that missed its heartbeats. The SuperLink
    has dropped the instruction then, though the node, live but slow on a saturated machine, may
    still be working on it: its reply would be refused."""
    return message.has_error() and message.error.code == ErrorCode.NODE_UNAVAILABLE and message.metadata.src_node_id == SUPERLINK_NODE_ID


def instruction_content(instruction: Instruction) -> RecordDict:
    return RecordDict({CONFIG: instruction.record()})
