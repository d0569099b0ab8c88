"""How concentrated each round's aggregated update is: its whole spectrum, from saved client adapters.

A round's record keeps only the rank each module kept and the share of energy that rank holds. The
whole spectrum of the exact aggregate sum_k p_k s_k B_k A_k needs the clients' own factors, which the
source row's run saves (output.save_client_adapters) for every round. The paper's claim to check: the
energy sits in a few of the stacked directions, and more so as rounds go on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

FRACTIONS = tuple(step / 20 for step in range(1, 21))
"""Shares of the stacked rank at which a round's cumulative-energy curve is sampled."""
ENERGY_LEVELS = (0.80, 0.90, 0.99)


def cumulative_energy(singular_values: Sequence[float]) -> list[float]:
    """Share of the squared singular values held by the leading 1, 2, ... of them (all ones for a zero update)."""
    power = [value * value for value in singular_values]
    total = sum(power)
    if total == 0:
        return [1.0] * len(power)
    running, shares = 0.0, []
    for value in power:
        running += value
        shares.append(running / total)
    return shares


def rank_share(cumulative: Sequence[float], level: float) -> float:
    """The smallest share of the directions whose energy reaches `level` (a 1e-12 slack for rounding)."""
    needed = next(index for index, share in enumerate(cumulative, 1) if share >= level * (1 - 1e-12))
    return needed / len(cumulative)


def summarise(spectra: dict[str, Sequence[float]]) -> dict:
    """One round, mean over modules: the stacked rank, the share of it that each energy level needs,
    and the cumulative-energy curve at FRACTIONS of it."""
    curves = [cumulative_energy(values) for values in spectra.values()]
    return {
        "stack_rank": sum(len(curve) for curve in curves) / len(curves),
        "rank_share": {f"{level:.2f}": sum(rank_share(c, level) for c in curves) / len(curves) for level in ENERGY_LEVELS},
        "curve": [sum(c[max(1, math.ceil(f * len(c))) - 1] for c in curves) / len(curves) for f in FRACTIONS],
    }


def singular_values_by_round(run_dir: Path) -> dict[int, dict[str, list[float]]]:
    """{round: {module: singular values of the round's exact aggregate}} for every round whose client
    adapters `run_dir` holds with their weights (none when the run did not save them, or when its
    weights were left out of a copy)."""
    from florist.aggregation import make_aggregator
    from florist.lora.adapters import read_adapters

    exact = make_aggregator("florist", tau=1.0, route="qr")  # qr: no Gram matrix squaring the small values away
    spectra = {}
    for index_file in sorted((run_dir / "clients").glob("round*/clients.json")):
        index = json.loads(index_file.read_text())
        if not all((index_file.parent / c["adapter"] / "adapter_model.safetensors").is_file() for c in index):
            continue
        adapters = read_adapters([index_file.parent / c["adapter"] for c in index], [c["weight"] for c in index])
        modules = exact.aggregate(adapters).modules
        spectra[int(index_file.parent.name.removeprefix("round"))] = {
            name: module.singular_values.tolist() for name, module in modules.items()
        }
    return dict(sorted(spectra.items()))


def round_spectra(run_dir: Path) -> list[dict]:
    """Per saved round: {"round": t, **summarise(its spectra)}."""
    return [{"round": t, **summarise(spectra)} for t, spectra in singular_values_by_round(run_dir).items()]
