"""What a reproduction grid holds: settings (client ranks), rows (a method with its settings), a scale
(configuration overrides shared by every cell) and seeds; and which of its cells may be replayed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from florist.config import DEFAULT_CONFIG

CONFIG = DEFAULT_CONFIG.with_name("reproduce.toml")
"""The grid's base configuration: the paper's Dolly setting at this machine's scale."""

SETTINGS = {"homogeneous": [16], "heterogeneous": [4, 4, 8, 8, 16, 16, 32, 64]}
BASELINES = ("fedit", "flora", "flexlora", "ffa")
NAMES = {"fedit": "FedIT", "flora": "FLoRA", "flexlora": "FlexLoRA", "ffa": "FFA-LoRA", "florist": "FLoRIST"}
TAUS = (0.80, 0.85, 0.90, 0.95, 0.99, 1.0)
FLORIST_METHODS = ("florist", "florist-secure")
"""The methods whose rank tau (or a budget) picks, from the factors or from summed sketches."""


@dataclass(frozen=True)
class Row:
    """One row of the comparison: an aggregation method, its tau, and any other setting it changes.

    `label` names the row's directory and its key in the report; `extra` holds `section.key=value`
    overrides beyond the aggregation (wire formats, client-side truncation).
    """

    label: str
    method: str
    tau: float | None = None
    extra: tuple[str, ...] = ()

    def overrides(self) -> list[str]:
        chosen = [f"aggregation.method={json.dumps(self.method)}"]
        return chosen + ([f"aggregation.tau={self.tau}"] if self.tau is not None else []) + list(self.extra)


def baseline(method: str) -> Row:
    return Row(method, method)


def florist(tau: float) -> Row:
    return Row(f"florist-tau{tau:.2f}", "florist", tau)


def budgeted(megabytes: float, criterion: str = "normalized") -> Row:
    """FLoRIST with a download budget per client and round instead of tau (aggregation.download_budget_mb).

    The criterion is always set: the grid's plain budget rows were measured with `normalized`, the
    default then, and keep meaning that whatever the default becomes."""
    suffix = "" if criterion == "normalized" else f"-{criterion}"
    settings = (f"aggregation.download_budget_mb={megabytes:g}", f"aggregation.budget_criterion={json.dumps(criterion)}")
    return Row(f"florist-budget{megabytes:g}mb{suffix}", "florist", extra=settings)


def variant(row: Row, suffix: str, *overrides: str) -> Row:
    """`row` with more settings changed, labelled `<row>-<suffix>`."""
    return Row(f"{row.label}-{suffix}", row.method, row.tau, row.extra + overrides)


SOURCE = baseline("flora")
"""The run whose server saves the client adapters it received: the ones replayed rows re-aggregate,
and the ones whose spectra the report shows."""
# FFA-LoRA's clients train with A frozen to a shared seed: their updates are their own.
OWN_CLIENTS = ("ffa",)


def replayable(row: Row, rounds: int) -> bool:
    """Whether `row` may re-aggregate the source run's saved client adapters instead of running a federation.

    Only in a one-round federation: every client then trains from the base model, seeded by (seed, round,
    client), so what it uploads does not depend on the server's method. From round 2 on, clients train
    from the server's previous aggregate, so every row of a multi-round grid runs as a whole federation.
    Only rows that change nothing but the aggregation: a wire format or client-side truncation changes what
    the clients send, and FFA-LoRA's clients train differently.
    """
    return rounds == 1 and row.method not in OWN_CLIENTS and not row.extra and row != SOURCE


@dataclass(frozen=True)
class Cell:
    setting: str
    row: Row
    seed: int

    @property
    def label(self) -> str:
        return self.row.label

    def path(self, out: Path) -> Path:
        return out / self.setting / self.label / f"seed{self.seed}"

    @property
    def source(self) -> Cell:
        return Cell(self.setting, SOURCE, self.seed)

    def overrides(self, out: Path, evaluate_base: bool = False) -> list[str]:
        chosen = [
            *self.row.overrides(),
            f"federation.ranks={SETTINGS[self.setting]}",
            f"training.seed={self.seed}",
            f"output.run_dir={json.dumps(str(self.path(out)))}",
            f"evaluation.base={str(evaluate_base).lower()}",
        ]
        return chosen + (["output.save_client_adapters=true"] if self.row == SOURCE else [])


