"""How a node's reply enters a stage.

Every handler of a reply runs inside `guarded`, the boundary between what a node sends and the
run: whatever a handler raises rejects that one reply, with a one-line reason, and the run goes on.
The handlers read and check the whole reply before they change any state, so a rejected reply
leaves nothing behind. `identified` decodes the reply once and takes it only from a node that
answers this round with the server's settings and base model.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Message

from florist.aggregation import AggregationError
from florist.federation.identity import disagreement
from florist.federation.messages import MISMATCH, Identity, Malformed, Reply, error_reason
from florist.federation.reports import Stage
from florist.federation.secure_sum.protocol import ProtocolRefused
from florist.federation.validation import Rejected

SPOKEN = (Malformed, Rejected, AggregationError, ProtocolRefused)
"""Refusals whose message is the whole reason; any other exception is named by its type too."""


def guarded(stage: Stage, node: int, handle: Callable[[], list[Message]]) -> list[Message]:
    """The follow-up messages `handle` makes of one reply from `node`; if it raises instead, the
    reply is rejected for the stage with the exception as its reason."""
    try:
        return handle()
    except Exception as error:  # the boundary: nothing a node sends may end the run
        reason = str(error) if isinstance(error, SPOKEN) else f"unreadable reply: {type(error).__name__}: {error}"
        stage.event(node, "rejected", reason)
        return []


def identified(stage: Stage, node: int, message: Message, server: Identity) -> Reply | None:
    """The reply of a node that runs the `server`'s settings and model for this stage's round, or
    None once the stage records why not: an error, another round, a mismatch. A reply that cannot
    be read raises `Malformed`."""
    if message.has_error():
        stage.event(node, "failed", error_reason(message))
        return None
    reply = Reply.read(message)
    if reply.round != stage.round:
        stage.event(node, "rejected", f"reply is for round {reply.round}, not {stage.round}", reply.partition)
        return None
    refusal = disagreement(server, reply.identity)
    if refusal or reply.status == MISMATCH:
        stage.event(node, "refused", refusal or "the node reports settings that differ from the server's", reply.partition)
        return None
    return reply
