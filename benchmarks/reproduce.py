"""Reproduction benchmark (issue 4): the FLoRIST paper's Dolly grid, scaled down to run on a 2-core CPU.

Every cell has its run directory under OUT/<setting>/<method or florist-tauX>/seed<k>. The paper's Dolly
setting is one round, in which every client trains from the base model, seeded by (seed, round, client):
the clients' training is then the same whatever the server does afterwards, except under FFA-LoRA, whose
clients freeze A. So per setting and seed, two cells run a whole federation (`florist run`, in its own
process): FLoRA, whose server saves the adapters it received, and FFA-LoRA. FedIT, FlexLoRA and FLoRIST at
every tau re-aggregate FLoRA's saved round-1 adapters with their own aggregator and are evaluated in this
process by the same server model code. Every method thus sees exactly the same client updates (a paired
comparison), and the grid costs 2 trainings instead of 10 per setting and seed.

A cell whose run directory holds summary.json is done and skipped; a half-finished one is removed and run
again, so an interrupted grid resumes where it stopped. `--report` only rebuilds results.md, results.json,
pareto.png and ranks_per_layer.png from the cells that exist.

Tau for FLoRIST-O and FLoRIST-E is chosen on the validation loss (examples carved from the training
clients, never trained on), never on a test metric; see `select_taus`.

    python benchmarks/reproduce.py --grid full --out runs/reproduce          # run (resumes), then report
    python benchmarks/reproduce.py --out runs/reproduce --report             # report what exists
    python benchmarks/reproduce.py --paper-scale --out runs/paper            # TinyLlama-1.1B on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from florist.config import load_config  # noqa: E402
from florist.federation.payload import VALUE_BYTES  # noqa: E402
from florist.reporting.plots import rank_matrix  # noqa: E402
from florist.reporting.run_directory import read_rounds, write_atomically  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "benchmarks" / "reproduce.toml"

SETTINGS = {"homogeneous": [16], "heterogeneous": [4, 4, 8, 8, 16, 16, 32, 64]}
BASELINES = ("fedit", "flora", "flexlora", "ffa")
# FLoRA's run is the source whose saved client adapters the other shared-training methods re-aggregate.
SOURCE = "flora"
FEDERATED = (SOURCE, "ffa")
TAUS = (0.80, 0.85, 0.90, 0.95, 0.99, 1.0)
NAMES = {"fedit": "FedIT", "flora": "FLoRA", "flexlora": "FlexLoRA", "ffa": "FFA-LoRA", "florist": "FLoRIST"}
MB = 1e6

# Metric columns of the table: (key in a cell record, heading, digits, lower is better).
METRICS = (
    ("test_loss", "Dolly test loss", 4, True),
    ("rouge_l", "ROUGE-L", 4, False),
    ("mmlu_accuracy", "MMLU acc.", 4, False),
    ("val_loss", "val. loss", 4, True),
    ("download_mb", "down MB/client/round", 3, True),
    ("upload_mb", "up MB/client/round", 3, True),
    ("rank_sent", "total rank sent", 1, True),
    ("aggregation_seconds", "server agg. s", 4, True),
)
QUALITY = ("test_loss", "rouge_l")

# The quick grid only checks the pipeline end to end: tiny data, two steps, a sliver of MMLU.
QUICK_SCALE = (
    "data.max_client_examples=10",
    "data.max_length=128",
    "training.local_steps=2",
    "evaluation.max_new_tokens=8",
    "evaluation.mmlu_limit=16",
)
# The paper's Dolly setting on a GPU: whole clients, 512 tokens, lr 3e-4, 3 local epochs of the mean
# client (1,680 examples after carving 10% for validation, at batch 16: 315 steps; the trainer has no
# gradient accumulation, so the paper's batch 128 is its micro-batch 16 here), the whole MMLU subset.
PAPER_SCALE = (
    "data.max_client_examples=0",
    "data.max_length=512",
    "data.validation_fraction=0.1",
    "training.local_steps=315",
    "training.batch_size=16",
    "training.learning_rate=3e-4",
    "evaluation.max_new_tokens=128",
    "evaluation.batch_size=32",
    "evaluation.mmlu_limit=0",
    "federation.workers=1",
    'model.autocast="bf16"',
)
PAPER_MODEL = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"


@dataclass(frozen=True)
class Cell:
    setting: str
    method: str
    tau: float | None
    seed: int

    @property
    def label(self) -> str:
        return f"florist-tau{self.tau:.2f}" if self.method == "florist" else self.method

    def path(self, out: Path) -> Path:
        return out / self.setting / self.label / f"seed{self.seed}"

    @property
    def replayed(self) -> bool:
        """Re-aggregates the source run's client adapters instead of running a federation of its own."""
        return self.method not in FEDERATED

    @property
    def source(self) -> Cell:
        return Cell(self.setting, SOURCE, None, self.seed)

    def overrides(self, out: Path, evaluate_base: bool = False) -> list[str]:
        chosen = [
            f"aggregation.method={json.dumps(self.method)}",
            f"federation.ranks={SETTINGS[self.setting]}",
            f"training.seed={self.seed}",
            f"output.run_dir={json.dumps(str(self.path(out)))}",
            f"evaluation.base={str(evaluate_base).lower()}",
        ]
        if self.method == SOURCE:
            chosen.append("output.save_client_adapters=true")
        return chosen + ([f"aggregation.tau={self.tau}"] if self.tau is not None else [])


