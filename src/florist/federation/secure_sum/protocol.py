"""The secure sum's messages, typed, and how each is written to and read from a Flower record.

Stages, each one round trip (server -> every node still taking part -> server):
  setup    Setup            -> PublicKeys       the participants, the threshold and the quantisation
  share    KeyDirectory     -> EncryptedShares  every public key; each node's Shamir shares, encrypted per recipient
  collect  ForwardedShares  -> MaskedInput      the shares addressed to the node; its masked, quantised input
  unmask   UnmaskRequest    -> UnmaskShares     who survived and who dropped; the shares that remove the masks

Reading checks types and sizes only; what a value means for the protocol, each side's state
machine checks. Node ids travel as decimal strings: Flower's are unsigned 64-bit integers. An empty
list is left out of its record (Flower 1.42's `ConfigRecord.count_bytes` fails on one), and a list
that is absent reads as empty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord

from florist.federation.secure_sum.quantization import Layout

STAGE = "secure-stage"
SETUP, SHARE, COLLECT, UNMASK = "setup", "share", "collect", "unmask"
STAGES = (SETUP, SHARE, COLLECT, UNMASK)
COUNT = "count"


class ProtocolRefused(ValueError):
    """A message that breaks the protocol; the message is the whole, one-line reason."""


class SecureSumFailed(RuntimeError):
    """The secure sum cannot be formed: too few nodes took part at some stage."""


def _node(value: str) -> int:
    if not isinstance(value, str) or not value.isdigit() or int(value) >= 2**64:
        raise ProtocolRefused(f"node id {value!r} is not an unsigned 64-bit integer")
    return int(value)


def _nodes(values: list) -> list[int]:
    nodes = [_node(value) for value in values]
    if len(set(nodes)) != len(nodes):
        raise ProtocolRefused("a node list names a node twice")
    return nodes


def _list(record: ConfigRecord, key: str) -> list:
    return _field(record, key, list) if key in record else []


def _record(fields: dict) -> ConfigRecord:
    return ConfigRecord({key: value for key, value in fields.items() if not (isinstance(value, list) and not value)})


def _by_node(record: ConfigRecord, nodes_key: str, values_key: str) -> dict[int, bytes]:
    nodes, values = _list(record, nodes_key), _list(record, values_key)
    if len(nodes) != len(values) or not all(isinstance(value, bytes) for value in values):
        raise ProtocolRefused(f"{values_key} does not hold one byte string per node of {nodes_key}")
    return dict(zip(_nodes(nodes), values, strict=True))


def _field(record: ConfigRecord, key: str, kind: type):
    if key not in record:
        raise ProtocolRefused(f"the secure-sum message lacks {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolRefused(f"the secure-sum message's {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _entry(layout: Layout, name: str, shape: tuple[int, ...]) -> list:
    """A layout entry as the setup carries it: [name, shape], and "count" for a count (quantization.py)."""
    return [name, list(shape)] + ([COUNT] if name in layout.counts else [])


def stage_of(record: ConfigRecord) -> str:
    stage = _field(record, STAGE, str)
    if stage not in STAGES:
        raise ProtocolRefused(f"unknown secure-sum stage {stage!r}")
    return stage


def _expect(record: ConfigRecord, stage: str) -> None:
    got = stage_of(record)
    if got != stage:
        raise ProtocolRefused(f"a {got!r} message where the secure sum expects {stage!r}")


# -- server to node -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    session: int
    """The round the sum belongs to: every message of the sum names it."""
    nodes: list[int]
    threshold: int
    clip_range: float
    bits: int
    layout: Layout

    def record(self) -> ConfigRecord:
        return _record({
            STAGE: SETUP, "session": self.session, "nodes": [str(n) for n in self.nodes], "threshold": self.threshold,
            "clip-range": self.clip_range, "bits": self.bits, "layout": json.dumps([_entry(self.layout, name, shape) for name, shape in self.layout.shapes]),
        })

    @classmethod
    def read(cls, record: ConfigRecord) -> Setup:
        _expect(record, SETUP)
        try:
            entries = json.loads(_field(record, "layout", str))
            shapes = tuple((str(name), tuple(int(d) for d in shape)) for name, shape, *_ in entries)
            counts = tuple(str(name) for name, _, *kind in entries if kind == [COUNT])
            if any(kind not in ([], [COUNT]) for _, _, *kind in entries):
                raise ValueError(f"an entry's kind is not {COUNT!r}")
            layout = Layout(shapes, counts)
        except (ValueError, TypeError) as error:
            raise ProtocolRefused(f"the secure-sum layout cannot be read ({error})") from None
        return cls(
            _field(record, "session", int), _nodes(_list(record, "nodes")), _field(record, "threshold", int),
            _field(record, "clip-range", float), _field(record, "bits", int), layout,
        )


@dataclass(frozen=True)
class KeyDirectory:
    session: int
    keys: dict[int, tuple[bytes, bytes]]
    """Per node that answered the setup, its public keys: (mask agreement, share encryption)."""
    signatures: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """Per node that signed its keys (secure_sum/signing.py): (its signing public key, the signature)."""

    def record(self) -> ConfigRecord:
        nodes, signed = list(self.keys), list(self.signatures)
        return _record({
            STAGE: SHARE, "session": self.session, "nodes": [str(n) for n in nodes],
            "mask-keys": [self.keys[n][0] for n in nodes], "share-keys": [self.keys[n][1] for n in nodes],
            "signed-nodes": [str(n) for n in signed],
            "signers": [self.signatures[n][0] for n in signed], "signatures": [self.signatures[n][1] for n in signed],
        })

    @classmethod
    def read(cls, record: ConfigRecord) -> KeyDirectory:
        _expect(record, SHARE)
        masks, shares = _by_node(record, "nodes", "mask-keys"), _by_node(record, "nodes", "share-keys")
        signers, signatures = _by_node(record, "signed-nodes", "signers"), _by_node(record, "signed-nodes", "signatures")
        return cls(
            _field(record, "session", int), {node: (masks[node], shares[node]) for node in masks},
            {node: (signers[node], signatures[node]) for node in signers},
        )


@dataclass(frozen=True)
class ForwardedShares:
    session: int
    ciphertexts: dict[int, bytes]
    """Per source node, its shares for this node, encrypted for it."""

    def record(self) -> ConfigRecord:
        return _record({
            STAGE: COLLECT, "session": self.session, "sources": [str(n) for n in self.ciphertexts], "ciphertexts": list(self.ciphertexts.values()),
        })

    @classmethod
    def read(cls, record: ConfigRecord) -> ForwardedShares:
        _expect(record, COLLECT)
        return cls(_field(record, "session", int), _by_node(record, "sources", "ciphertexts"))


@dataclass(frozen=True)
class UnmaskRequest:
    session: int
    survivors: list[int]
    """Nodes whose masked input the server holds: it asks for shares of their self-mask seeds."""
    dropped: list[int]
    """Nodes that shared keys but sent no masked input: it asks for shares of their mask keys."""

    def record(self) -> ConfigRecord:
        return _record({
            STAGE: UNMASK, "session": self.session, "survivors": [str(n) for n in self.survivors], "dropped": [str(n) for n in self.dropped],
        })

    @classmethod
    def read(cls, record: ConfigRecord) -> UnmaskRequest:
        _expect(record, UNMASK)
        return cls(_field(record, "session", int), _nodes(_list(record, "survivors")), _nodes(_list(record, "dropped")))


# -- node to server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKeys:
    session: int
    mask_key: bytes
    share_key: bytes
    signer: bytes = b""
    """The node's signing public key (PEM), or empty: the keys are unsigned."""
    signature: bytes = b""
    """Its signature over (session, node id, both keys), secure_sum/signing.py."""

    def record(self) -> ConfigRecord:
        signed = {"signer": self.signer, "signature": self.signature} if self.signer else {}
        return _record({STAGE: SETUP, "session": self.session, "mask-key": self.mask_key, "share-key": self.share_key} | signed)

    @classmethod
    def read(cls, record: ConfigRecord) -> PublicKeys:
        _expect(record, SETUP)
        keys = _field(record, "session", int), _field(record, "mask-key", bytes), _field(record, "share-key", bytes)
        if "signer" not in record and "signature" not in record:
            return cls(*keys)
        return cls(*keys, _field(record, "signer", bytes), _field(record, "signature", bytes))


