"""Secure summation (SecAgg+, Bell et al. 2020, as Flower's legacy workflow runs it) over florist's
Message API: the server learns the sum of the nodes' float tensors, and not one node's.

Each side is a small state machine over typed messages (`protocol`): the node's (`node`) and the
server's (`server`). The cryptography is Flower's and its libraries': elliptic-curve key pairs and
key agreement, Fernet encryption of the shares, Shamir secret sharing (`flwr.common.secure_aggregation`,
`flwr.supercore.primitives.asymmetric`); the masks are ChaCha20 keystreams (`masks`), and the
quantisation is Flower's stochastic one (`quantization`). Sites may sign their public keys with their
node keys and check each other's (`signing`), so that the server cannot stand in for one of them.
"""

from florist.federation.secure_sum.node import SecureSumNode
from florist.federation.secure_sum.protocol import (
    EncryptedShares,
    MaskedInput,
    ProtocolRefused,
    PublicKeys,
    SecureSumFailed,
    Setup,
    UnmaskRequest,
    UnmaskShares,
)
from florist.federation.secure_sum.quantization import Layout, Quantizer
from florist.federation.secure_sum.server import SecureSumServer
from florist.federation.secure_sum.signing import NodeSigning

__all__ = [
    "EncryptedShares",
    "Layout",
    "MaskedInput",
    "NodeSigning",
    "ProtocolRefused",
    "PublicKeys",
    "Quantizer",
    "SecureSumFailed",
    "SecureSumNode",
    "SecureSumServer",
    "Setup",
    "UnmaskRequest",
    "UnmaskShares",
]
