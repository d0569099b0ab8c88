"""How the Flower apps get their RunConfig: from `florist run` directly, or from `flwr run`'s run config."""

from __future__ import annotations

import json

from florist.config import RunConfig, load_config


def config_from_run_config(run_config: dict) -> RunConfig:
    """`config-file` names the TOML file; any `section.key` entry overrides it (flwr run --run-config)."""
    overrides = [
        f"{key}={json.dumps(value) if isinstance(value, (str, bool)) else value}"
        for key, value in run_config.items()
        if "." in key
    ]
    return load_config(run_config.get("config-file") or None, overrides)
