"""`florist bench aggregate`: every aggregation method on synthetic adapters at real model shapes.

Each (case, method) runs in a fresh Python process, so its peak memory is its own: the
process builds the clients, resets the kernel's resident-set high-water mark, aggregates,
and reports the high-water mark minus the resident set it started from. That sees every
allocation (torch's included), which tracemalloc does not. See BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from florist.aggregation import ClientAdapter, LoraFactors, lora_scale, make_aggregator
from florist.federation.resources import proc_status_kib, reset_peak_rss, set_mmap_threshold
from florist.reporting.run_directory import write_atomically


@dataclass(frozen=True)
class Preset:
    """The q_proj/v_proj weights LoRA adapts in one model: (m, n) = (out, in) features."""

    layers: int
    shapes: dict[str, tuple[int, int]]

    def modules(self) -> dict[str, tuple[int, int]]:
        return {
            f"model.layers.{layer}.self_attn.{projection}": shape
            for layer in range(self.layers)
            for projection, shape in self.shapes.items()
        }


PRESETS = {
    "llama-7b": Preset(32, {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}),
    "tinyllama": Preset(22, {"q_proj": (2048, 2048), "v_proj": (256, 2048)}),
    "smollm2-135m": Preset(30, {"q_proj": (576, 576), "v_proj": (192, 576)}),
}

# The paper's two settings: heterogeneous ranks with alpha = 2r, homogeneous rank 16 with alpha 32.
RANK_SETTINGS = {
    "hetero": [(r, 2 * r) for r in (4, 4, 8, 8, 16, 16, 32, 64)],
    "homo": [(16, 32)] * 8,
}

# Examples per client in the Dolly-15k 8-client non-IID split (shared/data/dolly-8clients).
DOLLY_CLIENT_SIZES = (1579, 685, 3775, 1830, 2152, 1776, 2531, 607)

# Synthetic spectra: component i of every client's update has singular value DECAY**i, and
# the first SHARED_DIRECTIONS directions are common to all clients up to CLIENT_NOISE. The
# aggregate then has 8 strong components and a tail below 8% of the first, as trained
# adapters' spectra become negligible after 8-10 components (tau 0.9 keeps 5-6, 0.99 12-20).
DECAY = 0.8
SHARED_DIRECTIONS = 8
CLIENT_NOISE = 0.5


@dataclass(frozen=True)
class Case:
    """A preset's modules, `clients` clients (default: one per client of the rank setting, which
    is cycled past its length, with Dolly's client sizes as weights), FLoRIST's tau."""

    preset: str
    ranks: str
    tau: float
    seed: int = 0
    clients: int | None = None

    @property
    def count(self) -> int:
        return self.clients or len(RANK_SETTINGS[self.ranks])

    def client_ranks(self) -> list[int]:
        return [client_setting(self.ranks, k)[0] for k in range(self.count)]


@dataclass(frozen=True)
class MethodRun:
    """One row: a method with its options, on all modules or on a subset of them."""

    label: str
    method: str
    options: dict = field(default_factory=dict)
    repeats: int = 5
    modules: int | None = None  # None: every module of the preset
    stream: bool = False  # clients made and added one at a time to the method's accumulator, as a server does


@dataclass(frozen=True)
class Measurement:
    label: str
    method: str
    seconds: list[float]
    seconds_median: float
    extrapolated_from_modules: int | None
    peak_extra_bytes: int | None
    flops: float | None  # None where no analytic count applies (streaming folds depend on the data)
    download_bytes_per_client: list[float]
    rank_sent_per_client: list[float]
    speedup_vs_flexlora: float | None = None
    error_bound: float | None = None  # the largest GlobalModule.error_bound (streaming rows)
    cpu_seconds_median: float | None = None  # CPU time of this process: on a shared machine, less noisy than wall time


# ---------------------------------------------------------------- synthetic adapters


def _directions(generator: torch.Generator, size: int, count: int, shared: torch.Tensor) -> torch.Tensor:
    """`count` unit-ish columns in R^size: the shared ones perturbed by client noise, then the client's own."""
    own = torch.randn(size, count, generator=generator) / math.sqrt(size)
    common = min(count, shared.shape[1])
    mixed = own.clone()
    mixed[:, :common] = math.sqrt(1 - CLIENT_NOISE**2) * shared[:, :common] + CLIENT_NOISE * own[:, :common]
    return mixed


