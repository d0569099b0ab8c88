"""How the Flower apps get their RunConfig: from `florist run` directly, or from `flwr run`'s run config."""

from __future__ import annotations

import json
from pathlib import Path

from florist.config import RunConfig, load_config

RESUME_KEY = "resume"
"""Run-config key naming a run directory to continue (`flwr run ... --run-config 'resume="runs/x"'`)."""


def config_from_run_config(run_config: dict) -> RunConfig:
    """`config-file` names the TOML file; any `section.key` entry overrides it (flwr run --run-config)."""
    overrides = [
        f"{key}={json.dumps(value) if isinstance(value, (str, bool)) else value}"
        for key, value in run_config.items()
        if "." in key
    ]
    return load_config(run_config.get("config-file") or None, overrides)


def resume_from_run_config(run_config: dict) -> Path | None:
    value = run_config.get(RESUME_KEY)
    return Path(str(value)) if value else None
