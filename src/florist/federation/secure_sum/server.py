"""The server's side of the secure sum: a state machine that takes each node's message for the
current stage once, checked whole before it changes anything, and closes each stage only while
enough nodes remain: the threshold and `federation.min_sites`, whichever is more.

What the server holds at the end is the sum of the surviving nodes' inputs: their masked inputs
added, the survivors' self masks and the dropped nodes' pairwise masks removed with the shares.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

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
    SecureSumFailed,
    Setup,
    UnmaskRequest,
    UnmaskShares,
)
from florist.federation.secure_sum.quantization import Layout, Quantizer
from florist.federation.secure_sum.signing import signature_holds


def threshold_for(count: int, fraction: float, min_sites: int) -> int:
    """Shares needed to unmask a sum over `count` nodes: `fraction` of them, above half, and never
    below `min_sites`."""
    return min(count, max(min_sites, count // 2 + 1, math.ceil(fraction * count)))


class SecureSumServer:
    def __init__(self, session: int, nodes: list[int], threshold: int, min_sites: int, quantizer: Quantizer, layout: Layout):
        self.setup = Setup(session, list(nodes), threshold, quantizer.clip_range, quantizer.bits, layout)
        self.min_sites = min_sites
        self.quantizer = quantizer
        self.stage = SETUP
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.signatures: dict[int, tuple[bytes, bytes]] = {}
        """Per node that signed its keys: (signing public key, signature); the nodes judge whom they trust."""
        self.ciphertexts: dict[int, dict[int, bytes]] = {}
        """Per source node that shared its keys, its encrypted shares by destination."""
        self.masked: dict[int, np.ndarray] = {}
        self.unmask_shares: dict[int, dict[int, bytes]] = {}
        self.request: UnmaskRequest | None = None

    @property
    def session(self) -> int:
        return self.setup.session

    @property
    def needed(self) -> int:
        return max(self.setup.threshold, self.min_sites)

    def _take(self, stage: str, node: int, session: int, allowed, taken) -> None:
        """The checks every reply passes: the current stage, this sum, a node asked, its first reply."""
        if session != self.session:
            raise ProtocolRefused(f"a secure-sum reply for sum {session}, not {self.session}")
        if stage != self.stage:
            raise ProtocolRefused(f"a {stage!r} reply while the secure sum is at {self.stage!r}")
        if node not in allowed:
            raise ProtocolRefused(f"node {node} was not asked at the secure sum's {stage!r} stage")
        if node in taken:
            raise ProtocolRefused(f"node {node} already answered the secure sum's {stage!r} stage")

    def _close(self, stage: str, answered: int, next_stage: str) -> None:
        if answered < self.needed:
            raise SecureSumFailed(
                f"secure sum {self.session}: {answered} nodes answered its {stage!r} stage, below the "
                f"{self.needed} it needs (the threshold {self.setup.threshold}, federation.min_sites {self.min_sites}); not aggregated"
            )
        self.stage = next_stage

    # -- setup ---------------------------------------------------------------------------------

    def receive_keys(self, node: int, reply: PublicKeys) -> None:
        self._take(SETUP, node, reply.session, self.setup.nodes, self.keys)
        for key in (reply.mask_key, reply.share_key):
            try:
                bytes_to_public_key(key)
            except Exception:
                raise ProtocolRefused(f"node {node} sent a public key that is not an elliptic-curve key") from None
        used = {key for pair in self.keys.values() for key in pair}
        if reply.mask_key == reply.share_key or {reply.mask_key, reply.share_key} & used:
            raise ProtocolRefused(f"node {node} sent a public key already in use")
        if reply.signer:
            # Checked here too, so that one bad reply is refused alone instead of failing every signing peer's check.
            if not signature_holds(reply.signer, reply.signature, self.session, node, reply.mask_key, reply.share_key):
                raise ProtocolRefused(f"node {node}'s signature does not match its public keys")
            if reply.signer in (signer for signer, _ in self.signatures.values()):
                raise ProtocolRefused(f"node {node} signed with a key another node already signed with")
            self.signatures[node] = (reply.signer, reply.signature)
        self.keys[node] = (reply.mask_key, reply.share_key)

    def directory(self) -> KeyDirectory:
        """Close the setup stage: every node that answered gets every public key, and the signatures of those signed."""
        self._close(SETUP, len(self.keys), SHARE)
        return KeyDirectory(self.session, dict(self.keys), dict(self.signatures))

    # -- share keys ----------------------------------------------------------------------------

    def receive_shares(self, node: int, reply: EncryptedShares) -> None:
        self._take(SHARE, node, reply.session, self.keys, self.ciphertexts)
        expected = set(self.keys) - {node}
        if set(reply.ciphertexts) != expected:
            strange, missing = sorted(set(reply.ciphertexts) - expected), sorted(expected - set(reply.ciphertexts))
            wrong = ([f"for nodes outside the directory {strange}"] if strange else []) + ([f"none for {missing}"] if missing else [])
            raise ProtocolRefused(f"node {node} sent shares {' and '.join(wrong)}")
        self.ciphertexts[node] = dict(reply.ciphertexts)

    def forwarded(self) -> dict[int, ForwardedShares]:
        """Close the share stage: each node that shared gets the shares addressed to it by the others that did."""
        self._close(SHARE, len(self.ciphertexts), COLLECT)
        return {
            node: ForwardedShares(self.session, {source: sent[node] for source, sent in self.ciphertexts.items() if source != node})
            for node in self.ciphertexts
        }

    # -- collect masked input ------------------------------------------------------------------

    def receive_masked(self, node: int, reply: MaskedInput) -> None:
        self._take(COLLECT, node, reply.session, self.ciphertexts, self.masked)
        if reply.vector.size != self.setup.layout.size:
            raise ProtocolRefused(f"node {node} sent a masked input of {reply.vector.size} values, not {self.setup.layout.size}")
        self.masked[node] = reply.vector

    def unmask_request(self) -> UnmaskRequest:
        """Close the collect stage: the nodes that sent a masked input are asked for the shares."""
        self._close(COLLECT, len(self.masked), UNMASK)
        survivors = sorted(self.masked)
        self.request = UnmaskRequest(self.session, survivors, sorted(set(self.ciphertexts) - set(survivors)))
        return self.request

    # -- unmask --------------------------------------------------------------------------------

    def receive_unmask(self, node: int, reply: UnmaskShares) -> None:
        self._take(UNMASK, node, reply.session, self.request.survivors, self.unmask_shares)
        asked = set(self.request.survivors) | set(self.request.dropped)
        if set(reply.shares) != asked:
            raise ProtocolRefused(f"node {node} sent shares for nodes {sorted(reply.shares)}, not the {len(asked)} nodes asked")
        lengths = {len(share) for share in reply.shares.values()}
        if min(lengths) <= 4 or any((length - 4) % 16 for length in lengths):
            raise ProtocolRefused(f"node {node} sent shares whose sizes are not Shamir shares")
        self.unmask_shares[node] = dict(reply.shares)

    def result(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The sum of the survivors' inputs (float64) and the survivors; raises SecureSumFailed if fewer
        than the threshold sent shares."""
        answered = len(self.unmask_shares)
        if answered < self.setup.threshold:
            raise SecureSumFailed(
                f"secure sum {self.session}: {answered} nodes sent unmasking shares, below the threshold {self.setup.threshold}; not aggregated"
            )
        self.stage = ""
        size = self.setup.layout.size
        total = np.zeros(size, dtype=np.uint32)
        for vector in self.masked.values():
            total += vector
        for survivor in self.request.survivors:
            total -= mask(self._reconstruct(survivor), size)
        for dropped in self.request.dropped:
            private = bytes_to_private_key(self._reconstruct(dropped))
            for survivor in self.request.survivors:
                key = pairwise_key(private, bytes_to_public_key(self.keys[survivor][0]))
                total -= signed_pairwise_mask(survivor, dropped, key, size)
        survivors = self.request.survivors
        return self.setup.layout.decode_sum(total, len(survivors), self.quantizer), survivors

    def _reconstruct(self, node: int) -> bytes:
        # Any `threshold` shares determine the secret; Shamir's combination is quadratic in the shares given.
        holders = list(self.unmask_shares.values())[: self.setup.threshold]
        try:
            return combine_shares([shares[node] for shares in holders])
        except ValueError:
            raise SecureSumFailed(f"secure sum {self.session}: the shares for node {node} do not combine; not aggregated") from None
