"""How the Flower apps get their RunConfig: from `florist run` directly, or from `flwr run`'s run config."""

from __future__ import annotations

import json
from pathlib import Path

from florist.config import RunConfig, load_config

RESUME_KEY = "resume"
"""Run-config key naming a run directory to continue (`flwr run ... --run-config 'resume="runs/x"'`)."""


def config_from_run_config(run_config: dict, *, check_sources: bool = True) -> RunConfig:
    """`config-file` names the TOML file; any `section.key` entry overrides it (flwr run --run-config).

    `check_sources=False` on a node: the server checks the sources it reads (test data, MMLU),
    which need not exist on a node's machine; a node reads its own data from its node config."""
    overrides = [
        f"{key}={json.dumps(value) if isinstance(value, (str, bool)) else value}"
        for key, value in run_config.items()
        if "." in key
    ]
    return load_config(run_config.get("config-file") or None, overrides, check_sources=check_sources)


def resume_from_run_config(run_config: dict) -> Path | None:
    value = run_config.get(RESUME_KEY)
    return Path(str(value)) if value else None
