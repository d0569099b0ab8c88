"""florist bench reproduce: tau selection, byte accounting, tables from fake run dirs, resuming, replay, spectra."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from transformers import LlamaConfig

from florist.bench.reproduce import cells, grid, report, running, spectra
from florist.bench.reproduce.grid import CONFIG, GRIDS, SETTINGS, Cell, baseline, florist
from florist.bench.reproduce.replay import Replayer
from florist.cli import main
from florist.config import load_config
from florist.federation.payload import VALUE_BYTES
from florist.reporting.run_directory import read_rounds

# A 2-layer Llama: q_proj is 32 x 32, v_proj 16 x 32 (2 key-value heads of 8).
LAYERS, Q_SHAPE, V_SHAPE = 2, (32, 32), (16, 32)


@pytest.fixture(autouse=True)
def grid_data(tmp_path_factory, monkeypatch):
    """reproduce.toml names its data relative to the working directory (../shared/data/...), and a
    configuration naming a local path that does not exist is refused: these tests, which read no
    data, run beside empty stand-ins for it, wherever the checkout is."""
    work = tmp_path_factory.mktemp("grid") / "checkout"
    grid = tomllib.loads(CONFIG.read_text())
    for source in (grid["data"]["source"], grid["evaluation"]["mmlu"]):
        stand_in = work / source
        if stand_in.suffix == ".json":
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("[]")
        else:
            stand_in.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(work)


def stats(mean: float, std: float = 0.0, n: int = 3) -> dict:
    return {"mean": mean, "std": std, "n": n}


def rows_with(val_losses: dict[str, tuple[float, float]]) -> dict[str, dict]:
    rows = {}
    for key, (mean, std) in val_losses.items():
        tau = float(key.removeprefix("florist-tau")) if key.startswith("florist") else None
        rows[key] = {"val_loss": stats(mean, std), "tau": tau}
    return rows


def test_optimal_tau_has_lowest_validation_loss_and_ties_go_to_the_lower_tau():
    rows = rows_with({"florist-tau0.80": (2.0, 0), "florist-tau0.90": (1.5, 0), "florist-tau0.95": (1.5, 0), "fedit": (1.0, 0)})
    assert report.select_taus(rows)["optimal"] == 0.90


def test_efficient_tau_is_the_lowest_within_one_std_of_the_best_baseline():
    rows = rows_with(
        {
            "fedit": (2.10, 0.05),
            "flora": (2.00, 0.10),  # best baseline: matching means <= 2.10
            "florist-tau0.80": (2.30, 0.0),
            "florist-tau0.85": (2.08, 0.0),
            "florist-tau0.90": (2.11, 0.0),
            "florist-tau0.99": (1.95, 0.0),
        }
    )
    selection = report.select_taus(rows)
    assert selection == {"optimal": 0.99, "efficient": 0.85, "best_baseline": "flora"}


def test_no_efficient_tau_when_none_matches_the_best_baseline():
    rows = rows_with({"flexlora": (1.0, 0.01), "florist-tau0.80": (1.5, 0), "florist-tau1.00": (1.2, 0)})
    assert report.select_taus(rows) == {"optimal": 1.0, "efficient": None, "best_baseline": "flexlora"}


def test_flexlora_clients_download_their_own_rank_the_others_the_global_modules():
    ranks = {"q": 5, "v": 3}
    assert cells.downloaded_ranks("flexlora", ranks, [2, 4]) == [{"q": 2, "v": 2}, {"q": 4, "v": 4}]
    assert cells.downloaded_ranks("florist", ranks, [2, 4]) == [ranks, ranks]


def test_download_bytes_counts_both_factors_but_only_b_for_ffa():
    shapes = {"q": (32, 32), "v": (16, 32)}
    per_client = [{"q": 4, "v": 2}]
    assert cells.download_bytes("florist", per_client, shapes, 2) == 2 * (64 * 4 + 48 * 2)
    assert cells.download_bytes("ffa", per_client, shapes, 2) == 2 * (32 * 4 + 16 * 2)


@pytest.fixture
def tiny_model(tmp_path: Path) -> str:
    directory = tmp_path / "tiny-llama"
    LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2,
    ).save_pretrained(directory)
    return str(directory)


def module_names() -> list[str]:
    return [f"model.layers.{layer}.self_attn.{kind}" for layer in range(LAYERS) for kind in ("q_proj", "v_proj")]


def fake_cell(
    out: Path,
    model: str,
    cell,
    test_loss: float,
    val_loss: float,
    rank: int,
    later_ranks: tuple[int, ...] = (),
    total_mib: float | None = None,
    chosen: tuple[float, ...] = (),
    communication: dict | None = None,
) -> None:
    """A finished run directory as florist run writes it, with made-up metrics: round 1 keeps `rank` in
    every module, each further round the next of `later_ranks`; `total_mib`: the run's bytes sent;
    `chosen`: the tau automatic tau chose in each round; `communication`: summary.json's, given whole."""
    run_dir = cell.path(out)
    overrides = [item for item in cell.overrides(out) if not item.startswith("output.")] + [f'model.name="{model}"']
    config = load_config(CONFIG, overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
    evaluation = {"test_loss": test_loss, "rouge_l": 0.2, "val_loss": val_loss, "mmlu_accuracy": 0.25,
                  "mmlu_pred_dist": {"A": 3, "B": 1, "C": 0, "D": 0}, "mmlu_always_A": 0.5}
    client_ranks = SETTINGS[cell.setting] * (8 // len(SETTINGS[cell.setting]))
    clients = [{"partition": k, "rank": r, "bytes_up": 1000 * (k + 1)} for k, r in enumerate(client_ranks)]
    rounds = [{"round": 0, "evaluation": evaluation}] + [
        {"round": t, "clients": clients, "ranks": {name: kept for name in module_names()}, "aggregation_seconds": 0.5,
         "energy": {name: 0.9 for name in module_names()}, "communication": {"down_bytes": 10 * t, "up_bytes": 36000},
         "evaluation": evaluation}
        for t, kept in enumerate((rank, *later_ranks), 1)
    ]
    for record, tau in zip(rounds[1:], chosen):
        record["tau_selection"] = {"candidates": [0.8, 0.9], "chosen": tau}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary = {"base": evaluation, "final": evaluation}
    if total_mib is not None:
        communication = {"download_mib": total_mib / 2, "upload_mib": total_mib / 2, "total_mib": total_mib, "unsent_final_download_mib": 1.0}
    if communication is not None:
        summary["communication"] = communication
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_report_from_fake_run_dirs_gives_mean_and_std_over_seeds(tmp_path: Path, tiny_model: str):
    out = tmp_path / "out"
    losses = [2.0, 2.2, 2.4]
    for seed, loss in enumerate(losses):
        fake_cell(out, tiny_model, Cell("heterogeneous", baseline("flora"), seed), loss, loss, rank=3)
    fake_cell(out, tiny_model, Cell("heterogeneous", florist(0.9), 0), 2.1, 2.0, rank=2)

    results_md = report.write_report(out, expected=8)

    text = results_md.read_text()
    assert "4 of 8 cells finished (a partial grid)." in text
    assert f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}" in text
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]["heterogeneous"]
    assert rows["flora"]["test_loss"]["n"] == 3
    assert rows["florist-tau0.90"]["test_loss"] == {"mean": 2.1, "std": 0.0, "n": 1}
    wire = VALUE_BYTES[load_config(CONFIG).wire.download]
    per_layer = sum(out_ + in_ for out_, in_ in (Q_SHAPE, V_SHAPE))
    assert rows["florist-tau0.90"]["download_mb"]["mean"] == pytest.approx(wire * LAYERS * per_layer * 2 / cells.MB)
    assert rows["florist-tau0.90"]["rank_sent"]["mean"] == 2 * 2 * LAYERS
    assert rows["flora"]["upload_mb"]["mean"] == pytest.approx(4500 / cells.MB)
    assert results["selection"]["heterogeneous"] == {"optimal": 0.9, "efficient": 0.9, "best_baseline": "flora"}
    assert (out / "pareto.png").stat().st_size > 0
    assert (out / "ranks_per_layer.png").stat().st_size > 0