@dataclass(frozen=True)
class Grid:
    settings: tuple[str, ...]
    rows: tuple[Row, ...]
    scale: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)

    def cells(self, seeds: Sequence[int] | None = None, labels: Sequence[str] | None = None) -> list[Cell]:
        """Seed by seed, so that a partial grid holds whole seeds first; the source run before the rest.
        `labels`: only these rows (a one-round grid's replayed rows need the source row's cell, run or selected)."""
        rows = sorted(self.rows, key=lambda row: row != SOURCE)
        if labels is not None:
            known = [row.label for row in rows]
            unknown = [label for label in labels if label not in known]
            if unknown:
                raise ValueError(f"row {unknown[0]!r} is not in this grid; its rows: {', '.join(known)}")
            rows = [row for row in rows if row.label in labels]
        return [Cell(setting, row, seed) for seed in seeds or self.seeds for setting in self.settings for row in rows]


ROW_LABEL = re.compile(r"(?P<base>florist-tau(?P<tau>\d\.\d\d)|[a-z]+)(?:-(?P<variant>.+))?")
"""A row's label: a method or florist-tau<tau>, then -<variant> for a row that changes more."""


def is_tau_row(key: str) -> bool:
    """A plain FLoRIST-at-tau row, the ones tau is selected among (not a wire or truncation variant)."""
    match = ROW_LABEL.fullmatch(key)
    return bool(match and match["tau"] and not match["variant"])


def row_name(key: str) -> str:
    """"FLoRIST (tau 0.90), bf16" for florist-tau0.90-bf16; the method's name for a baseline."""
    match = ROW_LABEL.fullmatch(key)
    if not match:
        return key
    name = f"FLoRIST (tau {match['tau']})" if match["tau"] else NAMES.get(match["base"], match["base"])
    return f"{name}, {match['variant']}" if match["variant"] else name


def row_order(key: str) -> tuple[int, bool, str]:
    """Baselines in their usual order, then FLoRIST's taus, then every variant."""
    match = ROW_LABEL.fullmatch(key)
    base = "florist" if match and match["tau"] else (match["base"] if match else key)
    order = [*BASELINES, "florist"]
    return (order.index(base) if base in order else len(order), bool(match and match["variant"]), key)


# The quick grid only checks the pipeline end to end: tiny data, two steps, a sliver of MMLU.
QUICK_SCALE = (
    "data.max_client_examples=10",
    "data.max_length=128",
    "training.local_steps=2",
    "evaluation.max_new_tokens=8",
    "evaluation.mmlu_limit=16",
)

# Issue 10's comparison at a scale where adapters learn structure, on this 2-core CPU: the paper's
# LLaMA-3.2-1B heterogeneous setting (3 rounds), 64 examples of each Dolly client (8 carved off for
# validation, 56 trained), 256 tokens, one local epoch per round (14 steps at batch 4). The wire is
# float32 here, so that the bf16 and int8 rows halve and quarter it. A round of 8 clients on 2 workers
# took about 30 minutes on the loaded machine, past the default 600 s round timeout (whose retries then
# ask the late clients again and waste their work): --cell-timeout bounds a cell instead.
SCALE = (
    "data.max_client_examples=64",
    "data.validation_fraction=0.125",
    "data.max_length=256",
    "federation.rounds=3",
    "federation.round_timeout=86400",
    "training.local_steps=14",
    'wire.download="float32"',
    'wire.upload="float32"',
)
SCALE_TAU = 0.90
"""FLoRIST's tau in the wire and client-side truncation rows."""
WARM_ROW = variant(florist(SCALE_TAU), "warm", "federation.warm_start=true")
"""FLoRIST whose clients start each round from the last update's leading components, as FlexLoRA's
continue from theirs."""
SCALE_ROWS = (
    *(baseline(method) for method in BASELINES),
    florist(0.80),
    florist(SCALE_TAU),
    variant(florist(SCALE_TAU), "bf16", 'wire.download="bfloat16"', 'wire.upload="bfloat16"'),
    variant(florist(SCALE_TAU), "int8", 'wire.download="int8"', 'wire.upload="int8"'),
    variant(florist(SCALE_TAU), "client-tau0.90", "wire.client_tau=0.9"),
    WARM_ROW,
    # Each round the clients score these cuts on their validation examples; the smallest within
    # aggregation.tau_tolerance (default 0 nats) of the best is kept.
    Row("florist-auto-tau", "florist", extra=("aggregation.tau_candidates=[0.8, 0.9, 0.95, 1.0]",)),
    # Budgets against FLoRA's whole stack, about 35 MiB a round here (152 stacked ranks x 60 modules
    # x 3,840 bytes a component on average): 2, 5 and 10 MiB, and the three criteria at 5 MiB. The
    # report puts every row on the bytes axis, so equal-byte comparisons read off the Pareto plot.
    *(budgeted(megabytes) for megabytes in (2, 5, 10)),
    budgeted(5, "absolute"),
    budgeted(5, "per-byte"),
)