@dataclass(frozen=True)
class Grid:
    settings: tuple[str, ...]
    baselines: tuple[str, ...]
    taus: tuple[float, ...]
    scale: tuple[str, ...] = ()

    def cells(self, seeds: Sequence[int]) -> list[Cell]:
        """Seed by seed, so that a partial grid holds whole seeds first; the source run before its replays."""
        methods = [*(b for b in self.baselines if b in FEDERATED), *(b for b in self.baselines if b not in FEDERATED)]
        return [
            Cell(setting, method, tau, seed)
            for seed in seeds
            for setting in self.settings
            for method, tau in [*((b, None) for b in methods), *(("florist", t) for t in self.taus)]
        ]


GRIDS = {
    "full": Grid(tuple(SETTINGS), BASELINES, TAUS),
    "quick": Grid(("heterogeneous",), ("flora", "fedit"), (0.90,), QUICK_SCALE),
}


# ---------------------------------------------------------------- running

# Ray hides the GPU from workers that ask for none (as `florist run` asks): keep it visible, so that
# --paper-scale clients train on CUDA. Ray also starts its workers at niceness 15, where on a shared
# machine the clients (the bulk of a cell's work) starve: keep them at the server's priority.
CELL_ENV = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_worker_niceness": "0"}


def child_cpu_seconds() -> float:
    """CPU time of finished child processes: on a shared machine it says what a cell costs better than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_federation_cell(command: Sequence[str], log, timeout: float) -> bool:
    """`florist run` in its own session, killed with every process it started (Ray's) after `timeout` s.

    Ray's raylet can die while starting on a saturated machine (a dashboard agent that does not come up
    in time), and the simulation then waits forever: the timeout turns that into a failed cell.
    """
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=CELL_ENV, start_new_session=True)
    try:
        return process.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        log.write(f"\nreproduce: cell stopped after {timeout:.0f} s\n")
        return False
    finally:
        if process.poll() is None:  # timed out, or this script was interrupted
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_grid(cells: Sequence[Cell], out: Path, scale: Sequence[str], cell_timeout: float = 3600) -> list[Cell]:
    """Run every unfinished cell in turn; returns the cells that failed (their logs say why).

    Only the grid's first cell evaluates the base model: it is the same for every cell.
    """
    failed = []
    replay = Replayer()
    for index, cell in enumerate(cells, 1):
        target = cell.path(out)
        if (target / "summary.json").exists():
            continue
        shutil.rmtree(target, ignore_errors=True)  # a half-finished run directory is redone from scratch
        overrides = [*scale, *cell.overrides(out, evaluate_base=index == 1)]
        config = load_config(CONFIG, overrides)  # a bad override fails here, in one line, before any cell runs
        log = out / "logs" / cell.setting / cell.label / f"seed{cell.seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        kind = f"replaying {cell.source.label}'s clients" if cell.replayed else "federated run"
        print(f"[{index}/{len(cells)}] {cell.setting} {cell.label} seed {cell.seed} ({config.model.name}, {kind}) ...", flush=True)
        # A replayed cell runs in this process, a federated one in a child.
        cpu_seconds = time.process_time if cell.replayed else child_cpu_seconds
        start, cpu_start = time.perf_counter(), cpu_seconds()
        with open(log, "w") as stream:
            if cell.replayed:
                ok = replay(config, cell.source.path(out), stream)
            else:
                command = [sys.executable, "-m", "florist.cli", "run", "--config", str(CONFIG)]
                ok = run_federation_cell([*command, *(part for item in overrides for part in ("--set", item))], stream, cell_timeout)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
        status = "done" if ok and (target / "summary.json").exists() else f"FAILED, see {log}"
        print(f"    {status} in {seconds:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        timing = {"cell": str(target.relative_to(out)), "seconds": seconds, "cpu_seconds": cpu, "ok": status == "done"}
        with open(out / "timings.jsonl", "a") as stream:
            stream.write(json.dumps(timing) + "\n")
        if status != "done":
            failed.append(cell)
    return failed


class Replayer:
    """Aggregates a finished run's round-1 client adapters with another method and evaluates the result.

    The server model (and MMLU) is loaded once for every replayed cell; its evaluation is the server's own.
    """

    def __init__(self):
        self.server = None
        self.mmlu = None
        self.key = None

    def __call__(self, config, source: Path, log) -> bool:
        try:
            self._replay(config, source, log)
            return True
        except Exception:  # the cell fails, with its traceback in its log; the grid goes on
            traceback.print_exc(file=log)
            return False

    def _replay(self, config, source: Path, log) -> None:
        from florist.aggregation import make_aggregator
        from florist.federation.datasets import federated_data
        from florist.federation.delivery import GlobalUpdate
        from florist.federation.server_app import mmlu_questions, round_record
        from florist.federation.server_model import ServerModel
        from florist.federation.reports import ClientReport, RoundReport
        from florist.lora.adapters import read_adapters
        from florist.reporting.run_directory import RunDirectory

        if not (source / "summary.json").exists():
            raise RuntimeError(f"source run {source} has not finished; its cell must run first")
        key = config.model_dump_json(include={"model", "data", "evaluation"})
        if key != self.key:  # every cell of a grid shares them, so the model loads once
            self.server, self.mmlu, self.key = ServerModel(config), mmlu_questions(config), key
        clients_dir = source / "clients" / "round1"
        index = json.loads((clients_dir / "clients.json").read_text())
        adapters = read_adapters([clients_dir / c["adapter"] for c in index], [c["weight"] for c in index])
        start = time.perf_counter()
        aggregate = make_aggregator(config.aggregation.method, **config.aggregation.options()).aggregate(adapters)
        seconds = time.perf_counter() - start
        run = RunDirectory.create(config)
        run.record_round(round_record(0, None, {}, None, {}))
        evaluation_start = time.perf_counter()
        self.server.set_state([GlobalUpdate(aggregate.modules, aggregate.dense)], None)
        data = federated_data(config)
        evaluation = self.server.evaluate(data.test, self.mmlu, data.validation)
        source_round = next(r for r in read_rounds(source) if r["round"] == 1)
        report = RoundReport(
            1,
            sampled=[c["node"] for c in source_round["clients"]],
            clients=[ClientReport(**c) for c in source_round["clients"]],
            aggregation_seconds=seconds,
            ranks={name: module.rank for name, module in aggregate.modules.items()},
            energy={name: module.energy for name, module in aggregate.modules.items()},
        )
        timing = {"evaluation_seconds": time.perf_counter() - evaluation_start}
        run.record_round(round_record(1, report, evaluation, None, timing))
        summary = {"base": {}, "final": evaluation, "rounds": 1, "method": config.aggregation.method, "replayed_from": str(source)}
        run.write_json("summary.json", summary)
        print(f"replayed {source}: aggregation {seconds:.4f} s, evaluation {json.dumps(evaluation)}", file=log, flush=True)


# ---------------------------------------------------------------- reading cells


@lru_cache(maxsize=4)
def module_shapes(model_name: str, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every adapted module, from the model's config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from florist.federation.server_model import adapted_modules
    from florist.models import resolve_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model_name)))
    return {name: (m.out_features, m.in_features) for name, m in adapted_modules(model, targets).items()}


def downloaded_ranks(method: str, module_ranks: dict[str, int], client_ranks: Sequence[int]) -> list[dict[str, int]]:
    """The rank of each module that each client downloads after a round.

    FlexLoRA sends client k its own rank-r_k truncation; every other method sends all clients the
    same global modules (FLoRA: the whole stack, FedIT: padded to the largest rank).
    """
    if method == "flexlora":
        return [{name: rank for name in module_ranks} for rank in client_ranks]
    return [dict(module_ranks) for _ in client_ranks]


def download_bytes(method: str, per_client: Sequence[dict[str, int]], shapes: dict[str, tuple[int, int]], wire_bytes: int) -> float:
    """Mean bytes one client downloads: the factors of the aggregate (FFA-LoRA: B only, A comes from the seed).

    The run's own `bytes_down` counts what a round's message carried, which is nothing in a one-round
    federation (the aggregate is never sent), so the size of the aggregate is counted here instead.
    """
    width = (lambda out, inp: out) if method == "ffa" else (lambda out, inp: out + inp)
    totals = [sum(width(*shapes[name]) * rank for name, rank in ranks.items()) for ranks in per_client]
    return wire_bytes * sum(totals) / len(totals)


def read_cell(run_dir: Path) -> dict:
    """One finished cell as a flat record: identity, final quality, communication and server cost."""
    config = load_config(run_dir / "config.toml", check_sources=False)  # a finished cell: its data may be gone
    summary = json.loads((run_dir / "summary.json").read_text())
    trained = [r for r in read_rounds(run_dir) if r.get("clients")]
    final = summary["final"]
    ranks = SETTINGS_BY_RANKS.get(tuple(config.federation.ranks), "custom")
    method = config.aggregation.method
    shapes = module_shapes(config.model.name, tuple(config.model.target_modules))
    wire = VALUE_BYTES[config.wire.download]
    downloads = [
        downloaded_ranks(method, r["ranks"], [c["rank"] for c in sorted(r["clients"], key=lambda c: c["partition"])])
        for r in trained
    ]
    return {
        "setting": ranks,
        "method": method,
        "tau": config.aggregation.tau if method == "florist" else None,
        "seed": config.training.seed,
        "test_loss": final.get("test_loss"),
        "rouge_l": final.get("rouge_l"),
        "mmlu_accuracy": final.get("mmlu_accuracy"),
        "val_loss": final.get("val_loss"),
        "download_mb": statistics.mean(download_bytes(method, d, shapes, wire) for d in downloads) / MB,
        "upload_mb": statistics.mean(c["bytes_up"] for r in trained for c in r["clients"]) / MB,
        "rank_sent": statistics.mean(statistics.mean(sum(k.values()) for k in d) for d in downloads),
        "aggregation_seconds": statistics.mean(r["aggregation_seconds"] for r in trained),
        "ranks": trained[-1]["ranks"],
        "mmlu_pred_dist": final.get("mmlu_pred_dist"),
        "mmlu_always": {k.removeprefix("mmlu_always_"): v for k, v in final.items() if k.startswith("mmlu_always_")},
        "base": {k: summary["base"].get(k) for k in ("test_loss", "rouge_l", "mmlu_accuracy", "val_loss")},
        "scale": scale_of(config),
    }


SETTINGS_BY_RANKS = {tuple(ranks): name for name, ranks in SETTINGS.items()}


def scale_of(config) -> dict:
    """The knobs that set a cell's scale, stated next to the results."""
    return {
        "model": config.model.name,
        "examples per client (before validation carve)": config.data.max_client_examples or "all",
        "validation fraction": config.data.validation_fraction,
        "max length (tokens)": config.data.max_length,
        "rounds": config.federation.rounds,
        "local steps": config.training.local_steps,
        "batch size": config.training.batch_size,
        "learning rate": config.training.learning_rate,
        "wire dtype": config.wire.download,
        "ROUGE-L max new tokens": config.evaluation.max_new_tokens,
        "MMLU questions": config.evaluation.mmlu_limit or "all 1,444",
    }