def client_setting(ranks: str, k: int) -> tuple[int, float, float]:
    """(rank, alpha, weight) of client k: the setting's clients and Dolly's client sizes, cycled."""
    settings = RANK_SETTINGS[ranks]
    rank, alpha = settings[k % len(settings)]
    return rank, alpha, float(DOLLY_CLIENT_SIZES[k % len(DOLLY_CLIENT_SIZES)])


def synthetic_client(preset: str, ranks: str, k: int, seed: int = 0, ffa: bool = False, names: list[str] | None = None) -> ClientAdapter:
    """Client k: its update of each module is L_k diag(DECAY**i) R_k^T, split evenly into B and A.

    Module i's shared bases come from (seed, i), the client's own directions from (seed, i, k),
    so any client can be made alone, in any order: a server-side stream needs no other client in
    memory. With `ffa`, A is a prefix of one seeded initialisation per module (FFA-LoRA freezes it).
    """
    modules = PRESETS[preset].modules()
    largest = max(r for r, _ in RANK_SETTINGS[ranks])
    r, alpha, weight = client_setting(ranks, k)
    scale = lora_scale(alpha, r)
    root = DECAY ** (torch.arange(r) / 2)
    factors = {}
    for i, name in enumerate(modules):
        if names is not None and name not in names:
            continue
        m, n = modules[name]
        shared = torch.Generator().manual_seed(seed * 1_000_003 + i)
        left = torch.randn(m, SHARED_DIRECTIONS, generator=shared) / math.sqrt(m)
        right = torch.randn(n, SHARED_DIRECTIONS, generator=shared) / math.sqrt(n)
        frozen = torch.randn(largest, n, generator=shared) / math.sqrt(n) if ffa else None
        own = torch.Generator().manual_seed((seed * 1_000_003 + i) * 1_000_033 + k + 1)
        B = _directions(own, m, r, left) * root / scale
        A = frozen[:r].clone() if ffa else (_directions(own, n, r, right) * root).T.contiguous()
        factors[name] = LoraFactors(A=A, B=B, scale=scale)
    return ClientAdapter(modules=factors, weight=weight)


def synthetic_clients(preset: str, ranks: str, seed: int = 0, ffa: bool = False, names: list[str] | None = None, count: int | None = None) -> list[ClientAdapter]:
    """`count` clients (default: one per client of the rank setting) by `synthetic_client`."""
    return [synthetic_client(preset, ranks, k, seed, ffa, names) for k in range(count or len(RANK_SETTINGS[ranks]))]


# ---------------------------------------------------------------- analytic costs


def _thin_svd_flops(rows: int, cols: int) -> float:
    """Golub-Reinsch thin SVD with both singular-vector sets (Golub & Van Loan, 4th ed., fig. 8.6.1)."""
    a, b = max(rows, cols), min(rows, cols)
    return 14 * a * b**2 + 8 * b**3


def module_flops(method: str, route: str, m: int, n: int, ranks: list[int], kept: int) -> float:
    """Floating-point operations to aggregate one m x n module; `kept` is FLoRIST's rank p."""
    R = sum(ranks)
    fold = n * R  # p_k s_k folded into each client's A
    outputs = 2 * (m + n) * R * kept
    if method == "fedit":
        return 2 * (m + n) * R
    if method == "ffa":
        return 2 * m * R
    if method == "flora":
        return fold
    if method == "flexlora":
        if route == "dense":  # the paper's: form the m x n update, then its thin SVD
            return fold + 2 * m * n * R + _thin_svd_flops(m, n)
        outputs = 2 * (m + n) * R * R  # the factored route keeps every component, then truncates per client
    if route == "gram":  # two Gram products, two R x R eigh (9 R^3 each), the core's two products
        return fold + 2 * (m + n) * R**2 + 2 * 9 * R**3 + 4 * R**3 + outputs
    if route == "qr":  # Householder QR with thin Q per stack, the core product, an R x R SVD
        qr = sum(4 * side * R**2 - 4 * R**3 / 3 for side in (m, n))
        return fold + qr + 2 * R**3 + _thin_svd_flops(R, R) + outputs
    return fold + _thin_svd_flops(m, R) + _thin_svd_flops(n, R) + 2 * R**3 + _thin_svd_flops(R, R) + outputs


