"""How a node's reply enters a stage: decoded once, and taken only from a node that answers this
round with the server's settings and base model; otherwise the stage records why not."""

from __future__ import annotations

from flwr.app import Message

from florist.federation.identity import disagreement
from florist.federation.messages import MISMATCH, Identity, Malformed, Reply, error_reason
from florist.federation.reports import Stage


def identified(stage: Stage, node: int, message: Message, server: Identity) -> Reply | None:
    """The reply of a node that runs the `server`'s settings and model for this stage's round, or
    None once the stage records why not: an error, an unreadable reply, another round, a mismatch."""
    if message.has_error():
        stage.event(node, "failed", error_reason(message))
        return None
    try:
        reply = Reply.read(message)
    except Malformed as error:
        stage.event(node, "rejected", str(error))
        return None
    if reply.round != stage.round:
        stage.event(node, "rejected", f"reply is for round {reply.round}, not {stage.round}", reply.partition)
        return None
    refusal = disagreement(server, reply.identity)
    if refusal or reply.status == MISMATCH:
        stage.event(node, "refused", refusal or "the node reports settings that differ from the server's", reply.partition)
        return None
    return reply