def test_a_report_rebuilds_from_results_json_once_the_run_directories_are_gone(tmp_path: Path, tiny_model: str):
    """As for the committed results, which keep only results.json: --report over them gives the same rows."""
    out = tmp_path / "out"
    for seed, loss in enumerate([2.0, 2.2]):
        fake_cell(out, tiny_model, Cell("heterogeneous", baseline("flora"), seed), loss, loss, rank=3, total_mib=8.0)
        fake_cell(out, tiny_model, Cell("heterogeneous", florist(0.9), seed), loss + 0.1, loss, rank=2, total_mib=2.0)
    report.write_report(out, expected=4)
    before = json.loads((out / "results.json").read_text())
    for seed_dir in out.glob("heterogeneous/*/seed*"):
        for file in seed_dir.iterdir():
            file.unlink()
        seed_dir.rmdir()

    report.write_report(out, expected=4)

    after = json.loads((out / "results.json").read_text())
    assert after["rows"] == before["rows"] and after["cells"] == before["cells"]
    assert "4 of 4 cells finished." in (out / "results.md").read_text()


def test_the_committed_results_are_still_reportable(tmp_path: Path):
    """benchmarks/results/reproduce keeps only results.json: its rows come back as they were stored."""
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reproduce" / "results.json"
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(committed.read_text())

    report.write_report(out, expected=60)

    stored, rebuilt = json.loads(committed.read_text()), json.loads((out / "results.json").read_text())
    assert rebuilt["selection"] == stored["selection"]
    for setting, rows in stored["rows"].items():
        assert list(rebuilt["rows"][setting]) == list(rows)
        for key, row in rows.items():
            assert {metric: rebuilt["rows"][setting][key][metric] for metric in row} == row, key
            for metric in ("total_mib", "total_with_final_download_mib"):  # these cells predate the byte count both ways
                assert rebuilt["rows"][setting][key][metric]["n"] == 0
    assert "60 of 60 cells finished." in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "grid, finished, excerpt",
    [
        # The spectra of round 3, from the saved adapters of three seeds.
        ("scale", "48 of 48 cells finished.", "| FLoRA | 3 | 152 |"),
        # The warm start paired against FLoRA over three seeds.
        ("rounds", "18 of 18 cells finished.", "| FLoRIST (tau 0.90), warm | 0.90 | -0.0107 ± 0.0044 |"),
        # Issue 21's rows: secure and plain, the 3x cap and DP over three seeds; the sketch width per round.
        ("secure", "18 of 18 cells finished.", "| FLoRIST (tau 0.90), secure | 64 ± 0 | 128 ± 0 | 129 ± 4 |"),
    ],
)
def test_the_committed_multi_round_results_are_still_reportable(tmp_path: Path, grid, finished, excerpt):
    """benchmarks/results/<grid> keeps only results.json (with the spectra computed where the adapters were)."""
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / grid / "results.json"
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(committed.read_text())

    text = report.write_report(out, expected=len(GRIDS[grid].cells())).read_text()

    stored, rebuilt = json.loads(committed.read_text()), json.loads((out / "results.json").read_text())
    assert rebuilt["selection"] == stored["selection"]
    for setting, rows in stored["rows"].items():
        assert list(rebuilt["rows"][setting]) == list(rows)
        for key, row in rows.items():
            mine = rebuilt["rows"][setting][key]
            if "total_with_final_download_mib" in row:  # stored since the totals count what was sent
                assert mine == row, key
                continue
            assert {metric: mine[metric] for metric in row if metric != "total_mib"} == {k: v for k, v in row.items() if k != "total_mib"}
            # These cells' stored total held the final model's download: it is kept, under the name that says so.
            assert mine["total_with_final_download_mib"] == row["total_mib"], key
            # What they sent: their rounds' own byte counts.
            sent = [sum(r["down_bytes"] + r["up_bytes"] for r in cell["rounds"]) / 2**20
                    for cell in stored["cells"] if cell["setting"] == setting and cell["row"] == key]
            assert mine["total_mib"]["mean"] == pytest.approx(statistics.mean(sent), rel=1e-12), key
            assert mine["total_mib"]["mean"] < row["total_mib"]["mean"], key
    assert finished in text and excerpt in text