# ---------------------------------------------------------------- one measurement, in a fresh process


def measured_modules(preset: str, count: int | None) -> dict[str, float]:
    """The first `count` modules (all when None), each with how many of the preset's modules it stands for."""
    shapes = PRESETS[preset].modules()
    names = list(shapes)[:count] if count else list(shapes)
    total = Counter(shapes.values())
    measured = Counter(shapes[name] for name in names)
    missing = set(total) - set(measured)
    if missing:
        raise ValueError(
            f"{len(names)} module(s) cover {len(measured)} of the {len(total)} module shapes of {preset}; "
            f"measure at least {len(total)} (--flexlora-modules)"
        )
    return {name: total[shapes[name]] / measured[shapes[name]] for name in names}


def _peak_extra_bytes(work) -> tuple[object, int | None]:
    """Run `work()` once and measure the resident set it added at its peak.

    With a small mmap threshold glibc returns every large freed block to the kernel, so memory
    freed before (building the clients) cannot hide the peak. Timed runs after it use glibc's
    usual reuse of freed blocks, as a long-lived server does.
    """
    gc.collect()
    set_mmap_threshold(64 * 2**10)
    tracked = reset_peak_rss()
    start_kib = proc_status_kib("VmRSS")
    result = work()
    peak = (proc_status_kib("VmHWM") - start_kib) * 1024 if tracked else None
    set_mmap_threshold(32 * 2**20)
    return result, peak


def _stream(case: Case, run: MethodRun, names: list[str]):
    """Make each client, add it to a fresh accumulator, drop it; returns the result and the
    seconds spent in `add` and `result` (making the clients is not the server's work)."""
    accumulator = make_aggregator(run.method, **run.options).accumulator()
    spent = _Clock()
    for k in range(case.count):
        client = synthetic_client(case.preset, case.ranks, k, case.seed, ffa=run.method == "ffa", names=names)
        with spent:
            accumulator.add(client)
        del client
    with spent:
        result = accumulator.result()
    return result, spent


