"""A site's side of a secure sum (privacy.secure_aggregation): its secure-sum node kept in the
node's Context state between messages, and its answer to each stage of the protocol.

A site takes part in two kinds of sum, each with its own state in the Context (`SumState`): a
round's training sum and an evaluation's sums (federation/evaluation_sums.py). Each sum's session
says which it is (an evaluation's from evaluation_sums.EVALUATION_SESSIONS on), and the later stages'
messages (messages.SECURE_SUM_TYPE for both) are answered from the state of the sum they name.

The site trains at the training sum's setup stage, which is the round's train instruction: it
trains as without the protocol, sketches its update (federation/sketch_round.py's `site_upload`),
keeps the upload in its state and answers with its public keys. It evaluates at an evaluation sum's
setup stage, the evaluate instruction, and keeps its vector of sums the same way
(`answer_evaluation_setup`). The gap and resend machinery, the node's policy and the check of the
server's settings all apply to those instructions as to any, and a site that fails to train or
evaluate is simply not among the sum's participants. The later stages (share, collect, unmask) are
answered from the state alone: no model is loaded for them, and a site holds its input until it
masks it at the collect stage, then forgets it. An input the setup's encoding cannot hold (a float
outside privacy.secure_clip_range, a count too large for the sum) is refused before any key is made.

A site whose node config names `secure-sum-key` and `secure-sum-peers` signs its public keys and
checks every peer's in the key directory (federation/node_signing.py, secure_sum/signing.py).

The state holds the node's private keys and its shares of the others' secrets: it stays on the
node (Flower keeps a SuperNode's Context state in its own process; the site worker hands it back
with each reply). A protocol message for which the state holds no pending sum is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from florist.federation.evaluation_sums import EVALUATION_SESSIONS, EvaluationSums, layout_categories
from florist.federation.messages import SECURE_SUM
from florist.federation.node_config import Refused
from florist.federation.node_signing import node_signing
from florist.federation.secure_sum import (
    ProtocolRefused,
    PublicKeys,
    SecureSumNode,
    Setup,
    UnmaskRequest,
)
from florist.federation.secure_sum.node import checked_setup
from florist.federation.secure_sum.protocol import COLLECT, SHARE, UNMASK, ForwardedShares, KeyDirectory, stage_of


@dataclass(frozen=True)
class SumState:
    """The node state's records of one kind of sum: the node's protocol state, its setup, and the
    input it has not masked yet."""

    node: str
    setup: str
    input: str


TRAIN_SUM = SumState("secure-sum:node", "secure-sum:setup", "secure-sum:input")
EVALUATION_SUM = SumState("secure-sum:evaluation:node", "secure-sum:evaluation:setup", "secure-sum:evaluation:input")


def sum_state(session: object) -> SumState:
    """The state of the sum a session names (a session that is no integer fails as the message is read)."""
    return EVALUATION_SUM if isinstance(session, int) and session >= EVALUATION_SESSIONS else TRAIN_SUM


def answer_setup(context: Context, setup_record: ConfigRecord, upload: Mapping[str, torch.Tensor]) -> ConfigRecord:
    """The public keys for the round's training sum; the node's state and its upload kept in `context`."""
    return _answer_setup(context, Setup.read(setup_record), upload, TRAIN_SUM)


def evaluation_setup(msg: Message) -> Setup:
    """The evaluation sums' setup an evaluate instruction carries, read and checked (its session, its
    layout: evaluation_sums.layout_categories) before the site evaluates."""
    record = msg.content.get(SECURE_SUM)
    if not isinstance(record, ConfigRecord):
        raise ProtocolRefused("privacy.secure_aggregation: the evaluate instruction carries no secure-sum setup")
    setup = Setup.read(record)
    if sum_state(setup.session) != EVALUATION_SUM:
        raise ProtocolRefused(f"a setup for secure sum {setup.session}, which is not a session of this kind of sum")
    layout_categories(setup.layout)
    return setup


def answer_evaluation_setup(context: Context, setup: Setup, sums: EvaluationSums) -> ConfigRecord:
    """The public keys for an evaluation's sums (`EvaluationSums.in_layout` of the setup's categories);
    the node's state and its vector of sums in the setup's layout kept in `context`."""
    return _answer_setup(context, setup, sums.tensors(layout_categories(setup.layout)), EVALUATION_SUM)


def _answer_setup(context: Context, setup: Setup, tensors: Mapping[str, torch.Tensor], kept: SumState) -> ConfigRecord:
    if sum_state(setup.session) != kept:
        raise ProtocolRefused(f"a setup for secure sum {setup.session}, which is not a session of this kind of sum")
    if set(tensors) != {name for name, _ in setup.layout.shapes}:
        raise ProtocolRefused(f"the secure-sum layout's tensors differ from this site's input {sorted(tensors)}")
    try:
        setup.layout.encode(tensors, checked_setup(setup), len(setup.nodes))
    except ValueError as error:
        raise ProtocolRefused(str(error)) from None
    node = load_node(context, kept)
    keys: PublicKeys = node.answer_setup(setup)
    save_node(context.state, node, kept)
    context.state[kept.input] = ArrayRecord({name: Array(value.detach().cpu().numpy()) for name, value in tensors.items()})
    return keys.record()


def secure_sum_stage(msg: Message, context: Context) -> Message:
    """The node's answer to a share, collect or unmask message, from its state; a refusal is the reply's error, one line."""
    try:
        record = msg.content[SECURE_SUM]
        if not isinstance(record, ConfigRecord):
            raise ProtocolRefused("a secure-sum message without its record")
        kept = sum_state(record.get("session"))
        node = load_node(context, kept)
        stage = stage_of(record)
        if stage == SHARE:
            answer = node.answer_directory(KeyDirectory.read(record))
        elif stage == COLLECT:
            if kept.input not in context.state:
                raise ProtocolRefused("a collect message for which this node holds no input")
            tensors = {name: torch.from_numpy(array.numpy()) for name, array in context.state[kept.input].items()}
            answer = node.answer_collect(ForwardedShares.read(record), tensors)
            del context.state[kept.input]
        elif stage == UNMASK:
            answer = node.answer_unmask(UnmaskRequest.read(record))
        else:
            raise ProtocolRefused(f"a {stage!r} message outside the train or evaluate instruction")
        save_node(context.state, node, kept)
        return Message(RecordDict({SECURE_SUM: answer.record()}), reply_to=msg)
    except (ProtocolRefused, Refused) as refusal:
        print(f"node {context.node_id}: secure sum refused: {refusal}", flush=True)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(refusal)), reply_to=msg)


# -- the node's protocol state in its Context -------------------------------------------------------


def save_node(state: RecordDict, node: SecureSumNode, kept: SumState = TRAIN_SUM) -> None:
    fields = {
        "node": str(node.node), "session": node.session, "expects": node.expects,
        "mask-private": node.mask_private, "share-private": node.share_private, "seed": node.seed,
        **_by_node("directory", {n: keys[0] for n, keys in node.directory.items()}),
        **_by_node("share-keys", {n: keys[1] for n, keys in node.directory.items()}),
        **_by_node("seed-shares", node.seed_shares), **_by_node("key-shares", node.key_shares),
    }
    if node.masked_with:
        fields["masked-with"] = [str(n) for n in node.masked_with]
    state[kept.node] = ConfigRecord(fields)
    if node.setup is not None:
        state[kept.setup] = node.setup.record()


def load_node(context: Context, kept: SumState = TRAIN_SUM) -> SecureSumNode:
    """The node as its state of that kind of sum left it (a node that never took part in a sum, fresh), signing with the
    key its node config names (federation/node_signing.py), which never enters the state."""
    state, signing = context.state, node_signing(context.node_config)
    if kept.node not in state:
        return SecureSumNode(context.node_id, signing=signing)
    record = state[kept.node]
    node = SecureSumNode(int(record["node"]), signing=signing)
    node.session, node.expects = int(record["session"]), str(record["expects"])
    node.setup = Setup.read(state[kept.setup]) if kept.setup in state else None
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
