"""A node's side of the secure sum: a state machine that answers each stage's message once, in order.

The node refuses (ProtocolRefused) whatever would let the server learn more than the sum: a
threshold at or below half of the participants (two disjoint groups could then each unmask), an
unmask request that asks for both the seed and the mask key of one node, or that leaves out a node
this one masked with, and any message out of order or replayed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from florist.federation.secure_sum.masks import mask, pairwise_key, signed_pairwise_mask
from florist.federation.secure_sum.protocol import (
    COLLECT,
    SETUP,
    SHARE,
    UNMASK,
    EncryptedShares,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    ProtocolRefused,
    PublicKeys,
    Setup,
    UnmaskRequest,
    UnmaskShares,
)
from florist.federation.secure_sum.quantization import Quantizer
from florist.federation.secure_sum.signing import NodeSigning


def checked_setup(setup: Setup) -> Quantizer:
    """The setup's quantiser, once its threshold and sizes keep the sum secret and exact."""
    count = len(setup.nodes)
    if not count // 2 < setup.threshold <= count:
        raise ProtocolRefused(f"a threshold of {setup.threshold} for {count} nodes is not above half of them")
    if not 1 <= setup.bits <= 31 or not setup.clip_range > 0:
        raise ProtocolRefused(f"quantisation to {setup.bits} bits over ±{setup.clip_range:g} is outside 1..31 bits and a positive range")
    quantizer = Quantizer(setup.clip_range, setup.bits)
    if count > quantizer.most_inputs():
        raise ProtocolRefused(f"the sum of {count} inputs of {setup.bits} bits overflows the modulus 2**32")
    return quantizer


