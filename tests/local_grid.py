"""A Flower Grid that runs the real ClientApp in this process, one node state per node.

It exercises the real ServerApp loop (`serve`) and the real ClientApp in seconds, without
Ray or a SuperLink, so that the logic of dropouts, retries, gaps, refusals and resumes can
be tested case by case. The Flower engines themselves are tested by the simulation and
deployment tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from florist.federation.messages import Instruction

Tamper = Callable[[Message, Message], Message | None]
"""(instruction, reply) -> the reply the node really sends, or None for no reply at all."""


@dataclass
class LocalNode:
    node_config: dict
    state: RecordDict = field(default_factory=RecordDict)
    connected: bool = True
    tamper: Tamper | None = None
    received: list[Message] = field(default_factory=list)


class LocalGrid:
    def __init__(self, client_app: ClientApp, node_configs: dict[int, dict], run_id: int = 7):
        self.client_app = client_app
        self.run_id = run_id
        self.nodes = {node: LocalNode(dict(config)) for node, config in node_configs.items()}
        self.replies: dict[str, Message] = {}
        self.before_push: Callable[[LocalGrid, list[Message]], None] | None = None

    def get_node_ids(self) -> list[int]:
        return [node for node, state in self.nodes.items() if state.connected]

    def push_messages(self, messages) -> list[str]:
        messages = list(messages)
        if self.before_push is not None:
            self.before_push(self, messages)
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink does
            ids.append(message.metadata.message_id)
            node = self.nodes[message.metadata.dst_node_id]
            if not node.connected:
                continue
            node.received.append(message)
            context = Context(self.run_id, message.metadata.dst_node_id, node.node_config, node.state, {})
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # what Flower turns a ClientApp exception into
                reply = Message(Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            if node.tamper is not None:
                reply = node.tamper(message, reply)
            if reply is not None:
                self.replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


class ServerCrash(Exception):
    """Raised by `crash_before_round` where the server process would die."""


def crash_before_round(server_round: int) -> Callable[[LocalGrid, list[Message]], None]:
    """A `before_push` hook: the server dies as it sends the first instructions of `server_round`."""

    def crash(grid: LocalGrid, messages: list[Message]) -> None:
        if messages and Instruction.read(messages[0]).round == server_round:
            raise ServerCrash()

    return crash
