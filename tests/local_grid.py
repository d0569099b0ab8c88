"""The inline engine's Grid with faults a test can plant: nodes that disconnect, replies that are
tampered with or never sent, a server that dies before a round.

It exercises the real ServerApp loop (`serve`) and the real ClientApp in seconds, so that the logic
of dropouts, retries, gaps, refusals and resumes can be tested case by case. The Flower engines
themselves are tested by the simulation and deployment tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message

from florist.federation.inline import InlineGrid, InlineNode
from florist.federation.messages import Instruction

Tamper = Callable[[Message, Message], Message | None]
"""(instruction, reply) -> the reply the node really sends, or None for no reply at all."""


@dataclass
class LocalNode(InlineNode):
    connected: bool = True
    tamper: Tamper | None = None
    received: list[Message] = field(default_factory=list)


class LocalGrid(InlineGrid):
    def __init__(self, client_app, node_configs: dict[int, dict], run_id: int = 7):
        super().__init__(client_app, node_configs, run_id)
        self.before_push: Callable[[LocalGrid, list[Message]], None] | None = None

    @staticmethod
    def make_node(node_config: dict) -> LocalNode:
        return LocalNode(node_config)

    def get_node_ids(self) -> list[int]:
        return [node for node, state in self.nodes.items() if state.connected]

    def push_messages(self, messages) -> list[str]:
        messages = list(messages)
        if self.before_push is not None:
            self.before_push(self, messages)
        return super().push_messages(messages)

    def reply_to(self, message: Message) -> Message | None:
        node = self.nodes[message.metadata.dst_node_id]
        if not node.connected:
            return None
        node.received.append(message)
        reply = super().reply_to(message)
        return reply if node.tamper is None else node.tamper(message, reply)


class ServerCrash(Exception):
    """Raised by `crash_before_round` where the server process would die."""


def crash_before_round(server_round: int) -> Callable[[LocalGrid, list[Message]], None]:
    """A `before_push` hook: the server dies as it sends the first instructions of `server_round`."""

    def crash(grid: LocalGrid, messages: list[Message]) -> None:
        if messages and Instruction.read(messages[0]).round == server_round:
            raise ServerCrash()

    return crash