def test_run_mib_counts_what_was_sent_with_the_final_download_beside_it_in_either_summary_format(tmp_path: Path, tiny_model: str):
    """summary.json before the totals counted only what was sent held the final download inside them."""
    out = tmp_path / "out"
    before = {"download_mib": 7.0, "upload_mib": 4.0, "total_mib": 11.0, "final_download_mib": 3.0}
    now = {"download_mib": 4.0, "upload_mib": 4.0, "total_mib": 8.0, "unsent_final_download_mib": 3.0}
    for seed, communication in enumerate((before, now)):
        fake_cell(out, tiny_model, Cell("heterogeneous", baseline("flora"), seed), 2.0, 2.0, rank=3, communication=communication)

    text = report.write_report(out, expected=2).read_text()

    row = json.loads((out / "results.json").read_text())["rows"]["heterogeneous"]["flora"]
    assert row["total_mib"] == {"mean": 8.0, "std": 0.0, "n": 2}
    assert row["total_with_final_download_mib"] == {"mean": 11.0, "std": 0.0, "n": 2}
    assert "| FLoRA |  | 2.0000 ± 0.0000 |" in text and "| 8.00 ± 0.00 | 11.00 ± 0.00 |" in text


def test_a_stored_record_from_before_keeps_its_total_as_the_one_with_the_final_download():
    mib = cells.MIB
    rounds = [{"round": 1, "down_bytes": 3 * mib, "up_bytes": 2 * mib}, {"round": 2, "down_bytes": 5 * mib, "up_bytes": 2 * mib}]
    stored = {"method": "flora", "tau": None, "seed": 0, "row": "flora", "rounds": rounds,
              "download_mib": 14.0, "upload_mib": 4.0, "total_mib": 18.0}

    record = cells.stored_record(stored)

    assert (record["download_mib"], record["upload_mib"], record["total_mib"]) == (8.0, 4.0, 12.0)
    assert (record["unsent_final_download_mib"], record["total_with_final_download_mib"]) == (6.0, 18.0)
    assert cells.stored_record(record) == record  # a record written now is read as it is


