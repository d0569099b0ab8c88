"""`florist run` in one process (`federation.engine = "inline"`): a Flower Grid that hands each
message straight to the ClientApp, node by node, without Ray or a SuperLink.

The clients train one after another and share one copy of the base model. On a single GPU this is
what Ray would do at a higher cost (an actor per worker, each with its own model and CUDA context,
and seconds of start-up); on a multi-core CPU Ray's clients side by side train faster (BENCHMARKS.md).
The tests use it to drive the real ServerApp loop and ClientApp in seconds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


@dataclass
class InlineNode:
    node_config: dict
    state: RecordDict = field(default_factory=RecordDict)


class InlineGrid:
    """The part of Flower's Grid that the ServerApp uses: node ids, push and pull."""

    def __init__(self, client_app: ClientApp, node_configs: dict[int, dict], run_id: int = 1):
        self.client_app = client_app
        self.run_id = run_id
        # Flower builds a message only inside a task, whose process knows its run and node: this process
        # plays the ServerApp's task, as Flower's own engines set it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.nodes = {node: self.make_node(dict(config)) for node, config in node_configs.items()}
        self.replies: dict[str, Message] = {}

    @staticmethod
    def make_node(node_config: dict) -> InlineNode:
        return InlineNode(node_config)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def reply_to(self, message: Message) -> Message | None:
        """What the message's node answers: its ClientApp's reply, or the Error Flower makes of an exception."""
        node = self.nodes[message.metadata.dst_node_id]
        context = Context(self.run_id, message.metadata.dst_node_id, node.node_config, node.state, {})
        try:
            return self.client_app(message, context)
        except Exception as error:
            return Message(Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=message)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink does
            ids.append(message.metadata.message_id)
            reply = self.reply_to(message)
            if reply is not None:
                self.replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def simulated_nodes(num_clients: int) -> dict[int, dict]:
    """The node configurations Flower's simulation gives its nodes: a partition id and their count."""
    return {partition + 1: {"partition-id": partition, "num-partitions": num_clients} for partition in range(num_clients)}
