"""The report of a grid: rows (mean ± std over seeds), tau chosen on validation loss, targets, paired
differences, MMLU beside its letter baselines, spectra per round; results.md, results.json and the plots."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from florist.bench.reproduce.cells import finished_cells
from florist.bench.reproduce.grid import BASELINES, FLORIST_METHODS, NAMES, SETTINGS, SOURCE, is_tau_row, row_name, row_order
from florist.bench.reproduce.plots import plot_pareto, plot_ranks_per_layer, plot_spectra
from florist.bench.reproduce.spectra import ENERGY_LEVELS
from florist.files import write_atomically

# Metric columns of the table: (key in a cell record, heading, digits, lower is better).
METRICS = (
    ("test_loss", "Dolly test loss", 4, True),
    ("rouge_l", "ROUGE-L", 4, False),
    ("mmlu_accuracy", "MMLU acc.", 4, False),
    ("val_loss", "val. loss", 4, True),
    ("download_mb", "down MB/client/round", 3, True),
    ("upload_mb", "up MB/client/round", 3, True),
    ("total_mib", "run MiB sent both ways", 2, True),
    ("total_with_final_download_mib", "run MiB + final download", 2, True),
    ("rank_sent", "total rank sent", 1, True),
    ("aggregation_seconds", "server agg. s", 4, True),
)
QUALITY = ("test_loss", "rouge_l")
REFERENCE = SOURCE.label
"""Paired differences are taken against FLoRA, the exact aggregate."""


# ---------------------------------------------------------------- rows


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
        for key in sorted({r["row"] for r in mine}, key=row_order):
            group = [r for r in mine if r["row"] == key]
            rows[key] = {metric: mean_std(r[metric] for r in group) for metric, *_ in METRICS}
            rows[key]["tau"] = group[0]["tau"]
            rows[key]["seeds"] = sorted(r["seed"] for r in group)
        table[setting] = rows
    return table


# ---------------------------------------------------------------- tau and targets


def select_taus(rows: dict[str, dict], metric: str = "val_loss") -> dict:
    """FLoRIST-O and FLoRIST-E chosen on the validation loss (lower is better), never on the test metrics.

    - FLoRIST-O: the tau with the lowest mean validation loss over seeds (a tie goes to the lower tau,
      which downloads less).
    - FLoRIST-E: the lowest tau whose mean validation loss is at most the best baseline's mean plus that
      baseline's standard deviation over seeds ("matches the best baseline"); None when no tau does.
    - The best baseline is the baseline (FedIT, FLoRA, FlexLoRA, FFA-LoRA) with the lowest mean validation loss.
    """
    taus = {row["tau"]: row[metric]["mean"] for key, row in rows.items() if is_tau_row(key) and row[metric]["n"]}
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


# ---------------------------------------------------------------- tables


def cell_text(stats: dict, digits: int) -> str:
    if not stats["n"]:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def tau_text(row: dict) -> str:
    return f"{row['tau']:.2f}" if row["tau"] is not None else ""


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
        values = [cell_text(row[metric], digits) for metric, _, digits, _ in METRICS]
        lines.append("| " + " | ".join([f"**{name}**" if name.startswith("FLoRIST-") else name, tau_text(row), *values, str(len(row["seeds"]))]) + " |")
    return lines


def paired(records: Sequence[dict], reference: str, metric: str, compare) -> dict[str, dict]:
    """Per row: mean ± std over seeds of compare(row's value, reference's value), seed by seed."""
    by_seed = {r["seed"]: r[metric] for r in records if r["row"] == reference and r[metric] is not None}
    keys = sorted({r["row"] for r in records}, key=row_order)
    return {
        key: mean_std(compare(r[metric], by_seed[r["seed"]]) for r in records if r["row"] == key and r["seed"] in by_seed and r[metric] is not None)
        for key in keys
        if key != reference
    }


def paired_differences(records: Sequence[dict], reference: str, metric: str) -> dict[str, dict]:
    """Per row: mean ± std over seeds of (row - reference) on `metric`, seed by seed.

    Every row of a seed shares its data carve, its clients' round-1 initialisation and batch order (in a
    one-round grid, replayed rows even share the client updates), so the seed-to-seed spread of those
    cancels in the difference.
    """
    return paired(records, reference, metric, lambda mine, theirs: mine - theirs)


def paired_lines(records: Sequence[dict], rows: dict[str, dict], reference: str) -> list[str]:
    """Each row against `reference`, paired by seed: a difference of zero within its std is a tie.
    The last column: the row's bytes sent over the run, both ways, as a share of the reference's."""
    metrics = [m for m in METRICS if m[0] in (*QUALITY, "val_loss")]
    differences = {metric: paired_differences(records, reference, metric) for metric, *_ in metrics}
    bytes_share = paired(records, reference, "total_mib", lambda mine, theirs: mine / theirs)
    headings = [f"Δ {heading}" for _, heading, *_ in metrics] + [f"run MiB sent / {row_name(reference)}'s"]
    lines = ["| method | tau | " + " | ".join(headings) + " | n |", "|---|---|" + "---|" * len(headings) + "---|"]
    for key in (k for k in rows if k != reference):
        values = [cell_text(differences[metric][key], digits) for metric, _, digits, _ in metrics]
        values.append(cell_text(bytes_share[key], 3))
        lines.append(f"| {row_name(key)} | {tau_text(rows[key])} | " + " | ".join(values) + f" | {differences[metrics[0][0]][key]['n']} |")
    return lines


def mmlu_lines(records: Sequence[dict], rows: dict[str, dict]) -> list[str]:
    """Predicted-letter shares beside MMLU: a model that only spreads its letters is not one that learned."""
    lines = ["| method | tau | MMLU acc. | predicted A / B / C / D (share) |", "|---|---|---|---|"]
    for key, row in rows.items():
        group = [r for r in records if r["row"] == key and r["mmlu_pred_dist"]]
        if not group:
            continue
        shares = [statistics.mean(r["mmlu_pred_dist"][letter] / sum(r["mmlu_pred_dist"].values()) for r in group) for letter in "ABCD"]
        lines.append(f"| {row_name(key)} | {tau_text(row)} | {cell_text(row['mmlu_accuracy'], 4)} | {' / '.join(f'{s:.2f}' for s in shares)} |")
    always = next((r["mmlu_always"] for r in records if r["mmlu_always"]), None)
    if always:
        lines.append("")
        lines.append("Always-one-letter baselines: " + ", ".join(f"always-{k} {v:.4f}" for k, v in sorted(always.items())) + ".")
    return lines


def spectra_lines(records: Sequence[dict]) -> list[str]:
    """Per round, over the cells that saved their clients (mean ± std over seeds of the mean over modules):
    the share of the stacked directions each energy level needs. Falling shares: the energy concentrates."""
    saved = [r for r in records if r["spectra"]]
    if not saved:
        return []
    header = ["row", "round", "stacked rank", *(f"share of it for {level:.0%} energy" for level in ENERGY_LEVELS), "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted({r["row"] for r in saved}, key=row_order):
        spectra = [s for r in saved if r["row"] == key for s in r["spectra"]]
        for t in sorted({s["round"] for s in spectra}):
            mine = [s for s in spectra if s["round"] == t]
            shares = [cell_text(mean_std(s["rank_share"][f"{level:.2f}"] for s in mine), 3) for level in ENERGY_LEVELS]
            stack = statistics.mean(s["stack_rank"] for s in mine)
            lines.append(f"| {row_name(key)} | {t} | {stack:.0f} | " + " | ".join(shares) + f" | {len(mine)} |")
    return lines


def per_round_lines(records: Sequence[dict], field: str, digits: int) -> list[str]:
    """Per round, a field of FLoRIST's round details (mean ± std over seeds), one line per row that has it."""
    multi = [r for r in records if r["method"] in FLORIST_METHODS and len(r["rounds"]) > 1]
    rounds = sorted({d["round"] for r in multi for d in r["rounds"]})
    lines = ["| row | " + " | ".join(f"round {t}" for t in rounds) + " |", "|---|" + "---|" * len(rounds)]
    for key in sorted({r["row"] for r in multi}, key=row_order):
        values = [mean_std(d.get(field) for r in multi if r["row"] == key for d in r["rounds"] if d["round"] == t) for t in rounds]
        if any(v["n"] for v in values):
            lines.append(f"| {row_name(key)} | " + " | ".join(cell_text(v, digits) for v in values) + " |")
    return lines if len(lines) > 2 else []