class _Clock:
    """Wall and CPU seconds summed over the blocks it times."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def measure(case: Case, run: MethodRun) -> Measurement:
    """Aggregate `run.repeats` times in this process; a first run measures peak memory."""
    modules = PRESETS[case.preset].modules()
    weights = measured_modules(case.preset, run.modules)
    names = list(weights)
    if run.stream:
        (result, _), peak = _peak_extra_bytes(lambda: _stream(case, run, names))
        clocks = [_stream(case, run, names)[1] for _ in range(run.repeats)]
    else:
        clients = synthetic_clients(case.preset, case.ranks, case.seed, ffa=run.method == "ffa", names=names, count=case.count)
        aggregator = make_aggregator(run.method, **run.options)
        result, peak = _peak_extra_bytes(lambda: aggregator.aggregate(clients))
        clocks = []
        for _ in range(run.repeats):
            clocks.append(_Clock())
            with clocks[-1]:
                result = aggregator.aggregate(clients)
        del clients
    seconds = [clock.wall for clock in clocks]
    client_ranks = case.client_ranks()
    if run.stream:
        flops, scale = None, len(modules) / len(names)
    else:
        route = getattr(aggregator, "route", "gram")
        per_module = {name: module_flops(run.method, route, *modules[name], client_ranks, result.modules[name].rank) for name in names}
        flops = sum(per_module[name] * weights[name] for name in names)
        scale = flops / sum(per_module.values())
    downloads, ranks_sent = [], []
    for k in range(case.count):
        received = result.for_client(k)
        downloads.append(sum(weights[n] * sum(modules[n]) * received[n].rank * received[n].A.element_size() for n in names))
        ranks_sent.append(sum(weights[n] * received[n].rank for n in names))
    return Measurement(
        label=run.label,
        method=run.method,
        seconds=[s * scale for s in seconds],
        seconds_median=statistics.median(seconds) * scale,
        extrapolated_from_modules=len(names) if len(names) < len(modules) else None,
        peak_extra_bytes=peak,
        flops=flops,
        download_bytes_per_client=downloads,
        rank_sent_per_client=ranks_sent,
        error_bound=max(m.error_bound for m in result.modules.values()) if run.stream else None,
        cpu_seconds_median=statistics.median(clock.cpu for clock in clocks) * scale,
    )


def _worker_main() -> None:
    request = json.loads(sys.argv[1])
    result = measure(Case(**request["case"]), MethodRun(**request["run"]))
    print(json.dumps(asdict(result)))


_WORKER = "from florist.bench.aggregate import _worker_main; _worker_main()"


def measure_in_subprocess(case: Case, run: MethodRun, threads: int) -> Measurement:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    request = json.dumps({"case": asdict(case), "run": asdict(run)})
    done = subprocess.run([sys.executable, "-c", _WORKER, request], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {run.label} on {case.preset}/{case.ranks} failed:\n{done.stderr}")
    return Measurement(**json.loads(done.stdout.splitlines()[-1]))


# ---------------------------------------------------------------- a whole case


def method_runs(tau: float, repeats: int, flexlora_modules: int, flexlora_repeats: int) -> list[MethodRun]:
    return [
        MethodRun(f"florist {tau:g}", "florist", {"tau": tau}, repeats),
        MethodRun(f"florist {tau:g} qr", "florist", {"tau": tau, "route": "qr"}, repeats),
        MethodRun(f"florist {tau:g} svd", "florist", {"tau": tau, "route": "svd"}, repeats),
        MethodRun("flora", "flora", {}, repeats),
        MethodRun("fedit", "fedit", {}, repeats),
        MethodRun("ffa", "ffa", {}, repeats),
        MethodRun("flexlora qr", "flexlora", {"route": "qr"}, repeats),
        # The paper's FlexLoRA (dense SVD per module): the reference the other rows' speed-ups are against.
        MethodRun("flexlora", "flexlora", {"route": "dense"}, flexlora_repeats, flexlora_modules),
    ]


def scaling_runs(tau: float, repeats: int, subset_modules: int, flexlora_repeats: int) -> list[MethodRun]:
    """Rows for many clients: FLoRIST as the server runs it (one reply at a time, bounded memory),
    the exact batched route and FlexLoRA (both holding every client; timed on a subset of modules)."""
    return [
        MethodRun(f"florist {tau:g} stream", "florist", {"tau": tau}, repeats, stream=True),
        MethodRun(f"florist {tau:g} batched", "florist", {"tau": tau}, 1, subset_modules),
        MethodRun("flexlora", "flexlora", {"route": "dense"}, flexlora_repeats, subset_modules),
    ]


def adapter_bytes(case: Case) -> int:
    """Bytes of every client's A and B for every module (fp32), computed from the shapes."""
    ranks = sum(case.client_ranks())
    return sum((m + n) * ranks * 4 for m, n in PRESETS[case.preset].modules().values())


def run_case(case: Case, runs: list[MethodRun], threads: int, progress=None) -> dict:
    for run in runs:
        measured_modules(case.preset, run.modules)  # refuse a bad subset before any process starts
    rows = []
    for run in runs:
        if progress:
            progress(f"{case.preset} {case.ranks} {case.count} clients: {run.label}")
        rows.append(measure_in_subprocess(case, run, threads))
    flexlora = next((row for row in rows if row.label == "flexlora"), None)
    rows = [
        Measurement(**{**asdict(row), "speedup_vs_flexlora": flexlora.seconds_median / row.seconds_median if flexlora else None})
        for row in rows
    ]
    return {
        **asdict(case),
        "modules": len(PRESETS[case.preset].modules()),
        "clients": case.count,
        "client_ranks": case.client_ranks(),
        "client_adapter_bytes": adapter_bytes(case),
        "rows": [asdict(row) for row in rows],
    }


