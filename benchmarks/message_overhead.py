"""What a message costs a site on Flower's deployment engine before its training starts (issue 20):
each site's ClientApp process doing the work itself, against the same process handing the message
to a resident worker (`florist site-worker`).

Each configuration runs one loopback deployment (tests/deployment.py: TLS, SuperNode
authentication, `flwr run`) of the embedded SmolLM2-135M with 2 sites and little training, without
server-side evaluation, so that the run is mostly messages. benchmarks/timing_site/sitecustomize.py,
on every site process's PYTHONPATH, marks when each flwr-clientapp process began, when it held the
message, when Flower called the ClientApp, when a worker began to answer, and when training began
(wall clock and the process's CPU seconds). The k-th message a site's ClientApp processes receive is
paired with the k-th training start of that site.

    python benchmarks/message_overhead.py --out /tmp/overhead [--rounds 4] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from deployment import Deployment  # noqa: E402 (the harness lives beside the tests)
from deployment_cost import site_configs  # noqa: E402

from florist.config import load_config  # noqa: E402

TIMING_SITE = Path(__file__).resolve().parent / "timing_site"
SITES = 2
SETTINGS = [
    f"federation.num_clients={SITES}",
    "federation.ranks=[8, 16]",
    "data.examples_per_category=8",
    "data.min_client_examples=4",
    "training.local_steps=1",
    "training.batch_size=2",
    "evaluation.server=false",
    "evaluation.base=false",
    "output.save_model=false",
]


def run(config_file: Path, folder: Path, workers: bool) -> dict:
    """One deployment; the run's status and every mark the site processes logged."""
    config = load_config(config_file)
    sites = site_configs(config, folder / "sites")
    log = folder / "timing.jsonl"
    with Deployment(folder / "deployment", database=False) as deployment:
        deployment.start_superlink()
        for site, node_config in enumerate(sites):
            env = dict(deployment.env, PYTHONPATH=f"{TIMING_SITE}:{deployment.env['PYTHONPATH']}",
                       FLORIST_TIMING_LOG=str(log), FLORIST_TIMING_SITE=f"site{site}")
            if workers:
                _, socket_path = deployment.start_site_worker(f"site{site}", env)
                node_config = node_config | {"worker-socket": str(socket_path)}
            deployment.add_supernode(f"site{site}", node_config, env=env)
        deployment.wait_for_nodes()
        run_id = deployment.submit({"config-file": str(config_file)})
        status = deployment.wait(run_id, 3600)
    marks = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"status": status, "marks": marks}


def per_message(marks: list[dict]) -> list[dict]:
    """Per message, in seconds: Flower's part (process start to the message in hand, and to the app
    called), florist's part (app called to training start), and CPU seconds of each."""
    messages = []
    for site in sorted({mark["site"] for mark in marks}):
        ours = [mark for mark in marks if mark["site"] == site]
        by_pid: dict[int, dict] = {}
        for mark in ours:
            by_pid.setdefault(mark["pid"], {}).setdefault(mark["event"], mark)
        clientapps = sorted((events for events in by_pid.values() if "arrived" in events), key=lambda e: e["arrived"]["t"])
        starts = sorted((mark for mark in ours if mark["event"] == "train_start"), key=lambda mark: mark["t"])
        received = sorted((mark for mark in ours if mark["event"] == "worker_received"), key=lambda mark: mark["t"])
        for index, (events, start) in enumerate(zip(clientapps, starts)):
            forwarded = start["pid"] != events["arrived"]["pid"]
            record = {
                "site": site,
                "message": index + 1,
                "forwarded": forwarded,
                "flower_process_to_message": events["arrived"]["t"] - events["process_start"]["t"],
                "flower_message_to_app": events["app_called"]["t"] - events["arrived"]["t"],
                "flower_cpu": events["app_called"]["cpu"],
                "arrival_to_training": start["t"] - events["arrived"]["t"],
                "app_to_training": start["t"] - events["app_called"]["t"],
            }
            if forwarded:
                worker = received[index]
                record["worker_cpu_to_training"] = start["cpu"] - worker["cpu"]
                record["clientapp_cpu_total"] = events["exit"]["cpu"] if "exit" in events else None
            else:
                record["clientapp_cpu_to_training"] = start["cpu"] - events["app_called"]["cpu"]
            messages.append(record)
    return messages


def summarise(results: dict) -> str:
    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = ["| per message, s: median (min-max) | " + " | ".join(results) + " |", "|---|" + "--:|" * len(results)]
    rows = [
        ("Flower: process start to message in hand", "flower_process_to_message", None),
        ("Flower: message in hand to ClientApp called (FAB, app import)", "flower_message_to_app", None),
        ("Flower: CPU s of the ClientApp process until the app is called", "flower_cpu", None),
        ("florist: message in hand to training start, first message per site", "arrival_to_training", True),
        ("florist: message in hand to training start, later messages", "arrival_to_training", False),
        ("florist: ClientApp called to training start, later messages", "app_to_training", False),
        ("florist CPU s to training start, first message (ClientApp process, or worker)", "cpu", True),
        ("florist CPU s to training start, later messages (ClientApp process, or worker)", "cpu", False),
        ("CPU s of a forwarding ClientApp process, whole life", "clientapp_cpu_total", None),
    ]
    for name, key, first in rows:
        cells = []
        for result in results.values():
            messages = result["messages"]
            if first is not None:
                messages = [m for m in messages if (m["message"] == 1) == first]
            if key == "cpu":
                values = [m.get("worker_cpu_to_training", m.get("clientapp_cpu_to_training")) for m in messages]
            else:
                values = [m.get(key) for m in messages]
            cells.append(cell(values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{name}: {len(result['messages'])} messages ({result['status']})" for name, result in results.items())
    return "\n".join(lines) + f"\n\n{counts}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, workers in (("in the ClientApp process (today)", False), ("resident worker", True)):
        folder = args.out / ("worker" if workers else "in-process")
        folder.mkdir(parents=True, exist_ok=True)
        overrides = [*SETTINGS, f"federation.rounds={args.rounds}", *args.set, f"output.run_dir={json.dumps(str(folder / 'run'))}"]
        config_file = folder / "florist.toml"
        config_file.write_text(tomli_w.dumps(load_config(None, overrides).model_dump(exclude_none=True)))
        started, load = time.time(), os.getloadavg()
        outcome = run(config_file, folder, workers)
        results[name] = {"status": outcome["status"], "load_before": load, "load_after": os.getloadavg(),
                         "seconds": time.time() - started, "messages": per_message(outcome["marks"])}
        (folder / "marks.json").write_text(json.dumps(outcome["marks"], indent=1) + "\n")
        print(f"{name}: {outcome['status']} in {results[name]['seconds']:.0f} s, load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = summarise(results)
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
