"""Plots of a run from its metrics.jsonl: loss per round, rank per layer and module, bytes per round."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LAYER = re.compile(r"\.(\d+)\.")


def _trained(rounds: list[dict]) -> list[dict]:
    return [r for r in rounds if r.get("clients")]


# Held-out losses the server may measure after a round (round 0: the base model), and their legend.
HELD_OUT = {"test_loss": "test (held out)", "val_loss": "validation (held out)"}


def loss_figure(rounds: list[dict]) -> Figure:
    """Each client's and the weighted mean training loss per round, and every held-out loss where measured."""
    trained = _trained(rounds)
    fig, ax = plt.subplots(figsize=(6, 4))
    # A secure-sum round records no site's own loss (federation/training_totals.py): only the mean.
    partitions = sorted({c["partition"] for r in trained for c in r["clients"] if "train_loss" in c})
    for partition in partitions:
        points = [(r["round"], c["train_loss"]) for r in trained for c in r["clients"] if c["partition"] == partition and "train_loss" in c]
        ax.plot(*zip(*points), marker="o", alpha=0.4, label=f"client {partition}")
    ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], "k-o", lw=2, label="weighted mean")
    for key, label in HELD_OUT.items():
        measured = [(r["round"], r["evaluation"][key]) for r in rounds if key in r.get("evaluation", {})]
        if measured:
            ax.plot(*zip(*measured), "--s", lw=2, label=label)
    ax.set(xlabel="round", ylabel="loss (mean NLL per token)", title="Training and held-out loss")
    # Rounds are whole numbers; matplotlib's default locator puts ticks at 1.25, 1.5, ...
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_loss(rounds: list[dict], target: Path) -> None:
    fig = loss_figure(rounds)
    fig.savefig(target, dpi=120)
    plt.close(fig)


def rank_matrix(ranks: dict[str, int]) -> tuple[list[int], list[str], np.ndarray]:
    """Ranks arranged as layers x module kinds (e.g. q_proj, v_proj)."""
    layers, kinds = set(), set()
    cells = {}
    for name, rank in ranks.items():
        match = LAYER.search(name)
        layer = int(match.group(1)) if match else 0
        kind = name.rsplit(".", 1)[-1]
        layers.add(layer)
        kinds.add(kind)
        cells[layer, kind] = rank
    layers, kinds = sorted(layers), sorted(kinds)
    matrix = np.array([[cells.get((layer, kind), 0) for layer in layers] for kind in kinds])
    return layers, kinds, matrix


def plot_ranks(rounds: list[dict], target: Path) -> None:
    trained = _trained(rounds)
    fig, axes = plt.subplots(len(trained), 1, figsize=(10, 1.2 + 1.1 * len(trained)), squeeze=False)
    for ax, record in zip(axes[:, 0], trained):
        layers, kinds, matrix = rank_matrix(record["ranks"])
        image = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xticks(range(len(layers)), layers, fontsize=6)
        ax.set_title(f"round {record['round']}: rank kept per layer", fontsize=9)
        fig.colorbar(image, ax=ax)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def plot_bytes(rounds: list[dict], target: Path) -> None:
    trained = _trained(rounds)
    x = np.array([r["round"] for r in trained])
    down = [sum(c["bytes_down"] for c in r["clients"]) / 2**20 for r in trained]
    up = [sum(c["bytes_up"] for c in r["clients"]) / 2**20 for r in trained]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - 0.2, down, 0.4, label="download (all clients)")
    ax.bar(x + 0.2, up, 0.4, label="upload (all clients)")
    ax.set(xlabel="round", ylabel="MiB", title="Bytes sent per round", xticks=x)
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def plot_run(rounds: list[dict], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    targets = []
    if _trained(rounds):
        for name, plot in (("loss.png", plot_loss), ("ranks.png", plot_ranks), ("bytes.png", plot_bytes)):
            plot(rounds, directory / name)
            targets.append(directory / name)
    return targets
