"""What a round costs on Flower's deployment engine beyond the simulation (issue 8).

Each repeat runs one configuration twice, back to back: `florist run` (the simulation engine, in
one process) and a loopback deployment (tests/deployment.py: a SuperLink and one SuperNode per
site, each with its part of the simulation's split as its own data file, TLS and SuperNode
authentication on, the job submitted with `flwr run`). Stage times come
from when each round's record lands in metrics.jsonl (polled every 0.1 s) and from the run's own
timings; in the deployment, every flwr-clientapp process (one per message) is followed with psutil
from its start to its exit.

    python benchmarks/deployment_cost.py --out runs/bench-deployment --repeats 2 [--state memory]

The configuration is the embedded SmolLM2-135M with 3 sites and a small training budget, so that
what the engine adds is not drowned by training; --set overrides any key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from deployment import Deployment, VENV_BIN, environment  # noqa: E402 (the harness lives beside the tests)

from florist.config import RunConfig, load_config  # noqa: E402
from florist.federation.datasets import federated_data  # noqa: E402

SITES = 3
SETTINGS = [
    f"federation.num_clients={SITES}",
    "federation.ranks=[8, 16, 32]",
    "federation.rounds=3",
    "data.examples_per_category=8",
    "data.test_per_category=2",
    "data.min_client_examples=4",
    "training.local_steps=2",
    "training.batch_size=4",
    "evaluation.max_new_tokens=4",
]


class Watcher(threading.Thread):
    """Notes when the run directory appears and when each round's record lands; in a deployment,
    also every flwr-clientapp process under the SuperNodes: start, last seen, CPU seconds."""

    def __init__(self, run_dir: Path, roots: list[int] | None = None):
        super().__init__(daemon=True)
        self.run_dir, self.roots = run_dir, roots or []
        self.started: float | None = None
        self.rounds: list[float] = []
        self.finished: float | None = None
        self.clientapps: dict[int, dict] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.time()
            if self.started is None and (self.run_dir / "config.toml").exists():
                self.started = now
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():
                lines = sum(1 for line in metrics.read_text().splitlines() if line.strip())
                self.rounds += [now] * (lines - len(self.rounds))
            if self.finished is None and (self.run_dir / "summary.json").exists():
                self.finished = now
            self._sample_clientapps(now)
            time.sleep(0.1)

    def _sample_clientapps(self, now: float) -> None:
        for root in self.roots:
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if "flwr-clientapp" not in " ".join(child.cmdline()[:2]):
                        continue
                    seen = self.clientapps.setdefault(child.pid, {"node": root, "created": child.create_time()})
                    seen["last_seen"] = now
                    seen["cpu_seconds"] = sum(child.cpu_times()[:2])
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def stages(watcher: Watcher, launched: float, records: list[dict]) -> dict:
    """Seconds per stage, from the watcher's timestamps and the run's own records."""
    result = {"start_up": watcher.started - launched, "base_evaluation": watcher.rounds[0] - watcher.started}
    rounds = []
    for k in range(1, len(records)):
        record = records[k]
        wall = watcher.rounds[k] - watcher.rounds[k - 1]
        train = [client["train_seconds"] for client in record["clients"]]
        rounds.append(
            {
                "round": k,
                "wall": wall,
                "train_stage": wall - record["evaluation_seconds"],
                "evaluation": record["evaluation_seconds"],
                "aggregation": record["aggregation_seconds"],
                "client_training_max": max(train),
                "client_training_sum": sum(train),
            }
        )
    result["rounds"] = rounds
    result["finish"] = watcher.finished - watcher.rounds[-1] if watcher.finished else None
    return result


def simulate(config_file: Path, run_dir: Path) -> dict:
    env = environment(run_dir.parent / "flwr-home")
    launched = time.time()
    watcher = Watcher(run_dir)
    watcher.start()
    with open(run_dir.parent / "simulation.log", "w") as log:
        subprocess.run([str(VENV_BIN / "florist"), "run", "--config", str(config_file)], env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    ended = time.time()
    watcher.stop()
    result = stages(watcher, launched, read_records(run_dir))
    result["process_exit_after_summary"] = ended - watcher.finished
    result["whole"] = ended - launched
    return result


def site_configs(config: RunConfig, directory: Path) -> list[dict]:
    """Each site's node config: its part of the simulation's split as its own data file, the
    simulation's model, and the threads a simulated client gets, so both engines train alike."""
    directory.mkdir(parents=True, exist_ok=True)
    threads = max(1, len(os.sched_getaffinity(0)) // config.federation.parallel_clients)
    sites = []
    for site, examples in enumerate(federated_data(config).clients):
        data = directory / f"client_{site}.json"
        data.write_text(json.dumps([dataclasses.asdict(example) for example in examples]))
        sites.append({"partition-id": site, "num-partitions": SITES, "data": str(data), "model": config.model.name, "threads": threads})
    return sites


def deploy(config_file: Path, run_dir: Path, database: bool) -> dict:
    sites = site_configs(load_config(config_file), run_dir.parent / "sites")
    launched = time.time()
    marks = {}
    with Deployment(run_dir.parent, database=database) as deployment:
        deployment.start_superlink()
        marks["superlink_ready"] = time.time() - launched
        for site, node_config in enumerate(sites):
            deployment.add_supernode(f"site{site}", node_config)
        deployment.wait_for_nodes()
        marks["supernodes_online"] = time.time() - launched
        roots = [node.started.popen.pid for node in deployment.supernodes.values()]
        watcher = Watcher(run_dir, roots)
        watcher.start()
        submitted = time.time()
        run_id = deployment.submit({"config-file": str(config_file)})
        marks["flwr_run_returned"] = time.time() - submitted
        status = deployment.wait(run_id, 3600)
        ended = time.time()
        watcher.stop()
        if status != "finished:completed":
            details = deployment.run_info(run_id).get("status-details")
    stopped = time.time()
    if status != "finished:completed":
        # Recorded, not raised: a failure of the engine under load is a result too.
        return {"failed": f"{status}: {details}", "whole": stopped - launched}
    result = stages(watcher, submitted, read_records(run_dir))
    result["submit_to_serverapp"] = result.pop("start_up")
    result.update(marks)
    result["status_seen_after_summary"] = ended - watcher.finished
    result["stop_all_processes"] = stopped - ended
    result["whole"] = stopped - launched
    result["clientapps"] = per_message(watcher, launched)
    return result


def per_message(watcher: Watcher, launched: float) -> list[dict]:
    """Each ClientApp process: when it started after the previous round's record (dispatch), how
    long it lived, and its CPU seconds; in start order."""
    marks = [watcher.started] + watcher.rounds
    messages = []
    for process in sorted(watcher.clientapps.values(), key=lambda p: p["created"]):
        before = max((m for m in marks if m is not None and m <= process["created"]), default=launched)
        messages.append(
            {
                "dispatch": process["created"] - before,
                "lifetime": process["last_seen"] - process["created"],
                "cpu_seconds": process["cpu_seconds"],
            }
        )
    return messages


def summarise(results: list[dict]) -> str:
    """A markdown table: the median over repeats of each stage, per engine."""

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    sims = [r["simulation"] for r in results]
    deps = [r["deployment"] for r in results if "failed" not in r["deployment"]]
    failures = [r["deployment"]["failed"] for r in results if "failed" in r["deployment"]]
    lines = [f"Deployment runs failed: {len(failures)} of {len(results)}" + "".join(f"\n- {f}" for f in failures), ""]
    if not deps:
        return "\n".join(lines) + "\n"
    lines += ["| stage | simulation s | deployment s | difference s |", "|---|--:|--:|--:|"]

    def row(name, sim, dep):
        lines.append(f"| {name} | {sim:.1f} | {dep:.1f} | {dep - sim:+.1f} |")

    row("start-up: launch (simulation) or `flwr run` (deployment) to ServerApp start",
        median(s["start_up"] for s in sims), median(d["submit_to_serverapp"] for d in deps))
    row("base-model evaluation (server side)", median(s["base_evaluation"] for s in sims),
        median(d["base_evaluation"] for d in deps))
    for k in range(len(sims[0]["rounds"])):
        sim_rounds, dep_rounds = [s["rounds"][k] for s in sims], [d["rounds"][k] for d in deps]
        row(f"round {k + 1}: train stage", median(r["train_stage"] for r in sim_rounds),
            median(r["train_stage"] for r in dep_rounds))
        row(f"round {k + 1}: slowest client's training", median(r["client_training_max"] for r in sim_rounds),
            median(r["client_training_max"] for r in dep_rounds))
    row("final evaluation (server side)", median(s["rounds"][-1]["evaluation"] for s in sims),
        median(d["rounds"][-1]["evaluation"] for d in deps))
    row("whole (deployment: SuperLink start to every process stopped)", median(s["whole"] for s in sims),
        median(d["whole"] for d in deps))
    messages = [m for d in deps for m in d["clientapps"]]
    lines += [
        "",
        "| deployment, before the job | median s |",
        "|---|--:|",
        f"| SuperLink listening | {median(d['superlink_ready'] for d in deps):.1f} |",
        f"| {SITES} keys made and registered, {SITES} SuperNodes online | "
        f"{median(d['supernodes_online'] - d['superlink_ready'] for d in deps):.1f} |",
        f"| `flwr run` (FAB built, run submitted) | {median(d['flwr_run_returned'] for d in deps):.1f} |",
        "",
        f"| deployment, per message ({len(messages)} ClientApp processes) | median s | min | max |",
        "|---|--:|--:|--:|",
    ]
    for key, name in (("dispatch", "previous record to ClientApp process start"),
                      ("lifetime", "ClientApp process lifetime"), ("cpu_seconds", "ClientApp CPU seconds")):
        values = [m[key] for m in messages]
        lines.append(f"| {name} | {median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--state", choices=["file", "memory"], default="file",
                        help="the SuperLink's state: a --database file (the README's set-up) or in memory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for repeat in range(args.repeats):
        result = {"load_before": os.getloadavg()}
        engines = (("simulation", simulate), ("deployment", lambda *paths: deploy(*paths, args.state == "file")))
        for engine, runner in engines:
            folder = args.out / f"repeat{repeat}" / engine
            run_dir = folder / "run"
            config: RunConfig = load_config(None, [*SETTINGS, *args.set, f"output.run_dir={json.dumps(str(run_dir))}"])
            folder.mkdir(parents=True, exist_ok=True)
            config_file = folder / "florist.toml"
            config_file.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
            result[engine] = runner(config_file, run_dir)
            print(f"repeat {repeat} {engine}: {result[engine]['whole']:.1f} s", flush=True)
        result["load_after"] = os.getloadavg()
        results.append(result)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = summarise(results)
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