# ---------------------------------------------------------------- the report


def scale_lines(records: Sequence[dict]) -> list[str]:
    lines = ["", "Scale of these cells:", ""] + [f"- {k}: {v}" for k, v in records[0]["scale"].items()]
    first = next((r for r in records if any(v is not None for v in r["base"].values())), None)
    if first:
        measured = ", ".join(f"{k} {v:.4f}" for k, v in first["base"].items() if v is not None)
        lines += ["", f"Base model (before federation), evaluated once, in the {first['setting']} seed {first['seed']} cell "
                  f"(val_loss is on that seed's validation carve): {measured}."]
    return lines


def varied_rows(rows: dict[str, dict]) -> list[str]:
    """In a grid without the exact aggregate (FLoRA): the plain FLoRIST rows that its other rows vary
    (florist-tau0.90 for florist-tau0.90-secure), each the reference its variants are paired against."""
    if REFERENCE in rows:
        return []
    return [key for key in rows if is_tau_row(key) and any(other.startswith(f"{key}-") for other in rows)]


def setting_lines(setting: str, rows: dict[str, dict], selection: dict, records: Sequence[dict]) -> list[str]:
    lines = ["", f"## {setting.capitalize()} ranks {SETTINGS.get(setting, '')}", "", *table_lines(rows, selection), ""]
    best = selection["best_baseline"]
    lines += [f"Selected on validation loss: FLoRIST-O tau {selection['optimal']}, FLoRIST-E tau {selection['efficient']}, "
              f"best baseline {NAMES[best] if best else 'none'}.", ""]
    lines += ["Targets:", "", *check_targets(rows, selection), ""]
    for reference in dict.fromkeys(key for key in (REFERENCE, best, *varied_rows(rows)) if key in rows):
        why = "the exact aggregate" if reference == REFERENCE else "the best baseline on validation loss" if reference == best else "the row its variants change"
        lines += [f"Paired by seed, each row minus {row_name(reference)} ({why}):", "", *paired_lines(records, rows, reference), ""]
    # At a fixed tau, fewer directions in later rounds means the same energy sits in fewer of them.
    kept = per_round_lines(records, "total_rank", 1)
    if kept:
        lines += ["Total rank FLoRIST keeps, per round:", "", *kept, ""]
    uploads = per_round_lines(records, "up_mb_per_client", 3)
    if uploads:
        lines += ["MB one client uploads, per round (florist-secure: its sketches, at that round's width):", "", *uploads, ""]
    widths = per_round_lines(records, "sketch_width", 0)
    if widths:
        lines += ["Sketch width l, per round (florist-secure):", "", *widths, ""]
    chosen = per_round_lines(records, "tau_chosen", 2)
    if chosen:
        lines += ["Tau that automatic tau chose, per round:", "", *chosen, ""]
    spectra = spectra_lines(records)
    if spectra:
        lines += ["Spectra of each round's exact aggregate (FLoRA's stack, from the clients the run saved):", "", *spectra, ""]
    return lines + ["MMLU beside its letter baselines:", "", *mmlu_lines(records, rows)]


