"""A site's secure-sum signing material from its node config (`secure-sum-key`, `secure-sum-peers`):
the node key it signs its secure-sum public keys with, and the federation's node keys whose
signatures it accepts (federation/secure_sum/signing.py says what this protects against).

In deployment both are the SuperNodes' own authentication keys: `secure-sum-key` names the file given
as `--auth-supernode-private-key`, and `secure-sum-peers` a file of the federation's `.pub` lines (the
keys registered with `flwr supernode register`). Both files are read once per process (a changed
peers file takes effect when the SuperNode restarts). A bad file is refused in one line naming the
key, never the path (a refusal goes to the server).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from florist.federation.node_config import Refused
from florist.federation.secure_sum import NodeSigning

KEY, PEERS = "secure-sum-key", "secure-sum-peers"


def node_signing(node_config: Mapping[str, object]) -> NodeSigning | None:
    """The signing material the node config names, or None where it names none (keys go unsigned,
    and the node checks no peer's signature)."""
    given = [key for key in (KEY, PEERS) if key in node_config]
    if not given:
        return None
    if len(given) == 1:
        raise Refused(f"node config {given[0]} without {({KEY, PEERS} - set(given)).pop()}: a site signs its secure-sum keys and checks its peers' together")
    paths = []
    for key in (KEY, PEERS):
        value = node_config[key]
        if not isinstance(value, str) or not value:
            raise Refused(f"node config {key}={value!r} is not a path")
        paths.append(str(Path(value).expanduser().resolve()))
    return _loaded(*paths)


@lru_cache(maxsize=4)
def _loaded(key_path: str, peers_path: str) -> NodeSigning:
    private_key = _ssh_ec_key(KEY, load_ssh_private_key, _read(KEY, key_path), password=None)
    trusted = []
    for number, line in enumerate(_read(PEERS, peers_path).decode(errors="replace").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            trusted.append(_ssh_ec_key(f"{PEERS} line {number}", load_ssh_public_key, line.strip().encode()))
    try:
        return NodeSigning.of(private_key, trusted)
    except ValueError:
        raise Refused(f"node config {PEERS} does not hold this site's own public key (the one of {KEY})") from None


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise Refused(f"node config {key}: cannot read the file ({error.strerror or type(error).__name__})") from None


def _ssh_ec_key(where: str, load, data: bytes, **options):
    """The OpenSSH key in `data`, if it is an elliptic-curve key (what SuperNode authentication uses)."""
    try:
        key = load(data, **options)
    except (ValueError, TypeError) as error:
        raise Refused(f"node config {where}: not an OpenSSH key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        raise Refused(f"node config {where}: a {type(key).__name__.lstrip('_')} key, not an elliptic-curve (ECDSA) key")
    return key