def test_records_from_before_rows_had_labels_get_their_method_and_tau_as_row():
    stored = {"method": "florist", "tau": 0.8, "seed": 0}
    assert cells.stored_record(stored)["row"] == "florist-tau0.80"
    assert cells.stored_record({"method": "fedit", "tau": None, "seed": 0})["row"] == "fedit"
    assert cells.stored_record(stored)["total_mib"] is None and cells.stored_record(stored)["spectra"] == []
    assert cells.stored_record(stored)["total_with_final_download_mib"] is None


def test_paired_table_against_flora_gives_differences_and_the_share_of_flora_bytes(tmp_path: Path, tiny_model: str):
    out = tmp_path / "out"
    for seed, loss in enumerate([2.0, 2.5, 3.0]):
        fake_cell(out, tiny_model, Cell("heterogeneous", baseline("flora"), seed), loss, loss, rank=3, total_mib=10.0 * (seed + 1))
        fake_cell(out, tiny_model, Cell("heterogeneous", florist(0.8), seed), loss + 0.01, loss, rank=2, total_mib=1.0 * (seed + 1))

    text = report.write_report(out, expected=6).read_text()

    assert "each row minus FLoRA (the exact aggregate)" in text
    line = next(line for line in text.splitlines() if line.startswith("| FLoRIST (tau 0.80) | 0.80 | 0.0100 ± 0.0000"))
    assert "0.100 ± 0.000" in line  # a tenth of FLoRA's bytes in every seed
    assert (out / "pareto_total.png").stat().st_size > 0


def test_the_report_shows_per_round_the_rank_florist_keeps_and_the_tau_automatic_tau_chose(tmp_path: Path, tiny_model: str):
    out = tmp_path / "out"
    fake_cell(out, tiny_model, Cell("heterogeneous", florist(0.9), 0), 2.0, 2.0, rank=6, later_ranks=(4, 3))
    fake_cell(out, tiny_model, Cell("heterogeneous", florist(0.9), 1), 2.0, 2.0, rank=6, later_ranks=(2, 1))
    [automatic] = [row for row in grid.SCALE_ROWS if row.label == "florist-auto-tau"]
    fake_cell(out, tiny_model, Cell("heterogeneous", automatic, 0), 2.0, 2.0, rank=5, later_ranks=(4, 4), chosen=(0.9, 0.8, 0.8))

    text = report.write_report(out, expected=3).read_text()

    modules = 2 * LAYERS
    kept = f"| FLoRIST (tau 0.90) | {6 * modules:.1f} ± 0.0 | {3 * modules:.1f} ± {statistics.stdev([4 * modules, 2 * modules]):.1f} |"
    assert kept in text
    assert "| FLoRIST, auto-tau | 0.90 ± 0.00 | 0.80 ± 0.00 | 0.80 ± 0.00 |" in text
    assert json.loads((out / "results.json").read_text())["rows"]["heterogeneous"]["florist-auto-tau"]["tau"] is None
    assert (out / "spectra.png").stat().st_size > 0


def test_a_budgeted_row_has_no_tau(tmp_path: Path, tiny_model: str):
    out = tmp_path / "out"
    fake_cell(out, tiny_model, Cell("heterogeneous", grid.budgeted(5), 0), 2.0, 2.0, rank=4)
    text = report.write_report(out, expected=1).read_text()
    assert json.loads((out / "results.json").read_text())["rows"]["heterogeneous"]["florist-budget5mb"]["tau"] is None
    assert any(line.startswith("| FLoRIST, budget5mb |  | ") for line in text.splitlines())


def test_spectra_of_a_copy_without_adapter_weights_come_from_the_earlier_report(tmp_path: Path, tiny_model: str):
    """A grid shipped from another machine without its adapters' weights keeps the spectra its report computed."""
    out = tmp_path / "out"
    cell = Cell("heterogeneous", baseline("flora"), 0)
    fake_cell(out, tiny_model, cell, 2.0, 2.0, rank=3)
    saved = cell.path(out) / "clients" / "round1"
    (saved / "0").mkdir(parents=True)
    (saved / "0" / "adapter_config.json").write_text("{}")
    (saved / "clients.json").write_text(json.dumps([{"partition": 0, "adapter": "0", "weight": 1}]))
    report.write_report(out, expected=1)
    results = json.loads((out / "results.json").read_text())
    assert results["cells"][0]["spectra"] == []  # no weights: nothing computed here
    earlier = [{"round": 1, "stack_rank": 3.0, "rank_share": {"0.80": 0.34, "0.90": 0.67, "0.99": 1.0}, "curve": [min(1.0, 0.1 * k) for k in range(1, 21)]}]
    results["cells"][0]["spectra"] = earlier
    (out / "results.json").write_text(json.dumps(results))

    report.write_report(out, expected=1)

    assert json.loads((out / "results.json").read_text())["cells"][0]["spectra"] == earlier