@dataclass(frozen=True)
class EncryptedShares:
    session: int
    ciphertexts: dict[int, bytes]
    """Per destination node, this node's shares for it, encrypted for it."""

    def record(self) -> ConfigRecord:
        return _record({
            STAGE: SHARE, "session": self.session, "destinations": [str(n) for n in self.ciphertexts], "ciphertexts": list(self.ciphertexts.values()),
        })

    @classmethod
    def read(cls, record: ConfigRecord) -> EncryptedShares:
        _expect(record, SHARE)
        return cls(_field(record, "session", int), _by_node(record, "destinations", "ciphertexts"))


@dataclass(frozen=True)
class MaskedInput:
    session: int
    vector: np.ndarray
    """uint32, the layout's size."""

    def record(self) -> ConfigRecord:
        return _record({STAGE: COLLECT, "session": self.session, "vector": self.vector.astype("<u4").tobytes()})

    @classmethod
    def read(cls, record: ConfigRecord) -> MaskedInput:
        _expect(record, COLLECT)
        raw = _field(record, "vector", bytes)
        if len(raw) % 4:
            raise ProtocolRefused(f"a masked input of {len(raw)} bytes is not a whole number of uint32 values")
        return cls(_field(record, "session", int), np.frombuffer(raw, dtype="<u4").astype(np.uint32))


@dataclass(frozen=True)
class UnmaskShares:
    session: int
    shares: dict[int, bytes]
    """Per node asked about, this node's share of its seed (a survivor) or of its mask key (dropped)."""

    def record(self) -> ConfigRecord:
        return _record({STAGE: UNMASK, "session": self.session, "nodes": [str(n) for n in self.shares], "shares": list(self.shares.values())})

    @classmethod
    def read(cls, record: ConfigRecord) -> UnmaskShares:
        _expect(record, UNMASK)
        return cls(_field(record, "session", int), _by_node(record, "nodes", "shares"))
