"""`florist site-worker`: a site's resident worker, started by the site's operator beside its SuperNode."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

EPILOG = """\
Start it as the user that runs the SuperNode, and give the SuperNode the same path in its node
config (--node-config "... worker-socket=\\"PATH\\""): each message's ClientApp process then hands
the message to this worker, which keeps the base model, tokenizer and merged updates loaded
across messages and rounds. PATH's directory is created with mode 0700 if missing, and refused if
others may enter it; only processes of this user are answered. Stop it with SIGTERM or Ctrl-C."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site-worker",
        help="keep a site's model loaded between Flower messages (resident worker beside a SuperNode)",
        description="Answer the site's ClientApp processes over a Unix socket, with the model kept loaded.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", required=True, type=Path, metavar="PATH", help="the Unix socket to listen at")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from florist.federation.client_app import app
    from florist.federation.site_worker import serve

    # SIGTERM ends the process through the same way out as Ctrl-C, which removes the socket.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.socket.expanduser().absolute(), app)
    except KeyboardInterrupt:
        pass
    return 0
