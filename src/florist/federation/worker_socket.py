"""The local socket between a site's ClientApp processes and its resident worker (`florist site-worker`).

Flower 1.42 starts a new `flwr-clientapp` process for every message (its warm executor pools exist
only for the Kubernetes executor, and not for ClientApps), so without a worker every message
imports torch, transformers and peft and loads the base model again. A site's worker keeps them
loaded; each ClientApp process hands it the message and the node's Context, and returns its reply.

Only the site's own user reaches the worker: the socket is a Unix socket (no network address)
inside a directory of that user's with mode 0700, each side checks the other's uid with
SO_PEERCRED before it reads anything, and the ClientApp side refuses a directory or socket that
another user owns or others may enter. What travels is Flower's own protobuf (flwr.common.serde):
a Message and a Context, each one length-prefixed frame.

This module imports only the standard library and flwr: a ClientApp process that forwards stays light.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

FRAME_HEADER = struct.Struct("!Q")
"""A frame's length in bytes, before its bytes."""
PEER_CREDENTIALS = struct.Struct("3i")
"""struct ucred of SO_PEERCRED: pid, uid, gid."""
PRIVATE_DIRECTORY_MODE = 0o700


class Unreachable(OSError):
    """The worker cannot be reached, or may not be trusted: one line naming the socket."""


def check_private_directory(directory: Path) -> None:
    """`directory` is a real directory of this process's user that no one else may enter, else `Unreachable`."""
    try:
        status = os.lstat(directory)
    except FileNotFoundError:
        raise Unreachable(f"the worker socket's directory {directory} does not exist") from None
    if not stat.S_ISDIR(status.st_mode):
        raise Unreachable(f"the worker socket's directory {directory} is not a directory")
    _check_owner(status, f"the worker socket's directory {directory}")
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise Unreachable(f"the worker socket's directory {directory} has mode {mode:04o}: others may enter it; it must be 0700")


def check_own_socket(path: Path) -> None:
    """`path` is a socket of this process's user, in a private directory of that user's, else `Unreachable`."""
    if not path.is_absolute():
        # A ClientApp process runs in a directory of Flower's choosing: a relative path would depend on it.
        raise Unreachable(f"the worker socket {path} must be an absolute path")
    check_private_directory(path.parent)
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        raise Unreachable(f"no worker socket at {path}: is `florist site-worker --socket {path}` running?") from None
    if not stat.S_ISSOCK(status.st_mode):
        raise Unreachable(f"{path} is not a socket")
    _check_owner(status, f"the worker socket {path}")


def _check_owner(status: os.stat_result, what: str) -> None:
    if status.st_uid != os.getuid():
        raise Unreachable(f"{what} belongs to uid {status.st_uid}, not to this user ({os.getuid()})")


def peer_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel reports it."""
    _, uid, _ = PEER_CREDENTIALS.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size))
    return uid


def send_frame(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(FRAME_HEADER.pack(len(payload)) + payload)


def receive_frame(connection: socket.socket) -> bytes:
    """One frame's bytes; EOFError when the other end closes before the frame is whole."""
    (length,) = FRAME_HEADER.unpack(_receive_exactly(connection, FRAME_HEADER.size))
    return _receive_exactly(connection, length)


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = connection.recv_into(view[received:])
        if count == 0:
            raise EOFError("the connection closed mid-frame" if received else "the connection closed")
        received += count
    return bytes(buffer)


def send_task(connection: socket.socket, message: Message, context: Context) -> None:
    """A message and the context it runs in (a reply and the context as it left it): two frames."""
    send_frame(connection, message_to_proto(message).SerializeToString())
    send_frame(connection, context_to_proto(context).SerializeToString())


def receive_task(connection: socket.socket) -> tuple[Message, Context]:
    message = message_from_proto(ProtoMessage.FromString(receive_frame(connection)))
    context = context_from_proto(ProtoContext.FromString(receive_frame(connection)))
    return message, context


def exchange(path: Path, message: Message, context: Context) -> tuple[Message, Context]:
    """Hand `message` and `context` to the worker at `path`; its reply and the context as it left it.

    `Unreachable`, naming the socket, when no worker of this user answers there, or it closes the
    connection before its reply is whole (it died, or refused this process)."""
    check_own_socket(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.connect(str(path))
        except OSError as error:
            raise Unreachable(f"no worker answers at {path} ({error.strerror or error}): is `florist site-worker` running?") from None
        uid = peer_uid(connection)
        if uid != os.getuid():
            raise Unreachable(f"the process at {path} runs as uid {uid}, not as this user ({os.getuid()}): refused")
        try:
            send_task(connection, message, context)
            return receive_task(connection)
        except (EOFError, OSError) as error:
            raise Unreachable(f"the worker at {path} stopped before it replied ({error}); its own log has the details") from None