def finished_cells(out: Path) -> list[dict]:
    return [read_cell(summary.parent) for summary in sorted(out.glob("*/*/seed*/summary.json"))]


# ---------------------------------------------------------------- aggregating


def row_key(record: dict) -> str:
    return f"florist-tau{record['tau']:.2f}" if record["method"] == "florist" else record["method"]


def row_name(key: str) -> str:
    if key.startswith("florist-tau"):
        return f"FLoRIST (tau {key.removeprefix('florist-tau')})"
    return NAMES[key]


def mean_std(values: Iterable[float | None]) -> dict:
    """Mean, sample standard deviation (0 for a single value) and count, ignoring missing values."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(present), "std": statistics.stdev(present) if len(present) > 1 else 0.0, "n": len(present)}


def aggregate_rows(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{setting: {row key: {metric: mean/std/n}}} over seeds, plus `tau` and `seeds` per row."""
    table: dict[str, dict[str, dict]] = {}
    for setting in sorted({r["setting"] for r in records}):
        mine = [r for r in records if r["setting"] == setting]
        rows = {}
        for key in sorted({row_key(r) for r in mine}, key=row_order):
            group = [r for r in mine if row_key(r) == key]
            rows[key] = {metric: mean_std(r[metric] for r in group) for metric, *_ in METRICS}
            rows[key]["tau"] = group[0]["tau"]
            rows[key]["seeds"] = sorted(r["seed"] for r in group)
        table[setting] = rows
    return table


