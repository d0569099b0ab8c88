"""How the ServerApp gets its RunConfig: from `florist run` directly, or from `flwr run`'s run config.

`flwr run` accepts only the run-config keys pyproject.toml declares, with bool, number or string
values. Three are declared: `config-file` (a TOML file on the server), `overrides` ("section.key=value"
items separated by ";", e.g. `overrides="aggregation.tau=0.8; federation.ranks=[4, 8]"`) and
`resume` (a run directory). Only the server reads them: a node takes the shared settings from each
instruction and its files from its own node config (federation/node_policy.py).
"""

from __future__ import annotations

from pathlib import Path

from florist.config import NODE_LOCAL, RunConfig, load_config

RESUME_KEY = "resume"
OVERRIDES_KEY = "overrides"


def config_from_run_config(run_config: dict) -> RunConfig:
    """`config-file` plus the `overrides` items."""
    overrides = [item.strip() for item in str(run_config.get(OVERRIDES_KEY, "")).split(";") if item.strip()]
    return load_config(run_config.get("config-file") or None, overrides)


def resume_from_run_config(run_config: dict) -> Path | None:
    value = run_config.get(RESUME_KEY)
    return Path(str(value)) if value else None


def as_deployed(config: RunConfig) -> RunConfig:
    """`config` as a deployment applies it, and as its run directory records it. Each site trains
    on the files its own node config names, never on a split of `data.source`, which reads
    "node-local"; the server's held-out examples, which the source's test split gave, are then
    named by `data.test_source` ("embedded": the embedded task's)."""
    data = config.data
    if data.source == NODE_LOCAL:
        return config
    test_source = data.test_source or (data.source if data.source == "embedded" or data.partition == "given" else "")
    return config.model_copy(update={"data": data.model_copy(update={"source": NODE_LOCAL, "test_source": test_source})})