@dataclass
class SecureSumNode:
    node: int
    session: int = -1
    expects: str = SETUP
    """The stage whose message the node answers next; "" once the sum is done."""
    setup: Setup | None = None
    mask_private: bytes = b""
    share_private: bytes = b""
    directory: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    seed: bytes = b""
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    """Per node (this one included), its share of that node's self-mask seed held here."""
    key_shares: dict[int, bytes] = field(default_factory=dict)
    """Per node (this one included), its share of that node's mask key held here."""
    masked_with: list[int] = field(default_factory=list)
    signing: NodeSigning | None = None
    """This site's signing key and the node keys it trusts; None: unsigned keys, no directory checked."""

    def _stage(self, stage: str, session: int) -> None:
        if session != self.session:
            raise ProtocolRefused(f"a message for secure sum {session}, not {self.session}")
        if stage != self.expects:
            raise ProtocolRefused(f"a {stage!r} message where node {self.node} expects {self.expects or 'none (the sum is done)'!r}")

    def answer_setup(self, setup: Setup) -> PublicKeys:
        """A fresh sum (a session after any this node took part in): two fresh key pairs."""
        if setup.session <= self.session:
            raise ProtocolRefused(f"a setup for secure sum {setup.session}, which is not after {self.session}")
        if self.node not in setup.nodes:
            raise ProtocolRefused(f"a setup whose participants leave out node {self.node}")
        checked_setup(setup)
        mask_private, mask_public = generate_key_pairs()
        share_private, share_public = generate_key_pairs()
        fresh = SecureSumNode(
            self.node, setup.session, SHARE, setup, private_key_to_bytes(mask_private), private_key_to_bytes(share_private), signing=self.signing
        )
        vars(self).update(vars(fresh))  # nothing of an earlier sum carries over
        keys = PublicKeys(setup.session, public_key_to_bytes(mask_public), public_key_to_bytes(share_public))
        if self.signing is None:
            return keys
        signature = self.signing.sign(setup.session, self.node, keys.mask_key, keys.share_key)
        return PublicKeys(keys.session, keys.mask_key, keys.share_key, self.signing.public_key, signature)

    def answer_directory(self, directory: KeyDirectory) -> EncryptedShares:
        """Shamir shares of a fresh self-mask seed and of the mask key, one per node of the directory,
        each encrypted with the key agreed with its recipient."""
        self._stage(SHARE, directory.session)
        keys = directory.keys
        unknown = set(keys) - set(self.setup.nodes)
        if unknown:
            raise ProtocolRefused(f"the key directory names nodes outside the setup: {sorted(unknown)}")
        if len(keys) < self.setup.threshold:
            raise ProtocolRefused(f"the key directory holds {len(keys)} nodes, below the threshold {self.setup.threshold}")
        own = public_key_to_bytes(bytes_to_private_key(self.mask_private).public_key()), public_key_to_bytes(
            bytes_to_private_key(self.share_private).public_key()
        )
        if keys.get(self.node) != own:
            raise ProtocolRefused(f"the key directory does not hold node {self.node}'s own public keys")
        every = [key for pair in keys.values() for key in pair]
        if len(set(every)) != len(every):
            raise ProtocolRefused("the key directory repeats a public key")
        if self.signing is not None:
            self.signing.check(directory)
        self.seed = os.urandom(32)
        seed_shares = create_shares(self.seed, self.setup.threshold, len(keys))
        key_shares = create_shares(self.mask_private, self.setup.threshold, len(keys))
        ciphertexts = {}
        for index, (node, (_, share_public)) in enumerate(keys.items()):
            if node == self.node:
                self.seed_shares[node], self.key_shares[node] = seed_shares[index], key_shares[index]
                continue
            shared = generate_shared_key(bytes_to_private_key(self.share_private), bytes_to_public_key(share_public))
            ciphertexts[node] = encrypt(shared, share_keys_plaintext_concat(self.node, node, seed_shares[index], key_shares[index]))
        self.directory, self.expects = dict(keys), COLLECT
        return EncryptedShares(self.session, ciphertexts)

    def answer_collect(self, forwarded: ForwardedShares, tensors: Mapping[str, torch.Tensor]) -> MaskedInput:
        """This node's input encoded (quantization.py), plus its self mask and a pairwise mask with every node whose
        shares reached it, mod 2**32."""
        self._stage(COLLECT, forwarded.session)
        sources = forwarded.ciphertexts
        if self.node in sources or not set(sources) <= set(self.directory):
            raise ProtocolRefused("forwarded shares come from this node itself or from nodes outside the key directory")
        if len(sources) + 1 < self.setup.threshold:
            raise ProtocolRefused(f"shares from {len(sources)} other nodes, below the threshold {self.setup.threshold} with this one")
        for source, ciphertext in sources.items():
            shared = generate_shared_key(bytes_to_private_key(self.share_private), bytes_to_public_key(self.directory[source][1]))
            try:
                origin, destination, seed_share, key_share = share_keys_plaintext_separate(decrypt(shared, ciphertext))
            except Exception:
                raise ProtocolRefused(f"the shares forwarded from node {source} cannot be decrypted") from None
            if (origin, destination) != (source, self.node):
                raise ProtocolRefused(f"shares forwarded as from node {source} to {self.node} were sent by {origin} to {destination}")
            self.seed_shares[source], self.key_shares[source] = seed_share, key_share
        layout = self.setup.layout
        vector = layout.encode(tensors, checked_setup(self.setup), len(self.setup.nodes))
        vector += mask(self.seed, layout.size)
        private = bytes_to_private_key(self.mask_private)
        for other in sources:
            vector += signed_pairwise_mask(self.node, other, pairwise_key(private, bytes_to_public_key(self.directory[other][0])), layout.size)
        self.masked_with, self.expects = sorted(sources), UNMASK
        return MaskedInput(self.session, vector)

    def answer_unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Shares of the survivors' seeds and of the dropped nodes' mask keys, never both of one node."""
        self._stage(UNMASK, request.session)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ProtocolRefused(f"the unmask request names nodes as both survivors and dropped: {sorted(survivors & dropped)}")
        if self.node not in survivors:
            raise ProtocolRefused(f"the unmask request does not count node {self.node} among the survivors")
        if survivors | dropped != set(self.masked_with) | {self.node}:
            raise ProtocolRefused("the unmask request's survivors and dropped nodes are not the nodes this one masked with")
        if len(survivors) < self.setup.threshold:
            raise ProtocolRefused(f"{len(survivors)} survivors, below the threshold {self.setup.threshold}")
        shares = {node: self.seed_shares[node] for node in request.survivors} | {node: self.key_shares[node] for node in request.dropped}
        self.expects = ""
        return UnmaskShares(self.session, shares)
