"""The run directory (written whole or not at all, only once the run has something to record) and its plots."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from florist.config import RunConfig, load_config
from florist.federation.server_app import serve
from florist.federation.server_model import ServerModel
from florist.federation.simulation import run_federation
from florist.reporting.plots import HELD_OUT, loss_figure
from florist.reporting.run_directory import RunDirectory, check_round_record, read_rounds, write_atomically


def test_written_file_has_the_content_and_the_umask_mode_not_a_private_temp_files(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "deep" / "metrics.json", "{}\n")
    finally:
        os.umask(previous)
    target = tmp_path / "deep" / "metrics.json"
    assert target.read_text() == "{}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomically(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ---------------------------------------------------------------- the run directory appears with its first record


SMALL_DATA = ("data.examples_per_category=2", "data.min_client_examples=1", "federation.num_clients=2", "federation.ranks=[2]")


def run_config(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(None, [f"output.run_dir={json.dumps(str(tmp_path / 'run'))}", *overrides])


def test_the_run_directory_appears_with_the_first_record(tmp_path: Path):
    config = run_config(tmp_path)
    run = RunDirectory.create(config)
    assert run.path == tmp_path / "run" and not run.path.exists()
    run.record_round({"round": 0, "evaluation": {}})
    assert load_config(run.path / "config.toml") == config
    assert read_rounds(run.path) == [{"round": 0, "evaluation": {}}]


def test_a_run_directory_taken_in_the_meantime_is_not_written_into(tmp_path: Path):
    run = RunDirectory.create(run_config(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("another run's\n")
    with pytest.raises(ValueError, match="exists and is not empty"):
        run.record_round({"round": 0})
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "another run's\n"


def test_a_server_that_fails_before_its_first_record_leaves_no_run_directory(tmp_path: Path, tiny_model_dir: Path, monkeypatch):
    # The base model's evaluation, the first thing a run records, runs out of memory.
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ServerModel, "evaluate", out_of_memory)
    config = run_config(tmp_path, f"model.name={json.dumps(str(tiny_model_dir))}", *SMALL_DATA)
    with pytest.raises(RuntimeError, match="out of memory"):
        serve(config, grid=None)
    assert list(tmp_path.iterdir()) == []


def test_a_run_refused_before_it_starts_leaves_no_run_directory(tmp_path: Path, tiny_model_dir: Path):
    (tmp_path / "mmlu.json").write_text("{not JSON")
    config = run_config(
        tmp_path, f"model.name={json.dumps(str(tiny_model_dir))}", f"evaluation.mmlu={json.dumps(str(tmp_path / 'mmlu.json'))}",
        *SMALL_DATA,
    )
    with pytest.raises(ValueError, match="mmlu.json"):
        run_federation(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmlu.json"]


# ---------------------------------------------------------------- plots


def rounds_with(evaluated: dict[int, dict]) -> list[dict]:
    """Round 0 (the base) and three trained rounds of two clients; evaluations where `evaluated` says."""
    rounds = [{"round": 0, "evaluation": evaluated.get(0, {})}]
    for t in (1, 2, 3):
        clients = [{"partition": p, "train_loss": 2.0 - 0.1 * t - 0.05 * p} for p in (0, 1)]
        rounds.append({"round": t, "clients": clients, "train_loss": 2.0 - 0.1 * t, "evaluation": evaluated.get(t, {})})
    return rounds


def lines_by_label(figure) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in figure.axes[0].get_lines()}


def test_a_secure_sum_rounds_sites_carry_no_train_loss_and_the_record_still_checks_but_a_loss_as_text_does_not():
    # A secure-sum site's loss is only in the round's summed totals (federation/training_totals.py):
    # the record a resumed run reads back must pass without one.
    site = {"partition": 0, "node": 7, "rank": 4, "bytes_down": 10, "bytes_up": 20}
    record = {
        "round": 1,
        "communication": {"down_bytes": 10, "up_bytes": 20},
        "evaluation": {},
        "train_loss": 2.5,
        "clients": [site],
        "totals": {"examples": 12, "train_tokens": 300, "train_loss": 2.5},
    }
    assert check_round_record(record) is None
    record["clients"] = [{**site, "train_loss": "0.5"}]
    assert check_round_record(record) == "clients.0.train_loss: input should be a valid number"


def test_loss_plot_has_whole_round_ticks():
    figure = loss_figure(rounds_with({}))
    figure.canvas.draw()
    ax = figure.axes[0]
    low, high = ax.get_xlim()
    ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    plt.close(figure)


def test_loss_plot_shows_held_out_loss_for_every_round_it_was_measured():
    # Every round evaluated for the validation loss; the test loss of the base and the final model only.
    evaluated = {t: {"val_loss": 1.9 - 0.1 * t, **({"test_loss": 2.1 - 0.2 * t} if t in (0, 3) else {})} for t in range(4)}
    figure = loss_figure(rounds_with(evaluated))
    lines = lines_by_label(figure)
    assert lines[HELD_OUT["val_loss"]] == ([0, 1, 2, 3], [pytest.approx(1.9 - 0.1 * t) for t in range(4)])
    assert lines[HELD_OUT["test_loss"]] == ([0, 3], [pytest.approx(2.1), pytest.approx(1.5)])
    assert lines["weighted mean"][0] == [1, 2, 3]
    plt.close(figure)


def test_loss_plot_without_evaluation_has_no_held_out_line():
    figure = loss_figure(rounds_with({}))
    assert not set(HELD_OUT.values()) & set(lines_by_label(figure))
    plt.close(figure)
