"""The report's figures: quality against bytes, the rank FLoRIST keeps per layer, spectra per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from florist.bench.reproduce.grid import BASELINES, FLORIST_METHODS, is_tau_row, row_name, row_order  # noqa: E402
from florist.bench.reproduce.spectra import FRACTIONS  # noqa: E402
from florist.reporting.plots import rank_matrix  # noqa: E402

QUALITY = (("test_loss", "Dolly test loss"), ("rouge_l", "ROUGE-L"))
BYTES_AXES = {
    "download_mb": "download MB per client per round (log)",
    "total_mib": "MiB sent over the run, both directions, all clients (log)",
}


def _save(fig, target: Path) -> None:
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def plot_pareto(table: dict[str, dict[str, dict]], target: Path, bytes_metric: str = "download_mb") -> None:
    """Quality against bytes (`bytes_metric`, a key of BYTES_AXES): FLoRIST's taus as a line, every other
    row a point. Rows without that byte count are left out; with none, no file is written."""
    if not any(row[bytes_metric]["n"] for rows in table.values() for row in rows.values()):
        return
    # Wide enough for the legend beside the points (inside it hid the points at the largest byte counts).
    fig, axes = plt.subplots(len(QUALITY), len(table), figsize=(8.5 * len(table), 3.8 * len(QUALITY)), squeeze=False)
    colours = plt.get_cmap("tab20").colors  # a grid has more rows than tab10's ten colours
    for column, (setting, rows) in enumerate(table.items()):
        for line, (metric, heading) in enumerate(QUALITY):
            ax = axes[line, column]
            measured = {key: row for key, row in rows.items() if row[metric]["n"] and row[bytes_metric]["n"]}
            taus = [row for key, row in measured.items() if is_tau_row(key)]
            if taus:
                x = [row[bytes_metric]["mean"] for row in taus]
                y = [row[metric]["mean"] for row in taus]
                ax.errorbar(x, y, yerr=[row[metric]["std"] for row in taus], fmt="-o", color="k", capsize=3, label="FLoRIST")
                for row, xi, yi in zip(taus, x, y):
                    ax.annotate(f"{row['tau']:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
            for index, key in enumerate(sorted((k for k in measured if not is_tau_row(k)), key=row_order)):
                row = measured[key]
                marker = "s" if key in BASELINES else "^"
                ax.errorbar(
                    row[bytes_metric]["mean"], row[metric]["mean"], yerr=row[metric]["std"], fmt=marker, capsize=3,
                    color=colours[index % len(colours)], label=row_name(key),
                )
            ax.set_xscale("log")
            ax.set(xlabel=BYTES_AXES[bytes_metric], ylabel=heading, title=f"{setting}: {heading}")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, target)


def plot_ranks_per_layer(records: Sequence[dict], target: Path) -> None:
    """The rank FLoRIST keeps per layer in the last round, one line per tau (mean over seeds), q_proj and v_proj apart."""
    florist = [r for r in records if is_tau_row(r["row"])]
    settings = sorted({r["setting"] for r in florist})
    if not settings:
        return
    kinds = sorted({name.rsplit(".", 1)[-1] for r in florist for name in r["ranks"]})
    fig, axes = plt.subplots(len(settings), len(kinds), figsize=(5.5 * len(kinds), 3.5 * len(settings)), squeeze=False)
    for line, setting in enumerate(settings):
        mine = [r for r in florist if r["setting"] == setting]
        for tau in sorted({r["tau"] for r in mine}):
            matrices = [rank_matrix(r["ranks"]) for r in mine if r["tau"] == tau]
            layers, found, _ = matrices[0]
            mean = sum(m for _, _, m in matrices) / len(matrices)
            for column, kind in enumerate(kinds):
                axes[line, column].plot(layers, mean[found.index(kind)], marker=".", label=f"tau {tau:.2f}")
        for column, kind in enumerate(kinds):
            axes[line, column].set(xlabel="layer", ylabel="rank kept", title=f"{setting}: {kind}")
            axes[line, column].legend(fontsize=7)
    _save(fig, target)


def plot_spectra(records: Sequence[dict], target: Path) -> None:
    """Does the energy concentrate? Left: each round's cumulative energy against the share of the stacked
    directions (mean over modules and seeds; from the cells that saved their clients). Right: the total
    rank each FLoRIST row keeps per round (mean over seeds). No file when neither has data."""
    saved = [r for r in records if r["spectra"]]
    florist = [r for r in records if r["method"] in FLORIST_METHODS and r["rounds"]]
    if not saved and not any(len(r["rounds"]) > 1 for r in florist):
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.5))
    for setting in sorted({r["setting"] for r in saved}):
        spectra = [s for r in saved if r["setting"] == setting for s in r["spectra"]]
        for t in sorted({s["round"] for s in spectra}):
            curves = [s["curve"] for s in spectra if s["round"] == t]
            mean = [sum(values) / len(curves) for values in zip(*curves)]
            left.plot(FRACTIONS, mean, marker=".", label=f"{setting}, round {t}")
    left.set(xlabel="share of the stacked directions", ylabel="share of the energy", title="Spectrum of each round's exact aggregate")
    colours = plt.get_cmap("tab20").colors
    for index, key in enumerate(sorted({(r["setting"], r["row"]) for r in florist}, key=lambda k: (k[0], row_order(k[1])))):
        mine = [r for r in florist if (r["setting"], r["row"]) == key]
        rounds = sorted({d["round"] for r in mine for d in r["rounds"]})
        kept = [sum(d["total_rank"] for r in mine for d in r["rounds"] if d["round"] == t) / len(mine) for t in rounds]
        right.plot(rounds, kept, marker="o", color=colours[index % len(colours)], label=f"{key[0]}: {row_name(key[1])}")
    # Log scale: automatic tau at tau 1 keeps ~10x the rank of the budgeted rows.
    right.set(xlabel="round", ylabel="rank kept over all modules", title="Rank FLoRIST keeps per round", yscale="log")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    if left.has_data():
        left.legend(fontsize=7)
    if right.has_data():
        right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, target)
