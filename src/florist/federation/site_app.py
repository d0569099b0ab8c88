"""The ClientApp a SuperNode runs (pyproject.toml's [tool.flwr.app.components]): it hands each
message to the site's resident worker when the node config names one (`worker-socket`), else
runs florist's ClientApp (federation/client_app.py) in this process.

Flower starts a new process for every message and imports this module in it: it imports only flwr
and the standard library, so that a message the worker answers costs no import of torch,
transformers or peft, and no load of the base model. Flower still decides what runs: the worker
runs only what a ClientApp process hands it, under the node's own Context.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from florist.federation.messages import SECURE_SUM_ACTION
from florist.federation.worker_socket import Unreachable, exchange

WORKER_SOCKET = "worker-socket"
"""The node-config key naming the site's worker socket (`florist site-worker --socket PATH`)."""


def forward(socket_path: Path, msg: Message, context: Context) -> Message:
    """The worker's reply to `msg`, with the node's state as the worker left it; or, when the worker
    cannot be reached, an error reply of one line naming the socket (the round goes on without this site)."""
    try:
        reply, after = exchange(socket_path, msg, context)
    except Unreachable as error:
        print(f"node {context.node_id}: {error}", file=sys.stderr, flush=True)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(error)), reply_to=msg)
    # Flower keeps the node's state from the Context this process was given: the worker's changes go there.
    context.state = after.state
    return reply


def handle(msg: Message, context: Context) -> Message:
    socket_path = context.node_config.get(WORKER_SOCKET)
    if socket_path:
        return forward(Path(str(socket_path)), msg, context)
    # Imported here, not at the top: torch, transformers and peft load only when this process does the work.
    from florist.federation.client_app import app as in_process

    return in_process(msg, context)


app = ClientApp()
app.train()(handle)
app.train(SECURE_SUM_ACTION)(handle)  # the secure sum's later stages (privacy.secure_aggregation)
app.evaluate()(handle)
app.query()(handle)