def machine(threads: int) -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------- output


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def _spread(values: list[float], fmt) -> str:
    low, high = min(values), max(values)
    return fmt(low) if math.isclose(low, high) else f"{fmt(low)}-{fmt(high)}"


def render(case: dict) -> Table:
    adapters = case["client_adapter_bytes"]
    extrapolated = {row["extrapolated_from_modules"] for row in case["rows"]} - {None}
    ranks = case["client_ranks"]
    clients = f"ranks {ranks}" if len(ranks) <= 8 else f"{len(ranks)} clients of ranks {sorted(set(ranks))}"
    table = Table(
        title=f"{case['preset']}, {case['ranks']} {clients}, {case['modules']} modules, "
        f"client adapters {_mib(adapters)} MiB (fp32)",
        caption=f"* timed on the first {', '.join(map(str, extrapolated))} modules and extrapolated by FLOP share; "
        "peak memory is for those modules" if extrapolated else None,
    )
    bounded = any(row.get("error_bound") is not None for row in case["rows"])
    columns = ["method", "median s", "cpu s", "vs flexlora", "peak extra MiB", "x adapters", "GFLOP", "download/client MiB", "rank sent"]
    for column in columns + ["error bound"] * bounded:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for row in case["rows"]:
        peak = row["peak_extra_bytes"]
        cells = [
            row["label"] + ("*" if row["extrapolated_from_modules"] else ""),
            f"{row['seconds_median']:.3g}",
            "-" if row.get("cpu_seconds_median") is None else f"{row['cpu_seconds_median']:.3g}",
            f"{row['speedup_vs_flexlora']:,.0f}x" if row["speedup_vs_flexlora"] else "-",
            "n/a" if peak is None else _mib(peak),
            "n/a" if peak is None else f"{peak / adapters:.2f}",
            "-" if row["flops"] is None else f"{row['flops'] / 1e9:,.2f}",
            _spread(row["download_bytes_per_client"], _mib),
            _spread(row["rank_sent_per_client"], lambda r: f"{r:,.0f}"),
        ]
        if bounded:
            cells.append("-" if row.get("error_bound") is None else f"{row['error_bound']:.3g}")
        table.add_row(*cells)
    return table


def plot_scaling(report: dict, path: Path) -> None:
    """Server seconds and peak extra memory against the number of clients, one line per method (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted(report["cases"], key=lambda case: case["clients"])
    labels = [row["label"] for row in cases[0]["rows"]]
    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label in labels:
        rows = [(case["clients"], next(row for row in case["rows"] if row["label"] == label)) for case in cases]
        marker = "--o" if rows[0][1]["extrapolated_from_modules"] else "-o"
        counts = [k for k, _ in rows]
        time_axis.plot(counts, [row["seconds_median"] for _, row in rows], marker, label=label)
        memory_axis.plot(counts, [row["peak_extra_bytes"] / 2**20 for _, row in rows], marker, label=label)
    first = cases[0]
    time_axis.set(xscale="log", yscale="log", xlabel="clients per round", ylabel="aggregation wall seconds")
    memory_axis.set(xscale="log", yscale="log", xlabel="clients per round", ylabel="server peak extra MiB")
    for axis in (time_axis, memory_axis):
        axis.set_xticks([case["clients"] for case in cases], [str(case["clients"]) for case in cases])
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=8)
    fig.suptitle(
        f"{first['preset']}, {len(set(first['client_ranks']))} rank setting {sorted(set(first['client_ranks']))}, "
        f"tau {first['tau']:g} (dashed: timed on a subset of modules, extrapolated)",
        fontsize=9,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


def write_json(path: Path, report: dict) -> None:
    write_atomically(path, json.dumps(report, indent=2))
