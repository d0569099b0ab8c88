"""Smoke tests of `florist bench aggregate`: what it reports, never how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from florist.aggregation import make_aggregator
from florist.bench.aggregate import (
    PRESETS,
    RANK_SETTINGS,
    Case,
    MethodRun,
    adapter_bytes,
    measure,
    measured_modules,
    synthetic_client,
    synthetic_clients,
)
from florist.cli import main

SMALL = Case("smollm2-135m", "hetero", 0.9)


def test_synthetic_clients_have_the_preset_shapes_ranks_and_a_decaying_shared_spectrum():
    names = list(PRESETS["tinyllama"].modules())[:2]
    clients = synthetic_clients("tinyllama", "hetero", names=names)
    assert [c.modules[names[1]].rank for c in clients] == [r for r, _ in RANK_SETTINGS["hetero"]]
    assert [c.modules[names[1]].shape for c in clients] == [(256, 2048)] * len(clients)
    for module in make_aggregator("florist", tau=0.9).aggregate(clients).modules.values():
        s = module.singular_values
        assert s[8] < 0.1 * s[0]  # negligible after the shared components
        assert 2 <= module.rank <= 10


def test_ffa_clients_share_a_prefixes():
    names = list(PRESETS["smollm2-135m"].modules())[:2]
    clients = synthetic_clients("smollm2-135m", "hetero", ffa=True, names=names)
    longest = clients[-1].modules[names[0]].A
    assert all(torch.equal(c.modules[names[0]].A, longest[: c.modules[names[0]].rank]) for c in clients)
    make_aggregator("ffa").aggregate(clients)  # refuses clients whose A differ


def test_a_subset_must_cover_every_module_shape():
    with pytest.raises(ValueError, match="1 module.s. cover 1 of the 2 module shapes of tinyllama; measure at least 2"):
        measured_modules("tinyllama", 1)
    assert set(measured_modules("tinyllama", 2).values()) == {22.0}


def test_downloads_and_ranks_are_extrapolated_from_a_subset():
    preset = PRESETS[SMALL.preset]
    client_ranks = [r for r, _ in RANK_SETTINGS[SMALL.ranks]]
    flora = measure(SMALL, MethodRun("flora", "flora", repeats=1, modules=2))
    # FLoRA sends every client the whole stack: all clients' adapters.
    assert flora.download_bytes_per_client == [adapter_bytes(SMALL)] * len(client_ranks)
    assert flora.rank_sent_per_client == [len(preset.modules()) * sum(client_ranks)] * len(client_ranks)
    assert flora.extrapolated_from_modules == 2
    flexlora = measure(SMALL, MethodRun("flexlora", "flexlora", repeats=1, modules=2))
    assert flexlora.download_bytes_per_client == [
        sum((m + n) * r * 4 for m, n in preset.modules().values()) for r in client_ranks
    ]


def test_cli_writes_every_method_to_json_and_prints_every_figure_whole_into_a_file(tmp_path):
    """Run as `florist ... > file` or `| tee`: no standard stream is a terminal and COLUMNS is unset, where
    rich alone assumes 80 columns and this table's figures came out as `0.07…`."""
    target, printed = tmp_path / "out" / "bench.json", tmp_path / "printed.txt"
    arguments = ["bench", "aggregate", "--preset", "smollm2-135m", "--repeats", "1", "--threads", "1", "--json", str(target)]
    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    with printed.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "florist.cli", *arguments], stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, env=environment, timeout=600)
    text = printed.read_text()
    assert done.returncode == 0, text
    report = json.loads(target.read_text())
    assert "…" not in text
    table = {cells[0].rstrip("*"): cells for cells in (
        [cell.strip() for cell in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")
    )}
    rows = report["cases"][0]["rows"]
    assert set(table) == {row["label"] for row in rows}
    for row in rows:
        figures = [f"{row['seconds_median']:.3g}", f"{row['cpu_seconds_median']:.3g}", f"{row['flops'] / 1e9:,.2f}"]
        assert set(figures) <= set(table[row["label"]]), (figures, table[row["label"]])
    assert list(target.parent.iterdir()) == [target]  # no temporary file left behind
    assert report["machine"]["torch_threads"] == 1
    (case,) = report["cases"]
    labels = [row["label"] for row in case["rows"]]
    assert labels == ["florist 0.9", "florist 0.9 qr", "florist 0.9 svd", "flora", "fedit", "ffa", "flexlora qr", "flexlora"]
    rows = {row["label"]: row for row in case["rows"]}
    assert rows["flexlora"]["speedup_vs_flexlora"] == 1.0  # the paper's dense FlexLoRA is the reference
    # Factored FlexLoRA sends the same ranks with fewer operations than the dense SVD.
    assert rows["flexlora qr"]["rank_sent_per_client"] == rows["flexlora"]["rank_sent_per_client"]
    assert rows["flexlora qr"]["flops"] < rows["flexlora"]["flops"]
    assert rows["flexlora"]["extrapolated_from_modules"] == 2
    for row in case["rows"]:
        assert row["seconds_median"] > 0 and row["peak_extra_bytes"] is not None and row["flops"] > 0
    # Every FLoRIST route keeps the same ranks: they compute the same spectrum.
    assert len({tuple(rows[label]["rank_sent_per_client"]) for label in labels[:3]}) == 1


def test_cli_refuses_a_bad_tau(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "aggregate", "--tau", "1.5"])
    assert "tau must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_a_client_is_the_same_made_alone_or_among_others():
    names = list(PRESETS["smollm2-135m"].modules())[:2]
    together = synthetic_clients("smollm2-135m", "hetero", seed=3, names=names, count=11)
    alone = synthetic_client("smollm2-135m", "hetero", 10, seed=3, names=names)
    assert alone.weight == together[10].weight == 3775.0 and alone.modules[names[0]].rank == 8  # the setting cycles
    assert all(torch.equal(alone.modules[n].B, together[10].modules[n].B) for n in names)
    assert not torch.equal(alone.modules[names[0]].B, together[2].modules[names[0]].B)