def row_order(key: str) -> tuple[int, str]:
    order = [*BASELINES, "florist"]
    return (order.index(key.split("-")[0]) if key.split("-")[0] in order else len(order), key)


def select_taus(rows: dict[str, dict], metric: str = "val_loss") -> dict:
    """FLoRIST-O and FLoRIST-E chosen on the validation loss (lower is better), never on the test metrics.

    - FLoRIST-O: the tau with the lowest mean validation loss over seeds (a tie goes to the lower tau,
      which downloads less).
    - FLoRIST-E: the lowest tau whose mean validation loss is at most the best baseline's mean plus that
      baseline's standard deviation over seeds ("matches the best baseline"); None when no tau does.
    - The best baseline is the baseline (FedIT, FLoRA, FlexLoRA, FFA-LoRA) with the lowest mean validation loss.
    """
    taus = {row["tau"]: row[metric]["mean"] for key, row in rows.items() if key.startswith("florist") and row[metric]["n"]}
    baselines = {key: rows[key][metric] for key in BASELINES if key in rows and rows[key][metric]["n"]}
    if not taus:
        return {"optimal": None, "efficient": None, "best_baseline": None}
    optimal = min(sorted(taus), key=lambda tau: taus[tau])
    if not baselines:
        return {"optimal": optimal, "efficient": None, "best_baseline": None}
    best = min(baselines, key=lambda key: baselines[key]["mean"])
    bound = baselines[best]["mean"] + baselines[best]["std"]
    matching = [tau for tau in sorted(taus) if taus[tau] <= bound]
    return {"optimal": optimal, "efficient": matching[0] if matching else None, "best_baseline": best}