def test_row_labels_name_variants_and_only_plain_taus_are_selected_among():
    bf16 = grid.variant(florist(0.9), "bf16", 'wire.download="bfloat16"')
    assert bf16.label == "florist-tau0.90-bf16"
    assert grid.row_name(bf16.label) == "FLoRIST (tau 0.90), bf16"
    assert grid.row_name("flexlora") == "FlexLoRA"
    assert grid.is_tau_row("florist-tau0.90") and not grid.is_tau_row(bf16.label) and not grid.is_tau_row("flora")
    # The bf16 variant has the lowest validation loss, but it is not a tau of FLoRIST's own.
    rows = rows_with({"florist-tau0.80": (2.0, 0), "florist-tau0.90": (1.9, 0)})
    rows[bf16.label] = {"val_loss": stats(1.0), "tau": 0.9}
    assert report.select_taus(rows)["optimal"] == 0.9
    assert sorted(rows, key=grid.row_order) == ["florist-tau0.80", "florist-tau0.90", bf16.label]


def test_one_round_grids_replay_only_rows_that_change_the_aggregation_alone():
    replayed = {cell.label for cell in GRIDS["full"].cells([0]) if grid.replayable(cell.row, rounds=1)}
    assert replayed == {"fedit", "flexlora", *(florist(tau).label for tau in grid.TAUS)}
    assert not grid.replayable(grid.variant(florist(0.9), "int8", 'wire.upload="int8"'), rounds=1)


