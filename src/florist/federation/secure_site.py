"""A site's side of a secure round (privacy.secure_aggregation): its secure-sum node kept in the
node's Context state between messages, and its answer to each stage of the protocol.

The site trains at the setup stage, which is the round's train instruction: it trains as without
the protocol, sketches its update (federation/sketch_round.py's `site_upload`), keeps the upload in its
state and answers with its public keys. The gap and resend machinery, the node's policy and the
check of the server's settings all apply to that instruction as to any train instruction, and a
site that fails to train is simply not among the sum's participants. The later stages
(messages.SECURE_SUM_TYPE: share, collect, unmask) are answered from the state alone: no model is loaded
for them, and a site holds its upload until it masks it at the collect stage, then forgets it.

A site whose node config names `secure-sum-key` and `secure-sum-peers` signs its public keys and
checks every peer's in the key directory (federation/node_signing.py, secure_sum/signing.py).

The state holds the node's private keys and its shares of the others' secrets: it stays on the
node (Flower keeps a SuperNode's Context state in its own process; the site worker hands it back
with each reply). A protocol message for which the state holds no pending sum is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from florist.config import RunConfig
from florist.federation.messages import SECURE_SUM
from florist.federation.node_config import Refused
from florist.federation.node_signing import node_signing
from florist.federation.secure_sum import (
    ProtocolRefused,
    PublicKeys,
    Quantizer,
    SecureSumNode,
    Setup,
    UnmaskRequest,
)
from florist.federation.secure_sum.protocol import COLLECT, SHARE, UNMASK, ForwardedShares, KeyDirectory, stage_of

NODE_STATE, SETUP_STATE, INPUT_STATE = "secure-sum:node", "secure-sum:setup", "secure-sum:input"
"""The node state's records: the node's protocol state, its setup, and the upload it has not masked yet."""


def check_range(config: RunConfig, upload: Mapping[str, torch.Tensor]) -> None:
    """Refuse, before any key is made, an upload that the secure sum's quantiser could not encode."""
    privacy = config.privacy
    quantizer = Quantizer(privacy.secure_clip_range, privacy.secure_bits)
    for name, value in upload.items():
        try:
            quantizer.encode(value.detach().to(torch.float64).reshape(-1).numpy())
        except ValueError as error:
            raise ValueError(f"upload {name}: {error}") from None


def answer_setup(context: Context, setup_record: ConfigRecord, upload: Mapping[str, torch.Tensor]) -> ConfigRecord:
    """The public keys for the round's secure sum; the node's state and its upload kept in `context`."""
    setup = Setup.read(setup_record)
    if set(upload) != {name for name, _ in setup.layout.shapes}:
        raise ProtocolRefused(f"the secure-sum layout's tensors differ from this site's upload {sorted(upload)}")
    node = load_node(context)
    keys: PublicKeys = node.answer_setup(setup)
    save_node(context.state, node)
    context.state[INPUT_STATE] = ArrayRecord({name: Array(value.detach().cpu().numpy()) for name, value in upload.items()})
    return keys.record()


def secure_sum_stage(msg: Message, context: Context) -> Message:
    """The node's answer to a share, collect or unmask message, from its state; a refusal is the reply's error, one line."""
    try:
        record = msg.content[SECURE_SUM]
        if not isinstance(record, ConfigRecord):
            raise ProtocolRefused("a secure-sum message without its record")
        node = load_node(context)
        stage = stage_of(record)
        if stage == SHARE:
            answer = node.answer_directory(KeyDirectory.read(record))
        elif stage == COLLECT:
            if INPUT_STATE not in context.state:
                raise ProtocolRefused("a collect message for which this node holds no input")
            upload = {name: torch.from_numpy(array.numpy()) for name, array in context.state[INPUT_STATE].items()}
            answer = node.answer_collect(ForwardedShares.read(record), upload)
            del context.state[INPUT_STATE]
        elif stage == UNMASK:
            answer = node.answer_unmask(UnmaskRequest.read(record))
        else:
            raise ProtocolRefused(f"a {stage!r} message outside the train instruction")
        save_node(context.state, node)
        return Message(RecordDict({SECURE_SUM: answer.record()}), reply_to=msg)
    except (ProtocolRefused, Refused) as refusal:
        print(f"node {context.node_id}: secure sum refused: {refusal}", flush=True)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(refusal)), reply_to=msg)


# -- the node's protocol state in its Context -------------------------------------------------------


def save_node(state: RecordDict, node: SecureSumNode) -> None:
    fields = {
        "node": str(node.node), "session": node.session, "expects": node.expects,
        "mask-private": node.mask_private, "share-private": node.share_private, "seed": node.seed,
        **_by_node("directory", {n: keys[0] for n, keys in node.directory.items()}),
        **_by_node("share-keys", {n: keys[1] for n, keys in node.directory.items()}),
        **_by_node("seed-shares", node.seed_shares), **_by_node("key-shares", node.key_shares),
    }
    if node.masked_with:
        fields["masked-with"] = [str(n) for n in node.masked_with]
    state[NODE_STATE] = ConfigRecord(fields)
    if node.setup is not None:
        state[SETUP_STATE] = node.setup.record()


def load_node(context: Context) -> SecureSumNode:
    """The node as its state left it (a node that never took part in a sum, fresh), signing with the
    key its node config names (federation/node_signing.py), which never enters the state."""
    state, signing = context.state, node_signing(context.node_config)
    if NODE_STATE not in state:
        return SecureSumNode(context.node_id, signing=signing)
    record = state[NODE_STATE]
    node = SecureSumNode(int(record["node"]), signing=signing)
    node.session, node.expects = int(record["session"]), str(record["expects"])
    node.setup = Setup.read(state[SETUP_STATE]) if SETUP_STATE in state else None
    node.mask_private, node.share_private, node.seed = record["mask-private"], record["share-private"], record["seed"]
    masks, shares = _read_by_node(record, "directory"), _read_by_node(record, "share-keys")
    node.directory = {n: (masks[n], shares[n]) for n in masks}
    node.seed_shares, node.key_shares = _read_by_node(record, "seed-shares"), _read_by_node(record, "key-shares")
    node.masked_with = [int(n) for n in record.get("masked-with", [])]
    return node


def _by_node(name: str, values: Mapping[int, bytes]) -> dict:
    # An empty list stays out of a record (Flower 1.42's ConfigRecord.count_bytes fails on one).
    return {f"{name}:nodes": [str(n) for n in values], f"{name}:values": list(values.values())} if values else {}


def _read_by_node(record: ConfigRecord, name: str) -> dict[int, bytes]:
    return dict(zip((int(n) for n in record.get(f"{name}:nodes", [])), record.get(f"{name}:values", []), strict=True))