def check_targets(rows: dict[str, dict], selection: dict) -> list[str]:
    """Issue 4's targets, each as one line saying whether it was met."""
    lines = []
    best = selection["best_baseline"]
    for name, tau in (("FLoRIST-O", selection["optimal"]), ("FLoRIST-E", selection["efficient"])):
        if tau is None or best is None:
            lines.append(f"- {name}: no tau selected, so no comparison.")
            continue
        mine = rows[f"florist-tau{tau:.2f}"]
        for metric, heading, digits, lower in METRICS:
            if metric not in QUALITY or not mine[metric]["n"] or not rows[best][metric]["n"]:
                continue
            ours, theirs = mine[metric]["mean"], rows[best][metric]
            gap = ours - theirs["mean"] if lower else theirs["mean"] - ours  # > 0: FLoRIST is worse
            verdict = "met" if gap <= theirs["std"] else "NOT met"
            lines.append(
                f"- {name} (tau {tau:.2f}) vs best baseline {NAMES[best]} on {heading}: "
                f"{ours:.{digits}f} vs {theirs['mean']:.{digits}f} ± {theirs['std']:.{digits}f}: within one std: {verdict}."
            )
    efficient = selection["efficient"] or selection["optimal"]
    if efficient is not None:
        down = rows[f"florist-tau{efficient:.2f}"]["download_mb"]["mean"]
        if "flora" in rows:
            ratio = rows["flora"]["download_mb"]["mean"] / down
            lines.append(f"- Download: FLoRA / FLoRIST (tau {efficient:.2f}) = {ratio:.1f}x (target >= 5x): {'met' if ratio >= 5 else 'NOT met'}.")
        if "fedit" in rows:
            fedit = rows["fedit"]["download_mb"]["mean"]
            lines.append(f"- Download: FLoRIST {down:.3f} MB vs FedIT {fedit:.3f} MB (target: smaller): {'met' if down < fedit else 'NOT met'}.")
    return lines


