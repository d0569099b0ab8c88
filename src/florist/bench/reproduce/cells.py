"""A finished cell as one flat record: identity, final quality, bytes, server cost, ranks and spectra.

Records come from the cells' run directories; a cell whose run directory is gone keeps the record an
earlier report stored in OUT/results.json (the committed results keep only that file).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from florist.bench.reproduce.grid import SETTINGS, baseline, florist
from florist.bench.reproduce.spectra import round_spectra
from florist.config import load_config
from florist.federation.payload import VALUE_BYTES
from florist.reporting.run_directory import read_rounds

MB = 1e6
MIB = 2**20
QUALITY_KEYS = ("test_loss", "rouge_l", "mmlu_accuracy", "val_loss")
SETTINGS_BY_RANKS = {tuple(ranks): name for name, ranks in SETTINGS.items()}
BYTE_KEYS = ("download_mib", "upload_mib", "total_mib", "unsent_final_download_mib", "total_with_final_download_mib")


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

    Counted from the ranks, per round, so that one-round and multi-round grids compare; the run's own
    measured bytes (both ways, over the run) are the record's *_mib figures. int8's row scales (4 bytes
    per kept rank per factor) are not in this count.
    """
    width = (lambda out, inp: out) if method == "ffa" else (lambda out, inp: out + inp)
    totals = [sum(width(*shapes[name]) * rank for name, rank in ranks.items()) for ranks in per_client]
    return wire_bytes * sum(totals) / len(totals)


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
        "wire (download / upload; rows named bf16, int8 differ)": f"{config.wire.download} / {config.wire.upload}",
        "ROUGE-L max new tokens": config.evaluation.max_new_tokens,
        "MMLU questions": config.evaluation.mmlu_limit or "all 1,444",
    }


def round_details(trained: Sequence[dict]) -> list[dict]:
    """Per trained round: the rank kept over all modules, the mean share of energy it holds (None where
    the method computes no spectrum), the tau automatic tau chose (else None), the bytes both ways, the
    mean client's upload and florist-secure's sketch width (else None)."""
    details = []
    for record in trained:
        energies = [e for e in record.get("energy", {}).values() if e is not None]
        details.append(
            {
                "round": record["round"],
                "total_rank": sum(record["ranks"].values()),
                "energy": statistics.mean(energies) if energies else None,
                "tau_chosen": record.get("tau_selection", {}).get("chosen"),
                "up_mb_per_client": statistics.mean(c["bytes_up"] for c in record["clients"]) / MB,
                "sketch_width": record.get("secure", {}).get("sketch_width"),
                **record.get("communication", {"down_bytes": None, "up_bytes": None}),
            }
        )
    return details


def run_bytes(communication: dict) -> dict:
    """A run's bytes over all its rounds (MiB): sent both ways (`download_mib`, `upload_mib`,
    `total_mib`), the final model's download that no round sent, and the total with it
    (FlowerTune's leaderboard count). Reads summary.json's `communication` as written now and as
    written before the totals counted only what was sent, when they included the final download
    (then named `final_download_mib`); an empty one (cells before the count) gives None for each."""
    if not communication:
        return dict.fromkeys(BYTE_KEYS)
    if "final_download_mib" in communication:
        final = communication["final_download_mib"]
        down, up, with_final = communication["download_mib"] - final, communication["upload_mib"], communication["total_mib"]
    else:
        final = communication["unsent_final_download_mib"]
        down, up = communication["download_mib"], communication["upload_mib"]
        with_final = communication["total_mib"] + final
    return {
        "download_mib": down,
        "upload_mib": up,
        "total_mib": down + up,
        "unsent_final_download_mib": final,
        "total_with_final_download_mib": with_final,
    }