# Why FlexLoRA beat exact FLoRA in the scale grid, at a scale this 2-core CPU runs in 2.2 hours (18 cells):
# 3 rounds of 2 local epochs over 12 examples per client (4 more carved off for validation), 128
# tokens. FlexLoRA's clients continue from the global adapter; FLoRA's and FLoRIST's merge it and
# start a fresh LoRA (B = 0) each round. The warm row keeps FLoRIST's merged, exact update and starts
# each client's LoRA from the leading components of the last one (federation.warm_start); two more
# warm rows spend exactly FlexLoRA's download (a budget) and a quarter of the bytes (the int8 wire).
ROUNDS_SCALE = (
    "data.max_client_examples=16",
    "data.validation_fraction=0.25",
    "data.max_length=128",
    "federation.rounds=3",
    "federation.round_timeout=86400",
    "training.local_steps=6",
    'wire.download="float32"',
    'wire.upload="float32"',
)
WARM_AT_FLEXLORA_BYTES = variant(budgeted(4.17, "per-byte"), "warm", "federation.warm_start=true")
"""The warm start at FlexLoRA's download: a FlexLoRA client receives 4.3776 MB a round on average at
these ranks (its own rank's truncation), 4.175 MiB; this budget gives every client 4.17 MiB, spent by
the default criterion."""
ROUNDS_ROWS = (
    baseline("flora"),
    baseline("flexlora"),
    florist(SCALE_TAU),
    WARM_ROW,
    WARM_AT_FLEXLORA_BYTES,
    variant(WARM_ROW, "int8", 'wire.download="int8"', 'wire.upload="int8"'),
)

# Issue 21's quality evidence, on the rounds grid's scale: FLoRIST at tau 0.90 from summed sketches
# (florist-secure, the automatic sketch width: twice the rank tau kept last round; the sum taken in the
# clear, as the SecAgg+ protocol would reveal it, without its quantisation) against plain FLoRIST with
# the same round semantics (a fresh LoRA each round), and client-level DP at three epsilons. The plain
# row saves the client adapters it received, so that their own update norms can be read off.
SECURE_ROW = Row("florist-tau0.90-secure", "florist-secure", SCALE_TAU)
DP_CLIP_NORM = 1.0
"""privacy.clip_norm of the DP rows: the round-1 norm of the mean update in the secure row's seed-0
cell, 0.985, rounded up (BENCHMARKS.md). One client's own update is larger, so the clip binds; the
plain row's saved clients give their own norms once it has run."""
DP_EPSILONS = (1, 4, 16)
DP_DELTA = 1e-5


def private(epsilon: float) -> Row:
    """SECURE_ROW with client-level DP spending `epsilon` over the run at DP_DELTA."""
    settings = ("privacy.dp=true", f"privacy.target_epsilon={epsilon:g}", f"privacy.delta={DP_DELTA:g}", f"privacy.clip_norm={DP_CLIP_NORM:g}")
    return variant(SECURE_ROW, f"dp-eps{epsilon:g}", *settings)


UPLOAD_CAP = 3.0
"""aggregation.sketch_upload of the capped secure row: the issue's target, a site's upload at most 3x
a mean client's adapter (the automatic width alone uploads 5-7x here)."""
SECURE_ROWS = (
    SECURE_ROW,
    Row(florist(SCALE_TAU).label, "florist", SCALE_TAU, ("output.save_client_adapters=true",)),
    variant(SECURE_ROW, "up3x", f"aggregation.sketch_upload={UPLOAD_CAP:g}"),
    *map(private, DP_EPSILONS),
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

GRIDS = {
    "full": Grid(tuple(SETTINGS), (*map(baseline, BASELINES), *map(florist, TAUS))),
    "quick": Grid(("heterogeneous",), (baseline("flora"), baseline("fedit"), florist(0.90)), QUICK_SCALE, seeds=(0,)),
    "scale": Grid(("heterogeneous",), SCALE_ROWS, SCALE),
    "rounds": Grid(("heterogeneous",), ROUNDS_ROWS, ROUNDS_SCALE),
    "secure": Grid(("heterogeneous",), SECURE_ROWS, ROUNDS_SCALE),
}