def test_cli_streams_many_clients_beside_the_batched_route_and_flexlora(tmp_path):
    target, plot = tmp_path / "scaling.json", tmp_path / "plots" / "scaling.png"
    arguments = ["bench", "aggregate", "--preset", "smollm2-135m", "--ranks", "homo", "--clients", "3,20"]
    assert main([*arguments, "--repeats", "1", "--threads", "1", "--json", str(target), "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG") and list(plot.parent.iterdir()) == [plot]
    report = json.loads(target.read_text())
    assert report["command"].endswith("--clients 3,20")
    assert [case["clients"] for case in report["cases"]] == [3, 20]
    for case in report["cases"]:
        rows = {row["label"]: row for row in case["rows"]}
        assert list(rows) == ["florist 0.9 stream", "florist 0.9 batched", "flexlora"]
        stream = rows["florist 0.9 stream"]
        assert stream["extrapolated_from_modules"] is None and stream["flops"] is None
        assert len(stream["download_bytes_per_client"]) == case["clients"]
        assert rows["florist 0.9 batched"]["extrapolated_from_modules"] == 2
    small, large = ({row["label"]: row for row in case["rows"]}["florist 0.9 stream"] for case in report["cases"])
    # 48 stacked columns fit every layer: exact, up to what fp32 Gram matrices cannot resolve at tau
    # 0.9; 320 do not fit v_proj's 192: folded, and what the folds cut is in the bound too.
    assert 0.0 <= small["error_bound"] < large["error_bound"]


def test_cli_refuses_bad_client_counts_and_a_plot_without_them(capsys, tmp_path):
    for value in ("0,8", "8,x"):
        with pytest.raises(SystemExit):
            main(["bench", "aggregate", "--clients", value])
    assert "--clients" in capsys.readouterr().err
    assert main(["bench", "aggregate", "--plot", str(tmp_path / "p.png")]) != 0
    assert "--plot needs --clients" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
