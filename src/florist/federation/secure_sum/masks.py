"""The masks: keystreams of ChaCha20 (the `cryptography` library) keyed by a node's random seed
(its self mask) or by the key two nodes agree on (their pairwise mask), read as uint32 values.

Flower's legacy workflow draws its masks from numpy's Mersenne Twister seeded with the key folded
to 32 bits (`secaggplus_utils.pseudo_rand_gen`): 2**32 seeds can be searched. A stream cipher's
keystream is a cryptographic generator over the whole 256-bit key.
"""

from __future__ import annotations

import base64

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key

NONCE = bytes(16)
"""Every key masks one vector once (seeds and key pairs are fresh per secure sum), so a fixed nonce
never repeats a keystream."""


def mask(key: bytes, size: int) -> np.ndarray:
    """`size` uniform uint32 values from the 32-byte `key`."""
    encryptor = Cipher(algorithms.ChaCha20(key, NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * size)), dtype=np.uint32).copy()


def pairwise_key(private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 32 bytes two nodes agree on (ECDH and HKDF, Flower's `generate_shared_key`)."""
    return base64.urlsafe_b64decode(generate_shared_key(private_key, public_key))


def signed_pairwise_mask(own: int, other: int, key: bytes, size: int) -> np.ndarray:
    """The mask `own` adds for the pair (`other` subtracts the same): the pair's masks cancel in the sum."""
    pair = mask(key, size)
    return pair if own > other else (-pair.astype(np.int64)).astype(np.uint32)