def write_report(out: Path, expected: int) -> Path:
    """results.md, results.json and the plots in `out`, from every finished cell there."""
    records = finished_cells(out)
    table = aggregate_rows(records)
    selections = {setting: select_taus(rows) for setting, rows in table.items()}
    lines = ["# Reproduction benchmark", ""]
    lines.append(f"{len(records)} of {expected} cells finished" + (" (a partial grid)." if len(records) < expected else "."))
    if records:
        lines += scale_lines(records)
    lines += ["", "Mean ± sample std over seeds; n = seeds. Download: the aggregate's factors one client receives",
              "after a round (FLoRA: the whole stack; FlexLoRA: the client's own truncation; FFA-LoRA: B only).",
              "Run MiB sent both ways: the payload bytes the run sent, every client, every round, both directions",
              "(— for cells that predate the count). Run MiB + final download: the same plus the final model's",
              "download to every client, which no round sent (FlowerTune's leaderboard count). Cells recorded",
              "before the two were apart stored the latter as their total; their sent bytes are their rounds' own counts.",
              "Tau rule: FLoRIST-O = lowest mean validation loss; FLoRIST-E = lowest tau whose mean validation loss",
              "is within one std of the best baseline's (validation carved from the training clients; test never used)."]
    for setting, rows in table.items():
        lines += setting_lines(setting, rows, selections[setting], [r for r in records if r["setting"] == setting])
    write_atomically(out / "results.md", "\n".join(lines) + "\n")
    results = {"cells": records, "rows": table, "selection": selections, "expected_cells": expected}
    write_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    if records:
        plot_pareto(table, out / "pareto.png")
        plot_pareto(table, out / "pareto_total.png", "total_mib")
        plot_ranks_per_layer(records, out / "ranks_per_layer.png")
        plot_spectra(records, out / "spectra.png")
    return out / "results.md"
