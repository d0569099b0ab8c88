"""A site's resident worker (`florist site-worker --socket PATH`): florist's ClientApp in one
long-lived process, answering the messages the site's ClientApp processes hand it
(federation/site_app.py) over a Unix socket only the site's user can open (federation/worker_socket.py).

Its process keeps what federation/workspace.py caches per process: the base model with the merged
chain, the tokenizer and the tokenised examples, across messages and rounds. It answers one
message at a time, in the order they connect; the node's state travels in each message's Context
and goes back with the reply, so Flower keeps it as without a worker.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from florist.federation.worker_socket import (
    PRIVATE_DIRECTORY_MODE,
    check_private_directory,
    peer_uid,
    receive_task,
    send_task,
)

BACKLOG = 16
"""ClientApp processes that may wait to be answered: one per message a site handles at once."""


def listen(path: Path) -> socket.socket:
    """A socket listening at `path`, in a directory made private to this user (0700) if new, and refused
    if it exists and others may enter it. A socket left at `path` by a worker that died is replaced;
    one a live worker answers on is not."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True)
        os.chmod(directory, PRIVATE_DIRECTORY_MODE)  # mkdir's mode is masked by the umask
    check_private_directory(directory)
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise OSError(f"a worker already listens at {path}")
        path.unlink()
    elif path.exists() or path.is_symlink():
        raise OSError(f"{path} exists and is not a socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(BACKLOG)
    return listener


def answer(app: ClientApp, message: Message, context: Context) -> Message:
    """The app's reply; a failure that escapes the app replies its type only (the text may quote the
    site's files), as florist's ClientApp does, and leaves the traceback in the worker's log."""
    try:
        return app(message, context)
    except Exception as error:
        traceback.print_exc()
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"the site worker failed ({type(error).__name__}); its own log has the details"),
            reply_to=message,
        )


def serve_connection(app: ClientApp, connection: socket.socket) -> None:
    """One ClientApp process's message: refused unless it runs as this user; else answered."""
    uid = peer_uid(connection)
    if uid != os.getuid():
        print(f"site-worker: refused a connection from uid {uid} (this worker runs as {os.getuid()})", flush=True)
        return
    try:
        message, context = receive_task(connection)
    except Exception as error:
        # Whatever a process of this user sends (half a frame, bytes that are no Message), the worker goes on.
        print(f"site-worker: ignored a connection that sent no whole message ({type(error).__name__}: {error})", flush=True)
        return
    reply = answer(app, message, context)
    try:
        send_task(connection, reply, context)
    except OSError as error:
        # The ClientApp process went away (its SuperNode stopped it): the next one is served as usual.
        print(f"site-worker: a ClientApp process left before its reply was sent ({error})", flush=True)


def serve(path: Path, app: ClientApp) -> None:
    """Answer at `path` until the process is stopped; the socket is removed on the way out."""
    listener = listen(path)
    inode = os.stat(path).st_ino
    print(f"site-worker: listening at {path} (pid {os.getpid()})", flush=True)
    try:
        while True:
            connection, _ = listener.accept()
            with connection:
                serve_connection(app, connection)
    finally:
        listener.close()
        # Only our own socket: a worker started since at the same path keeps its own.
        if path.is_socket() and os.stat(path).st_ino == inode:
            path.unlink()