# ---------------------------------------------------------------- writing


def cell_text(stats: dict, digits: int) -> str:
    if not stats["n"]:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def table_lines(rows: dict[str, dict], selection: dict) -> list[str]:
    """The paper's layout: one row per method (and tau), one column per metric, mean ± std over seeds."""
    header = ["method", "tau", *(heading for _, heading, *_ in METRICS), "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    chosen = [("FLoRIST-O", selection["optimal"]), ("FLoRIST-E", selection["efficient"])]
    ordered = [(row_name(key), key) for key in rows] + [
        (name, f"florist-tau{tau:.2f}") for name, tau in chosen if tau is not None
    ]
    for name, key in ordered:
        row = rows[key]
        tau = f"{row['tau']:.2f}" if row["tau"] is not None else ""
        values = [cell_text(row[metric], digits) for metric, _, digits, _ in METRICS]
        lines.append("| " + " | ".join([f"**{name}**" if name.startswith("FLoRIST-") else name, tau, *values, str(len(row["seeds"]))]) + " |")
    return lines


def paired_differences(records: Sequence[dict], reference: str, metric: str) -> dict[str, dict]:
    """Per row: mean ± std over seeds of (row - reference) on `metric`, seed by seed.

    All rows of a seed saw the same client updates (FFA-LoRA aside: its own clients, same data and seed),
    so the seed-to-seed spread of the data carve and initialisation cancels in the difference.
    """
    by_seed = {r["seed"]: r[metric] for r in records if row_key(r) == reference and r[metric] is not None}
    keys = sorted({row_key(r) for r in records}, key=row_order)
    return {
        key: mean_std(r[metric] - by_seed[r["seed"]] for r in records if row_key(r) == key and r["seed"] in by_seed and r[metric] is not None)
        for key in keys
        if key != reference
    }


def paired_lines(records: Sequence[dict], rows: dict[str, dict], reference: str) -> list[str]:
    """Each row against `reference`, paired by seed: a difference of zero within its std is a tie."""
    metrics = [m for m in METRICS if m[0] in (*QUALITY, "val_loss")]
    differences = {metric: paired_differences(records, reference, metric) for metric, *_ in metrics}
    lines = ["| method | tau | " + " | ".join(f"Δ {heading}" for _, heading, *_ in metrics) + " | n |", "|---|---|" + "---|" * len(metrics) + "---|"]
    for key in (k for k in rows if k != reference):
        tau = f"{rows[key]['tau']:.2f}" if rows[key]["tau"] is not None else ""
        values = [cell_text(differences[metric][key], digits) for metric, _, digits, _ in metrics]
        lines.append(f"| {row_name(key)} | {tau} | " + " | ".join(values) + f" | {differences[metrics[0][0]][key]['n']} |")
    return lines


def mmlu_lines(records: Sequence[dict], rows: dict[str, dict]) -> list[str]:
    """Predicted-letter shares beside MMLU: a model that only spreads its letters is not one that learned."""
    lines = ["| method | tau | MMLU acc. | predicted A / B / C / D (share) |", "|---|---|---|---|"]
    for key, row in rows.items():
        group = [r for r in records if row_key(r) == key and r["mmlu_pred_dist"]]
        if not group:
            continue
        shares = [statistics.mean(r["mmlu_pred_dist"][letter] / sum(r["mmlu_pred_dist"].values()) for r in group) for letter in "ABCD"]
        tau = f"{row['tau']:.2f}" if row["tau"] is not None else ""
        lines.append(f"| {row_name(key)} | {tau} | {cell_text(row['mmlu_accuracy'], 4)} | {' / '.join(f'{s:.2f}' for s in shares)} |")
    always = next((r["mmlu_always"] for r in records if r["mmlu_always"]), None)
    if always:
        lines.append("")
        lines.append("Always-one-letter baselines: " + ", ".join(f"always-{k} {v:.4f}" for k, v in sorted(always.items())) + ".")
    return lines


def write_report(out: Path, expected: int) -> Path:
    records = finished_cells(out)
    table = aggregate_rows(records)
    selections = {setting: select_taus(rows) for setting, rows in table.items()}
    lines = ["# Reproduction benchmark (issue 4)", ""]
    lines.append(f"{len(records)} of {expected} cells finished" + (" (a partial grid)." if len(records) < expected else "."))
    if records:
        lines += ["", "Scale of these cells:", ""] + [f"- {k}: {v}" for k, v in records[0]["scale"].items()]
        first = next((r for r in records if any(v is not None for v in r["base"].values())), None)
        if first:
            measured = ", ".join(f"{k} {v:.4f}" for k, v in first["base"].items() if v is not None)
            lines += ["", f"Base model (before federation), evaluated once, in the {first['setting']} seed {first['seed']} cell "
                      f"(val_loss is on that seed's validation carve): {measured}."]
    lines += ["", "Mean ± sample std over seeds; n = seeds. Download: the aggregate's factors one client receives",
              "after a round (FLoRA: the whole stack; FlexLoRA: the client's own truncation; FFA-LoRA: B only).",
              "Tau rule: FLoRIST-O = lowest mean validation loss; FLoRIST-E = lowest tau whose mean validation loss",
              "is within one std of the best baseline's (validation carved from the training clients; test never used)."]
    for setting, rows in table.items():
        selection = selections[setting]
        lines += ["", f"## {setting.capitalize()} ranks {SETTINGS.get(setting, '')}", "", *table_lines(rows, selection), ""]
        best = NAMES[selection["best_baseline"]] if selection["best_baseline"] else "none"
        lines += [f"Selected on validation loss: FLoRIST-O tau {selection['optimal']}, FLoRIST-E tau {selection['efficient']}, best baseline {best}.", ""]
        lines += ["Targets:", "", *check_targets(rows, selection), ""]
        if selection["best_baseline"]:
            mine = [r for r in records if r["setting"] == setting]
            lines += [f"Paired by seed, each row minus {NAMES[selection['best_baseline']]} (the best baseline on validation loss):", ""]
            lines += [*paired_lines(mine, rows, selection["best_baseline"]), ""]
        lines += ["MMLU beside its letter baselines:", "", *mmlu_lines([r for r in records if r["setting"] == setting], rows)]
    write_atomically(out / "results.md", "\n".join(lines) + "\n")
    write_atomically(out / "results.json", json.dumps({"cells": records, "rows": table, "selection": selections, "expected_cells": expected}, indent=2) + "\n")
    if records:
        plot_pareto(table, out / "pareto.png")
        plot_ranks_per_layer(records, out / "ranks_per_layer.png")
    return out / "results.md"


def plot_pareto(table: dict[str, dict[str, dict]], target: Path) -> None:
    """Quality against download per client: FLoRIST's taus as a line, each baseline a point."""
    quality = [m for m in METRICS if m[0] in QUALITY]
    fig, axes = plt.subplots(len(quality), len(table), figsize=(5.5 * len(table), 3.8 * len(quality)), squeeze=False)
    for column, (setting, rows) in enumerate(table.items()):
        for line, (metric, heading, _, _) in enumerate(quality):
            ax = axes[line, column]
            florist = [row for key, row in rows.items() if key.startswith("florist") and row[metric]["n"]]
            if florist:
                x = [row["download_mb"]["mean"] for row in florist]
                y = [row[metric]["mean"] for row in florist]
                ax.errorbar(x, y, yerr=[row[metric]["std"] for row in florist], fmt="-o", color="k", capsize=3, label="FLoRIST")
                for row, xi, yi in zip(florist, x, y):
                    ax.annotate(f"{row['tau']:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
            for key in BASELINES:
                if key in rows and rows[key][metric]["n"]:
                    row = rows[key]
                    ax.errorbar(row["download_mb"]["mean"], row[metric]["mean"], yerr=row[metric]["std"], fmt="s", capsize=3, label=NAMES[key])
            ax.set_xscale("log")
            ax.set(xlabel="download MB per client per round (log)", ylabel=heading, title=f"{setting}: {heading}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def plot_ranks_per_layer(records: Sequence[dict], target: Path) -> None:
    """The rank FLoRIST keeps per layer, one line per tau (mean over seeds), q_proj and v_proj apart."""
    settings = sorted({r["setting"] for r in records if r["method"] == "florist"})
    if not settings:
        return
    kinds = sorted({name.rsplit(".", 1)[-1] for r in records for name in r["ranks"]})
    fig, axes = plt.subplots(len(settings), len(kinds), figsize=(5.5 * len(kinds), 3.5 * len(settings)), squeeze=False)
    for line, setting in enumerate(settings):
        florist = [r for r in records if r["setting"] == setting and r["method"] == "florist"]
        for tau in sorted({r["tau"] for r in florist}):
            matrices = [rank_matrix(r["ranks"]) for r in florist if r["tau"] == tau]
            layers, found, _ = matrices[0]
            mean = sum(m for _, _, m in matrices) / len(matrices)
            for column, kind in enumerate(kinds):
                axes[line, column].plot(layers, mean[found.index(kind)], marker=".", label=f"tau {tau:.2f}")
        for column, kind in enumerate(kinds):
            axes[line, column].set(xlabel="layer", ylabel="rank kept", title=f"{setting}: {kind}")
            axes[line, column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def positive_seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return seconds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full", help="full: issue 4's grid; quick: a pipeline check")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce", help="results root (resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2; quick: 0)")
    parser.add_argument("--paper-scale", action="store_true", help="the paper's scale on a GPU: TinyLlama-1.1B, whole clients, bf16")
    parser.add_argument("--model", default=PAPER_MODEL, help=f"model of --paper-scale (default {PAPER_MODEL})")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plots from the cells that exist")
    parser.add_argument("--cell-timeout", type=positive_seconds, default=3600, help="seconds after which a federated cell is stopped and counted failed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    grid = GRIDS[args.grid]
    seeds = args.seeds or ([0] if args.grid == "quick" else [0, 1, 2])
    cells = grid.cells(seeds)
    out = args.out.resolve()
    failed: list[Cell] = []
    if not args.report:
        scale = [*grid.scale, *(PAPER_SCALE + (f"model.name={json.dumps(args.model)}",) if args.paper_scale else ())]
        failed = run_grid(cells, out, scale, args.cell_timeout)
    print(f"report: {write_report(out, len(cells))}")
    if failed:
        print(f"{len(failed)} cells failed; run the same command again to retry them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:
        sys.exit(f"reproduce: error: {error}")