def read_cell(run_dir: Path) -> dict:
    """One finished cell (OUT/<setting>/<row>/seed<k>) as a flat record."""
    config = load_config(run_dir / "config.toml", check_sources=False)  # a finished cell: its data may be gone
    summary = json.loads((run_dir / "summary.json").read_text())
    trained = [r for r in read_rounds(run_dir) if r.get("clients")]
    final = summary["final"]
    method = config.aggregation.method
    shapes = module_shapes(config.model.name, tuple(config.model.target_modules))
    wire = VALUE_BYTES[config.wire.download]
    downloads = [
        downloaded_ranks(method, r["ranks"], [c["rank"] for c in sorted(r["clients"], key=lambda c: c["partition"])])
        for r in trained
    ]
    return {
        "setting": SETTINGS_BY_RANKS.get(tuple(config.federation.ranks), "custom"),
        "row": run_dir.parent.name,
        "method": method,
        "tau": config.aggregation.tau if config.aggregation.is_florist and not (config.aggregation.automatic_tau or config.aggregation.download_budget_mb) else None,
        "seed": config.training.seed,
        **{key: final.get(key) for key in QUALITY_KEYS},
        "download_mb": statistics.mean(download_bytes(method, d, shapes, wire) for d in downloads) / MB,
        "upload_mb": statistics.mean(c["bytes_up"] for r in trained for c in r["clients"]) / MB,
        **run_bytes(summary.get("communication", {})),
        "rank_sent": statistics.mean(statistics.mean(sum(k.values()) for k in d) for d in downloads),
        "aggregation_seconds": statistics.mean(r["aggregation_seconds"] for r in trained),
        "ranks": trained[-1]["ranks"],
        "rounds": round_details(trained),
        "spectra": round_spectra(run_dir),
        "mmlu_pred_dist": final.get("mmlu_pred_dist"),
        "mmlu_always": {k.removeprefix("mmlu_always_"): v for k, v in final.items() if k.startswith("mmlu_always_")},
        "base": {k: summary["base"].get(k) for k in QUALITY_KEYS},
        "scale": scale_of(config),
    }


def stored_record(record: dict) -> dict:
    """A record from an earlier report's results.json, with the fields it predates left empty.

    A record from before the totals counted only what was sent holds the final model's download in
    `download_mib` and `total_mib`: its bytes are split again, the sent part from its trained rounds'
    own byte counts (a grid never evaluates on the nodes, so its round 0 moves no bytes), and the total
    it stored is kept, unchanged, as the total with the final download."""
    row = record.get("row") or (florist(record["tau"]) if record["method"] == "florist" else baseline(record["method"])).label
    empty = {**dict.fromkeys(BYTE_KEYS), "rounds": [], "spectra": []}
    if record.get("download_mib") is not None and "unsent_final_download_mib" not in record:
        sent_down = sum(r["down_bytes"] for r in record["rounds"]) / MIB
        communication = {key: record[key] for key in ("download_mib", "upload_mib", "total_mib")}
        record = {**record, **run_bytes({**communication, "final_download_mib": record["download_mib"] - sent_down})}
    return {**empty, **record, "row": row}


def finished_cells(out: Path) -> list[dict]:
    """Every finished cell under `out`, from its run directory or, where that is gone, from out/results.json."""
    records = [read_cell(summary.parent) for summary in sorted(out.glob("*/*/seed*/summary.json"))]
    stored = {(r["setting"], r["row"], r["seed"]): r for r in map(stored_record, recorded_cells(out))}
    for record in records:
        # Spectra need the client adapters' weights, which a shipped copy of the grid may leave out.
        earlier = stored.pop((record["setting"], record["row"], record["seed"]), None)
        if earlier and not record["spectra"]:
            record["spectra"] = earlier["spectra"]
    records += stored.values()
    return sorted(records, key=lambda r: (r["setting"], r["row"], r["seed"]))


def recorded_cells(out: Path) -> list[dict]:
    """The cells an earlier report of `out` recorded in results.json (none without one)."""
    stored = out / "results.json"
    return json.loads(stored.read_text())["cells"] if stored.exists() else []