def test_every_cell_of_the_scale_grid_is_a_valid_whole_federation(tmp_path: Path):
    """Three rounds: round 2's clients train from the server's aggregate, so nothing may be replayed."""
    scale = GRIDS["scale"]
    configs = [load_config(CONFIG, [*scale.scale, *cell.overrides(tmp_path)]) for cell in scale.cells()]
    assert len(configs) == len(scale.rows) * 3
    assert {c.federation.rounds for c in configs} == {3}
    assert not any(grid.replayable(cell.row, 3) for cell in scale.cells())
    assert {(c.wire.download, c.wire.upload) for c in configs} == {("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "int8")}
    assert {c.wire.client_tau for c in configs} == {1.0, 0.9}
    assert sum(c.aggregation.automatic_tau for c in configs) == 3
    budgets = {(c.aggregation.download_budget_mb, c.aggregation.budget_criterion) for c in configs if c.aggregation.download_budget_mb}
    assert budgets == {(2, "normalized"), (5, "normalized"), (10, "normalized"), (5, "absolute"), (5, "per-byte")}
    assert scale.cells()[0].row == grid.SOURCE


def test_the_secure_grid_pairs_florist_secure_with_plain_florist_at_the_rounds_scale_and_adds_dp_rows(tmp_path: Path):
    """Issue 21's rows: the rounds grid's scale, tau 0.90 and fresh LoRAs each round in every cell; the
    automatic sketch width, also capped at 3x a mean client's adapter; DP at epsilon 1, 4 and 16
    (delta 1e-5) with one measured clip."""
    secure = GRIDS["secure"]
    configs = {(cell.label, cell.seed): load_config(CONFIG, [*secure.scale, *cell.overrides(tmp_path)]) for cell in secure.cells()}
    assert secure.scale == GRIDS["rounds"].scale and secure.seeds == (0, 1, 2)
    assert {c.aggregation.tau for c in configs.values()} == {0.9}
    assert not any(c.federation.warm_start for c in configs.values())
    plain = {label: c for (label, _), c in configs.items() if c.aggregation.method == "florist"}
    assert set(plain) == {"florist-tau0.90"} and plain["florist-tau0.90"].output.save_client_adapters
    # The plain row is the rounds grid's own, saving its clients besides.
    rounds_cell = Cell("heterogeneous", florist(0.9), 0)
    rounds_plain = load_config(CONFIG, [*GRIDS["rounds"].scale, *rounds_cell.overrides(tmp_path)])
    mine = configs[("florist-tau0.90", 0)]
    assert mine.model_copy(update={"output": rounds_plain.output}) == rounds_plain
    private = {label: c.privacy for (label, _), c in configs.items() if c.privacy.dp}
    assert {c.aggregation.method for c in configs.values() if c.aggregation.method != "florist"} == {"florist-secure"}
    assert all(c.aggregation.sketch_width is None for c in configs.values())
    assert sorted(p.target_epsilon for p in private.values()) == [1, 4, 16]
    assert {(p.delta, p.clip_norm, p.noise_multiplier) for p in private.values()} == {(1e-5, grid.DP_CLIP_NORM, None)}
    assert sum(c.aggregation.secure and not c.privacy.dp for c in configs.values()) == 6
    capped = {label for (label, _), c in configs.items() if c.aggregation.sketch_upload is not None}
    assert capped == {"florist-tau0.90-secure-up3x"} and configs[("florist-tau0.90-secure-up3x", 0)].aggregation.sketch_upload == 3


def test_a_grid_without_flora_pairs_each_variant_with_the_plain_row_it_changes():
    rows = rows_with({"florist-tau0.90": (1.9, 0), "florist-tau0.80": (2.0, 0)})
    rows["florist-tau0.90-secure"] = rows["florist-tau0.90"]
    assert report.varied_rows(rows) == ["florist-tau0.90"]
    assert report.varied_rows({**rows, "flora": rows["florist-tau0.80"]}) == []


def test_spectrum_summary_gives_the_share_of_directions_each_energy_level_needs():
    # Energies 9 and 1: the first direction holds 90%.
    summary = spectra.summarise({"q": [3.0, 1.0], "v": [1.0, 0.0]})
    assert summary["stack_rank"] == 2
    assert summary["rank_share"] == {"0.80": 0.5, "0.90": 0.5, "0.99": pytest.approx((1.0 + 0.5) / 2)}
    assert summary["curve"][-1] == pytest.approx(1.0)
    assert spectra.cumulative_energy([0.0, 0.0]) == [1.0, 1.0]


def finishing_cell(launch: Callable[[Path, list[str]], None]) -> type:
    """A stand-in for running.FederatedCell that calls `launch(run_dir, command)` and finishes at once
    (an empty summary.json in its run directory)."""

    class FinishingCell:
        cpu_seconds = 0.0

        def __init__(self, command, log, timeout, cores=None):
            run_dir = Path(json.loads(next(item for item in command if item.startswith("output.run_dir=")).partition("=")[2]))
            launch(run_dir, command)
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text("{}")

        def poll(self):
            return True

        def stop(self):
            pass

    return FinishingCell


def test_grid_skips_finished_cells_and_redoes_half_finished_ones(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    done, half, fresh = [cell for cell in GRIDS["full"].cells([0]) if not grid.replayable(cell.row, rounds=1)][:3]
    done.path(out).mkdir(parents=True)
    (done.path(out) / "summary.json").write_text("{}")
    half.path(out).mkdir(parents=True)
    (half.path(out) / "leftover").write_text("from an interrupted run")
    launched = []

    def launch(run_dir: Path, command: list[str]) -> None:
        assert not run_dir.exists(), "a half-finished run directory must be removed before its cell runs again"
        launched.append(run_dir)

    FakeCell = finishing_cell(launch)

    # A cell another machine ran, recorded in the grid's results.json without its run directory.
    shipped = [cell for cell in GRIDS["full"].cells([1]) if not grid.replayable(cell.row, rounds=1)][0]
    (out / "results.json").write_text(json.dumps({"cells": [{"setting": shipped.setting, "row": shipped.label, "seed": 1}]}))
    monkeypatch.setattr(running, "FederatedCell", FakeCell)
    assert running.run_grid([done, half, fresh, shipped], out, grid.QUICK_SCALE) == []
    assert launched == [half.path(out), fresh.path(out)]


@pytest.mark.parametrize("jobs", [1, 2])
def test_grid_runs_up_to_jobs_federated_cells_at_once_and_a_replay_after_its_source(tmp_path: Path, monkeypatch, jobs: int):
    out = tmp_path / "out"
    cells = GRIDS["full"].cells([0])
    federated = [cell for cell in cells if not grid.replayable(cell.row, rounds=1)][:3]
    replayed = next(cell for cell in cells if grid.replayable(cell.row, rounds=1))
    alive, most, order = [], [0], []

    class SlowCell:
        cpu_seconds = 0.0

        def __init__(self, command, log, timeout, cores=None):
            self.run_dir = Path(json.loads(next(item for item in command if item.startswith("output.run_dir=")).partition("=")[2]))
            self.polls = 0
            self.cores = cores
            assert all(other.cores != cores for other in alive), "cells side by side must run on their own cores"
            alive.append(self)
            most[0] = max(most[0], len(alive))

        def poll(self):
            self.polls += 1
            if self.polls < 3:
                return None
            self.run_dir.mkdir(parents=True)
            (self.run_dir / "summary.json").write_text("{}")
            alive.remove(self)
            order.append(self.run_dir)
            return True

        def stop(self):
            pass

    def fake_replay(config, source, log):
        assert (source / "summary.json").exists(), "a replay must wait for its source"
        run_dir = Path(config.output.run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")
        order.append(run_dir)
        return True

    monkeypatch.setattr(running, "FederatedCell", SlowCell)
    monkeypatch.setattr(running, "Replayer", lambda: fake_replay)
    monkeypatch.setattr(running.time, "sleep", lambda seconds: None)
    assert running.run_grid([*federated, replayed], out, grid.QUICK_SCALE, jobs=jobs) == []
    assert most[0] == jobs
    assert sorted(order) == sorted(cell.path(out) for cell in [*federated, replayed])
    assert order.index(replayed.path(out)) > order.index(replayed.source.path(out))
    assert len((out / "timings.jsonl").read_text().splitlines()) == 4


def one_round(model_dir: Path, run_dir: Path, method: str, *extra: str):
    """One round of three clients of ranks 2, 4, 8 on the tiny model, as the grid runs it."""
    return load_config(
        None,
        [
            f"model.name={json.dumps(str(model_dir))}",
            "data.examples_per_category=4",
            "data.test_per_category=1",
            "data.min_client_examples=2",
            "data.validation_fraction=0.25",
            "federation.num_clients=3",
            "federation.ranks=[2, 4, 8]",
            "federation.rounds=1",
            "federation.workers=1",
            'wire.download="float16"',
            'wire.upload="float16"',
            f"aggregation.method={json.dumps(method)}",
            "training.local_steps=2",
            "training.learning_rate=0.05",
            "evaluation.max_new_tokens=2",
            "output.save_model=false",
            f"output.run_dir={json.dumps(str(run_dir))}",
            *extra,
        ],
    )


def test_a_replayed_cell_equals_the_same_cell_run_as_a_federation(tmp_path: Path, tiny_model_dir: Path):
    """The grid's shortcut: in one round, FLoRIST on FLoRA's saved client adapters is FLoRIST's own run."""
    from florist.federation.simulation import run_federation

    source = run_federation(one_round(tiny_model_dir, tmp_path / "flora", "flora", "output.save_client_adapters=true"))
    direct = run_federation(one_round(tiny_model_dir, tmp_path / "direct", "florist", "aggregation.tau=0.8"))
    replayed_config = one_round(tiny_model_dir, tmp_path / "replayed", "florist", "aggregation.tau=0.8", "evaluation.base=false")
    replay = Replayer()
    with open(tmp_path / "replay.log", "w") as log:
        assert replay(replayed_config, source, log), (tmp_path / "replay.log").read_text()

    direct_round, replayed_round = read_rounds(direct)[1], read_rounds(tmp_path / "replayed")[1]
    assert replayed_round["ranks"] == direct_round["ranks"]
    assert replayed_round["clients"] == read_rounds(source)[1]["clients"]
    for name in ("val_loss", "test_loss", "rouge_l"):
        assert replayed_round["evaluation"][name] == pytest.approx(direct_round["evaluation"][name], abs=1e-5), name
    # Can fail: FLoRIST at tau 0.8 and FLoRA evaluate differently on these clients.
    flora_loss = read_rounds(source)[1]["evaluation"]["test_loss"]
    assert abs(replayed_round["evaluation"]["test_loss"] - flora_loss) > 1e-5
    replayed_summary = json.loads((tmp_path / "replayed" / "summary.json").read_text())
    assert replayed_summary["final"] == replayed_round["evaluation"]
    assert replayed_summary["communication"] == json.loads((direct / "summary.json").read_text())["communication"]
    assert replayed_round["communication"] == direct_round["communication"]
    # The source's saved clients give the whole spectrum; at tau 0.8 it needs the ranks FLoRIST kept.
    (by_module,) = spectra.singular_values_by_round(source).values()
    for name, values in by_module.items():
        assert len(values) == 2 + 4 + 8
        assert spectra.rank_share(spectra.cumulative_energy(values), 0.8) * len(values) == direct_round["ranks"][name], name


def test_a_replay_without_its_finished_source_fails_and_says_so(tmp_path: Path, tiny_model_dir: Path):
    config = one_round(tiny_model_dir, tmp_path / "replayed", "fedit")
    with open(tmp_path / "replay.log", "w") as log:
        assert not Replayer()(config, tmp_path / "missing", log)
    assert "has not finished" in (tmp_path / "replay.log").read_text()


def test_paired_differences_subtract_the_reference_seed_by_seed():
    def record(method: str, seed: int, loss: float) -> dict:
        return {"row": method, "method": method, "tau": None, "seed": seed, "test_loss": loss}

    # Seeds move every method together by a lot; FedIT is 0.01 worse than FLoRA in every seed.
    records = [record("flora", s, 2.0 + s) for s in range(3)] + [record("fedit", s, 2.01 + s) for s in range(3)]
    differences = report.paired_differences(records, "flora", "test_loss")
    assert differences["fedit"]["mean"] == pytest.approx(0.01)
    assert differences["fedit"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert differences["fedit"]["n"] == 3 and "flora" not in differences


def run_to_end(command: list[str], log, timeout: float) -> bool:
    cell = running.FederatedCell(command, log, timeout)
    while (ok := cell.poll()) is None:
        time.sleep(0.1)
    return ok


def test_a_hung_federated_cell_is_stopped_with_every_process_it_started(tmp_path: Path):
    """As when Ray's raylet dies on start and the simulation waits forever: the cell fails, nothing is left running."""
    child_pid = tmp_path / "child.pid"
    hang = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(child_pid)!r}, 'w').write(str(child.pid)); time.sleep(120)"
    )
    with open(tmp_path / "cell.log", "w") as log:
        assert not run_to_end([sys.executable, "-c", hang], log, timeout=5)
    assert "stopped after 5 s" in (tmp_path / "cell.log").read_text()
    status = Path(f"/proc/{child_pid.read_text()}/status")

    def running() -> bool:  # gone, or a zombie waiting for init to reap it: either way no longer running
        try:
            return "\tZ" not in status.read_text().split("State:")[1].splitlines()[0]
        except FileNotFoundError:
            return False

    # SIGKILL reaches the group at once, but a busy machine may take a moment to schedule the exit.
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()


def test_a_federated_cell_runs_on_the_cores_it_was_given(tmp_path: Path):
    core = min(os.sched_getaffinity(0))
    show = "import os; print(sorted(os.sched_getaffinity(0)))"
    with open(tmp_path / "cell.log", "w") as log:
        cell = running.FederatedCell([sys.executable, "-c", show], log, timeout=60, cores=[core])
        while (ok := cell.poll()) is None:
            time.sleep(0.1)
    assert ok and (tmp_path / "cell.log").read_text().strip() == str([core])


def test_cores_are_dealt_into_one_share_per_job():
    cores = sorted(os.sched_getaffinity(0))
    shares = running.core_shares(len(cores))
    assert shares == [[core] for core in cores]
    assert running.core_shares(1) == [cores]
    assert len(running.core_shares(2 * len(cores))) == 2 * len(cores)


def test_a_federated_cell_that_exits_reports_its_status(tmp_path: Path):
    with open(tmp_path / "cell.log", "w") as log:
        assert run_to_end([sys.executable, "-c", "print('ran')"], log, timeout=60)
        assert not run_to_end([sys.executable, "-c", "raise SystemExit(3)"], log, timeout=60)
    assert "ran" in (tmp_path / "cell.log").read_text()


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_cell_timeout_must_be_a_positive_number_of_seconds(value: str, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "reproduce", "--cell-timeout", value])
    assert "--cell-timeout" in capsys.readouterr().err


def test_rows_select_cells_of_a_grid_seed_by_seed_and_an_unknown_row_is_named():
    secure = GRIDS["secure"]
    labels = ["florist-tau0.90-secure", "florist-tau0.90"]
    chosen = secure.cells([1, 2], labels)
    assert [(cell.label, cell.seed) for cell in chosen] == [(label, seed) for seed in (1, 2) for label in labels]
    assert secure.cells(None, labels) == [cell for cell in secure.cells() if cell.label in labels]
    with pytest.raises(ValueError, match=r"^row 'florist-tau0.50' is not in this grid; its rows: florist-tau0.90-secure, florist-tau0.90, "):
        secure.cells([0], ["florist-tau0.50"])


def test_only_the_first_cell_of_a_grid_with_none_finished_evaluates_the_base_model(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    first, second, later = [cell for cell in GRIDS["full"].cells([0]) if not grid.replayable(cell.row, rounds=1)][:3]
    evaluated = {}
    monkeypatch.setattr(running, "FederatedCell", finishing_cell(lambda run_dir, command: evaluated.update({run_dir: "evaluation.base=true" in command})))
    assert running.run_grid([first, second], out, grid.QUICK_SCALE) == []
    assert evaluated == {first.path(out): True, second.path(out): False}
    # Resumed later with another row first: the base model was evaluated already.
    assert running.run_grid([later, first, second], out, grid.QUICK_SCALE) == []
    assert evaluated[later.path(out)] is False
