"""Timing marks for benchmarks/message_overhead.py. On a process's PYTHONPATH, Python runs this at
every start; with FLORIST_TIMING_LOG set, it appends one JSON line per mark to that file: the wall
clock and the process's CPU seconds when

- process_start: a flwr-clientapp process began (its creation time, from the kernel);
- arrived: Flower's ClientApp process holds the message (pull_task_input returned);
- app_called: Flower calls the ClientApp (after installing the FAB and importing the app module);
- worker_received: a site worker begins to answer a forwarded message;
- train_start: florist's training of the message's LoRA begins (train_lora is entered);
- exit: the process ends.

Nothing else changes: the wrapped functions run as they are.
"""

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

LOG = os.environ.get("FLORIST_TIMING_LOG")
SITE = os.environ.get("FLORIST_TIMING_SITE", "")


def mark(event, when=None):
    times = os.times()
    line = {"event": event, "site": SITE, "pid": os.getpid(), "t": time.time() if when is None else when,
            "cpu": times.user + times.system}
    with open(LOG, "a") as stream:
        stream.write(json.dumps(line) + "\n")


def _after(function, event):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        mark(event)
        return result

    return wrapped


def _before(function, event, once=False):
    done = []

    def wrapped(*args, **kwargs):
        if not (once and done):
            done.append(True)
            mark(event)
        return function(*args, **kwargs)

    return wrapped


def _clientapp_runtime(module):
    module.pull_task_input = _after(module.pull_task_input, "arrived")


def _client_app(module):
    # The in-process path calls florist's own ClientApp from inside the first: the first call counts.
    module.ClientApp.__call__ = _before(module.ClientApp.__call__, "app_called", once=True)


def _training(module):
    module.train_lora = _before(module.train_lora, "train_start")


def _site_worker(module):
    module.answer = _before(module.answer, "worker_received")


HOOKS = {
    "flwr.supernode.runtime.run_clientapp": _clientapp_runtime,
    "flwr.clientapp.client_app": _client_app,
    "florist.training": _training,
    "florist.federation.site_worker": _site_worker,
}


class _Timing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            HOOKS[name](module)

        spec.loader.exec_module = exec_module
        return spec


if LOG:
    sys.meta_path.insert(0, _Timing())
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as cmdline:
        arguments = cmdline.read().split(b"\0")
    if any(os.path.basename(argument) == b"flwr-clientapp" for argument in arguments[:2]):
        # The kernel's start time, in clock ticks since boot, against the boot clock now.
        with open(f"/proc/{os.getpid()}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        mark("process_start", time.time() - age)
    atexit.register(mark, "exit")
