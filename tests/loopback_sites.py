"""The three sites the deployment tests start on loopback: their node configs and data files, the
code of the sites that misbehave, and waiting on a run's records."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import tomli_w

from deployment import Deployment, recorded_rounds, wait_until
from federations import CLIENT_RANKS, federation_config
from florist.config import RunConfig

SITES = len(CLIENT_RANKS)
RUN_TIMEOUT_SECONDS = 600


def site_config(site: int, site_data: Path, model_dir: Path, **policy) -> dict:
    """A site's --node-config: its data, the base model it pins, and the threads a simulated client
    gets (the engines then compute alike); `policy`, further node-config keys."""
    threads = max(1, len(os.sched_getaffinity(0)) // federation_config(model_dir, Path("unused"), "florist").federation.parallel_clients)
    return {"partition-id": site, "data": str(site_data / f"client_{site}.json"), "model": str(model_dir), "threads": threads, **policy}


def write_config(config: RunConfig, path: Path) -> Path:
    path.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
    return path


def write_examples(path: Path, examples: list) -> None:
    path.write_text(json.dumps([dataclasses.asdict(example) for example in examples]))


SITE_CODE = Path(__file__).parent / "sites"
"""Code of sites that misbehave (each folder's sitecustomize.py), and what they share."""
DYING_SITE = SITE_CODE / "dying"


def wait_for_records(deployment: Deployment, run_id: int, run_dir: Path, records: int) -> None:
    """Until the run directory holds `records` round records; fails at once, with the server's log,
    if the run ends first."""

    def recorded() -> bool:
        if recorded_rounds(run_dir) >= records:
            return True
        if deployment.status(run_id).startswith("finished"):
            raise AssertionError(f"run ended before record {records}:\n{deployment.log(run_id)[-4000:]}")
        return False

    # Each flwr command costs ~1.5 s of CPU: ask every 5 s.
    wait_until(recorded, RUN_TIMEOUT_SECONDS, f"{records} round records", interval=5.0)
