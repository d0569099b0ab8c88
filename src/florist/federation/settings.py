"""How the ServerApp gets its RunConfig: from `florist run` directly, or from `flwr run`'s run config.

`flwr run` accepts only the run-config keys pyproject.toml declares, with bool, number or string
values. Three are declared: `config-file` (a TOML file on the server), `overrides` ("section.key=value"
items separated by ";", e.g. `overrides="aggregation.tau=0.8; federation.ranks=[4, 8]"`) and
`resume` (a run directory). Only the server reads them: a node takes the shared settings from each
instruction and its files from its own node config (federation/node_policy.py).
"""

from __future__ import annotations

from pathlib import Path

from florist.config import RunConfig, load_config

RESUME_KEY = "resume"
OVERRIDES_KEY = "overrides"


def config_from_run_config(run_config: dict) -> RunConfig:
    """`config-file` plus the `overrides` items."""
    overrides = [item.strip() for item in str(run_config.get(OVERRIDES_KEY, "")).split(";") if item.strip()]
    return load_config(run_config.get("config-file") or None, overrides)


def resume_from_run_config(run_config: dict) -> Path | None:
    value = run_config.get(RESUME_KEY)
    return Path(str(value)) if value else None
