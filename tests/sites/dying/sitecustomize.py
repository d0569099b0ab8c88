"""A site that dies while it uploads a reply. On its PYTHONPATH, Python runs this at every start, in
the SuperNode and in each process it spawns; only the SuperNode sends replies, and only there does
it change anything.

The reply numbered FLORIST_TEST_DIE_AT_REPLY (1 for the first the SuperNode sends) is left
half-sent: its message reaches the SuperLink, then every object of it but the last. The SuperNode
waits SECONDS_BEFORE_DYING, long enough for the server to have asked for the reply and to be
waiting for its objects, then stops itself with SIGTERM, which takes it out of the federation at
once (a SIGKILLed node is listed for up to 60 s more).
"""

import os
import signal
import time

from patch_on_import import patch_on_import

TARGET = "flwr.supernode.start_client_internal"
DIE_AT_REPLY = int(os.environ.get("FLORIST_TEST_DIE_AT_REPLY", "0"))
SECONDS_BEFORE_DYING = 10.0


def _install(module):
    push_all = module.push_object_contents_from_iterable
    sent = 0

    def push_object_contents_from_iterable(object_contents, push_object_fn, **options):
        nonlocal sent
        sent += 1
        if sent != DIE_AT_REPLY:
            return push_all(object_contents, push_object_fn, **options)
        contents = list(object_contents)
        push_all(contents[:-1], push_object_fn, **options)
        print(f"dying_site: reply {sent} half-sent ({len(contents) - 1} of {len(contents)} objects); dying", flush=True)
        time.sleep(SECONDS_BEFORE_DYING)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

    module.push_object_contents_from_iterable = push_object_contents_from_iterable


if DIE_AT_REPLY:
    patch_on_import(TARGET, _install)
