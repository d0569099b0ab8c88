"""A site's secure-sum signing material from its node config: the SuperNode's own OpenSSH node key
(made as the deployment tests make them) and a file of the federation's node public keys; each bad
file refused in one line naming the node-config key, never the path."""

from __future__ import annotations


import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from deployment import federation_keys
from florist.federation.node_config import Refused
from florist.federation.node_policy import NodePolicy
from florist.federation.node_signing import node_signing
from florist.federation.secure_sum import SecureSumNode, Setup
from florist.federation.secure_sum.protocol import KeyDirectory
from florist.federation.secure_sum.quantization import Layout


def test_node_keys_sign_and_the_peers_file_is_the_trusted_set(tmp_path):
    keys, peers = federation_keys(tmp_path, 3)
    signings = [node_signing({"secure-sum-key": str(key), "secure-sum-peers": str(peers)}) for key in keys]
    assert len(signings[0].trusted) == 3 and len({signing.public_key for signing in signings}) == 3
    # Two sites from node config, one secure sum's directory: each accepts the other's signed keys.
    setup = Setup(1, [1, 2], 2, 1.0, 20, Layout((("x", (1,)),)))
    nodes = {node: SecureSumNode(node, signing=signing) for node, signing in zip([1, 2], signings)}
    replies = {node: site.answer_setup(setup) for node, site in nodes.items()}
    directory = KeyDirectory(1, {n: (r.mask_key, r.share_key) for n, r in replies.items()}, {n: (r.signer, r.signature) for n, r in replies.items()})
    for node, site in nodes.items():
        assert set(site.answer_directory(directory).ciphertexts) == {1, 2} - {node}


def test_a_node_config_without_the_keys_signs_nothing_and_both_are_allowed_node_config_keys(tmp_path):
    assert node_signing({"partition-id": 0}) is None
    keys, peers = federation_keys(tmp_path, 1)
    NodePolicy.from_node_config({"partition-id": 0, "secure-sum-key": str(keys[0]), "secure-sum-peers": str(peers)})


def rsa_public_line() -> str:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("key alone", "node config secure-sum-key without secure-sum-peers: a site signs its secure-sum keys and checks its peers' together"),
        ("missing key file", "node config secure-sum-key: cannot read the file (No such file or directory)"),
        ("peers without own key", "node config secure-sum-peers does not hold this site's own public key (the one of secure-sum-key)"),
        ("garbage peer line", "node config secure-sum-peers line 2: not an OpenSSH key"),
        ("rsa peer", "node config secure-sum-peers line 2: a RSAPublicKey key, not an elliptic-curve (ECDSA) key"),
        ("not a path", "node config secure-sum-peers=7 is not a path"),
    ],
)
def test_bad_signing_material_is_refused_in_one_line_naming_the_key(tmp_path, case, reason):
    keys, peers = federation_keys(tmp_path, 2)
    own = keys[0].with_name(keys[0].name + ".pub").read_text()
    config = {"secure-sum-key": str(keys[0]), "secure-sum-peers": str(peers)}
    if case == "key alone":
        del config["secure-sum-peers"]
    elif case == "missing key file":
        config["secure-sum-key"] = str(tmp_path / "nowhere")
    elif case == "peers without own key":
        peers.write_text(keys[1].with_name(keys[1].name + ".pub").read_text())
    elif case == "garbage peer line":
        peers.write_text(own + "ecdsa-sha2-nistp384 AAAAnotbase64 x\n")
    elif case == "rsa peer":
        peers.write_text(own + rsa_public_line() + "\n")
    elif case == "not a path":
        config["secure-sum-peers"] = 7
    with pytest.raises(Refused) as refused:
        node_signing(config)
    message = str(refused.value)
    assert message.startswith(reason) and "\n" not in message and str(tmp_path) not in message
