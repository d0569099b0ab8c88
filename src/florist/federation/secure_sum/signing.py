"""Signed public keys: each site signs the two key-agreement keys it advertises for a secure sum with
a long-term signing key, and checks every peer's signature in the key directory against the keys it
was told to trust, so that a server cannot swap a site's keys for its own.

Without signatures the server is the only channel between the sites: it could hand every peer key
pairs of its own in place of site X's, agree X's pairwise masks and share keys with each of them,
and unmask X's input alone (a man in the middle). With them a directory entry counts only if its
keys carry a signature, over (the sum's session, the node id, both keys), by one of the trusted keys.

How a node id is bound to a key: by the signature, not by a registry. Flower's node ids are the
SuperLink's to assign, so a site cannot know a peer's id in advance; what it knows is the
federation's set of node public keys (in deployment the SuperNodes' authentication keys,
`--auth-supernode-private-key`, whose public halves are registered with the SuperLink). A valid
signature proves the entry was made by the holder of a trusted key for that session and node id;
two entries signed with one key are refused (one site, one vote in the threshold).

What a malicious server can still do: leave sites out (of the directory, of the forwarded shares,
or at unmasking as "dropped"; the threshold and `federation.min_sites` bound how few remain),
refuse to finish, and replay an old entry of a site: harmless, as it does not hold that entry's
private keys either. What it cannot do: put keys of its own under a trusted site's name, or under
any node id without one of the trusted signing keys. A site that signs but is not in the trusted
set of its peers is refused by them, as is an unsigned entry; a node given no signing material
(`SecureSumNode(node_id)`, the inline engine) checks no signature and trusts the server for this.

The signatures are ECDSA with SHA-256 (`flwr.supercore.primitives.asymmetric`); keys travel as PEM
SubjectPublicKeyInfo, one encoding, so a trusted key matches byte for byte.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes, sign_message, verify_signature

from florist.federation.secure_sum.protocol import KeyDirectory, ProtocolRefused

PURPOSE = "florist secure-sum public keys, v1"
"""Written into every signed message, so that a signature made here means nothing elsewhere."""


def signed_message(session: int, node: int, mask_key: bytes, share_key: bytes) -> bytes:
    """What a site signs: unambiguous bytes of (purpose, session, node id, both public keys)."""
    fields = [PURPOSE, session, str(node), base64.b64encode(mask_key).decode(), base64.b64encode(share_key).decode()]
    return json.dumps(fields).encode()


def signature_holds(signer: bytes, signature: bytes, session: int, node: int, mask_key: bytes, share_key: bytes) -> bool:
    """Whether `signature` by the public key `signer` (PEM) is over this entry; False for a signer that is not an EC key."""
    try:
        public_key = bytes_to_public_key(signer)
    except (ValueError, TypeError):
        return False
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    return verify_signature(public_key, signed_message(session, node, mask_key, share_key), signature)


@dataclass(frozen=True)
class NodeSigning:
    """A site's signing material: its own signing key, and the public keys of the federation's
    nodes (its own among them) whose signatures it accepts."""

    private_key: ec.EllipticCurvePrivateKey
    trusted: frozenset[bytes]
    """PEM SubjectPublicKeyInfo of each trusted node key."""

    @classmethod
    def of(cls, private_key: ec.EllipticCurvePrivateKey, trusted: Iterable[ec.EllipticCurvePublicKey]) -> NodeSigning:
        signing = cls(private_key, frozenset(public_key_to_bytes(key) for key in trusted))
        if signing.public_key not in signing.trusted:
            raise ValueError("the trusted node keys do not hold this node's own signing key")
        return signing

    @property
    def public_key(self) -> bytes:
        return public_key_to_bytes(self.private_key.public_key())

    def sign(self, session: int, node: int, mask_key: bytes, share_key: bytes) -> bytes:
        return sign_message(self.private_key, signed_message(session, node, mask_key, share_key))

    def check(self, directory: KeyDirectory) -> None:
        """Refuse (ProtocolRefused, naming the node) a directory with an entry that is unsigned,
        signed by an untrusted key, or whose signature is not over its keys."""
        session = directory.session
        stray = sorted(set(directory.signatures) - set(directory.keys))
        if stray:
            raise ProtocolRefused(f"secure sum {session}: the key directory holds signatures for nodes without keys: {stray}")
        for node, (mask_key, share_key) in directory.keys.items():
            if node not in directory.signatures:
                raise ProtocolRefused(f"secure sum {session}: node {node}'s public keys are unsigned, and this node accepts only keys signed by secure-sum-peers")
            signer, signature = directory.signatures[node]
            if signer not in self.trusted:
                raise ProtocolRefused(f"secure sum {session}: node {node}'s public keys are signed by a key outside secure-sum-peers")
            if not signature_holds(signer, signature, session, node, mask_key, share_key):
                raise ProtocolRefused(f"secure sum {session}: node {node}'s signature does not match its public keys in the directory (replaced on the way?)")
        uses = Counter(signer for signer, _ in directory.signatures.values())
        shared = [node for node, (signer, _) in directory.signatures.items() if uses[signer] > 1]
        if shared:
            raise ProtocolRefused(f"secure sum {session}: nodes {sorted(shared)} are signed with one and the same key")
