"""Sending one stage's instructions and taking the replies as they arrive, until a deadline.

Flower's `Grid.send_and_receive` returns all replies at the end; this loop uses the same
`push_messages`/`pull_messages` so that each reply is handled (validated, folded into the
aggregate, then dropped) as soon as it arrives, a node with a gap in its chain can be sent
what it lacks within the same round, and stragglers are cut off at the deadline. Replies to
an earlier stage's messages are never pulled: they belong to the round they were sent for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

POLL_SECONDS = 0.5
"""How often the reply to each waiting message is asked for (one request per message)."""

Handler = Callable[[int, Message], Iterable[Message]]
"""Handles one reply from a node; returns follow-up instructions (a resend to a node with a gap).

The node id is the one the instruction went to: an error reply for a node the SuperLink
declared lost comes from the SuperLink itself."""


class Pull:
    """The reply to one message, asked for in a thread of its own.

    Flower's `pull_messages` returns a reply only once all its objects are uploaded, and for a
    node that died mid-upload that is when the SuperLink's object-push session expires (180 s in
    Flower 1.42), whatever the round's deadline. In a thread of its own such a pull holds up
    neither the other replies nor the deadline: a pull still running when its stage ends is
    abandoned (a daemon thread, which does not keep the ServerApp's process alive either)."""

    def __init__(self, grid: Grid, message_id: str):
        self.done = threading.Event()
        self.replies: list[Message] = []
        self.error: Exception | None = None
        threading.Thread(target=self._pull, args=(grid, message_id), daemon=True).start()

    def _pull(self, grid: Grid, message_id: str) -> None:
        try:
            self.replies = list(grid.pull_messages([message_id]))
        except Exception as error:  # raised in the stage's own thread (exchange)
            self.error = error
        finally:
            self.done.set()


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, handle: Handler) -> list[int]:
    """Push `messages`, hand each reply to `handle` as it arrives, push its follow-ups, and
    return the nodes that had not replied when `timeout` seconds had passed.

    `timeout` is a hard deadline: each reply is pulled on its own (`Pull`). A reply is asked for
    only while its node is connected. Flower answers for a node that missed its heartbeats (a live
    node on a saturated machine can) with a "Node Unavailable" error and drops the instruction,
    though the node may still be working on it; asked for once the node is back, its reply is
    taken. Replies are handled in the order their messages were pushed; one that cannot be pulled
    is handled as the node's error (`unreadable`)."""
    waiting: dict[str, int] = {}
    sent: dict[str, Message] = {}
    pulls: dict[str, Pull] = {}

    def push(batch: Iterable[Message]) -> None:
        batch = list(batch)
        for message_id, message in zip(grid.push_messages(batch), batch, strict=True):
            waiting[message_id], sent[message_id] = message.metadata.dst_node_id, message

    push(messages)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        next_poll = min(time.monotonic() + POLL_SECONDS, deadline)
        connected = set(grid.get_node_ids())
        for message_id, node in waiting.items():
            if node in connected and message_id not in pulls:
                pulls[message_id] = Pull(grid, message_id)
        for pull in list(pulls.values()):
            pull.done.wait(max(0.0, next_poll - time.monotonic()))
        for message_id in list(waiting):
            pull = pulls.get(message_id)
            if pull is None or not pull.done.is_set():
                continue
            del pulls[message_id]
            replies = pull.replies if pull.error is None else [unreadable(sent[message_id], pull.error)]
            for reply in replies:
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    push(handle(node, reply))
        if waiting:
            time.sleep(max(0.0, next_poll - time.monotonic()))
    return sorted(waiting.values())


def unreadable(message: Message, error: Exception) -> Message:
    """The reply to `message` as an error, when Flower could not pull or rebuild it: the node's
    failure, which the stage records, and not the run's. A SuperLink that is gone fails the stage's
    next call to the grid instead."""
    reason = f"its reply could not be read ({type(error).__name__}: {str(error)[:200]})"
    return Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=message)
