"""`florist run` on one machine: Flower's simulation engine, or the inline engine, no SuperLink left behind."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig

from florist.config import NODE_LOCAL, RunConfig, load_config
from florist.evaluation.mmlu import load_mmlu
from florist.federation.checkpoint import check_resumable
from florist.federation.client_app import build_client_app
from florist.federation.datasets import federated_data
from florist.federation.inline import InlineGrid, simulated_nodes
from florist.federation.server_app import build_server_app, serve
from florist.federation.server_model import trained_in_full
from florist.models import best_device, resolve_model
from florist.quantization import unsupported
from florist.reporting.run_directory import RunDirectory


def prepare(config: RunConfig, resume: Path | None = None) -> RunConfig:
    """Check everything that can be checked before training starts, and fix the run directory's name.

    Resolving the model also makes the de-quantised copy of the embedded one, so that every
    worker then loads it in seconds.
    """
    if config.data.source == NODE_LOCAL:
        raise ValueError(
            f"data.source {NODE_LOCAL!r} is a deployment's, whose sites train on their own files; florist run needs data to split among its clients"
        )
    if config.data.partition == "given" and not Path(config.data.source).is_dir():
        raise ValueError(f"data.partition 'given' needs a directory of client files, got data.source {config.data.source!r}")
    reason = unsupported(config.model.quantization, str(best_device()))
    if reason:
        raise ValueError(f"model.quantization {config.model.quantization!r}: {reason}")
    model_config = AutoConfig.from_pretrained(resolve_model(config.model.name))
    trained_in_full(config.model, model_config)
    data = federated_data(config)
    if config.evaluation.server and not data.test:
        raise ValueError(f"data source {config.data.source!r} has no test split; set data.test_source")
    if config.evaluation.server and config.evaluation.mmlu:
        load_mmlu(config.evaluation.mmlu)
    if resume is not None:
        check_resumable(resume, config)
        run_dir = str(resume)
    else:
        run_dir = str(RunDirectory.create(config).path)
    return config.model_copy(update={"output": config.output.model_copy(update={"run_dir": run_dir})})


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The configuration a resumed run continues with: the run's own, plus overrides of the
    settings that may change (more rounds, other timeouts, evaluation)."""
    if not (run_dir / "config.toml").is_file():
        raise ValueError(f"cannot resume {run_dir}: it is not a run directory (no config.toml)")
    return load_config(run_dir / "config.toml", overrides)


QUIET_ENVIRONMENT = {
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
"""Third-party noise the workers inherit: deprecation notices, weight-loading progress bars, Ray tips."""


def quiet_third_parties() -> None:
    """Hide third-party deprecation and FutureWarning noise here and in the workers started after."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    # Flower announces run_simulation's deprecation as a warning; its errors still show.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def run_federation(config: RunConfig, resume: Path | None = None, verbose: bool = False) -> Path:
    """Run the whole federation in simulation (continuing `resume`, a run directory); returns the
    run directory. Without `verbose`, the workers' own output and third-party notices are hidden:
    the server prints a line per client reply and a table per round."""
    config = prepare(config, resume)
    if verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    else:
        quiet_third_parties()
    if config.federation.engine == "inline":
        nodes = simulated_nodes(config.federation.num_clients)
        return serve(config, InlineGrid(build_client_app(config), nodes), resume)
    # Imported here: flwr.simulation pulls in Ray, which a plain `florist aggregate` does not need.
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray starts workers at niceness 15; the clients' training is the work here, not background.
    os.environ.setdefault("RAY_worker_niceness", "0")
    workers = config.federation.parallel_clients
    # Ray hides the GPU from actors that ask for none: share it between the workers instead.
    gpus = 1.0 / workers if torch.cuda.is_available() else 0.0
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        run_simulation(
            # Flower's simulation draws its nodes' ids at every start: a resumed run binds partitions afresh.
            server_app=build_server_app(config, resume, fresh_node_ids=True),
            client_app=build_client_app(config),
            num_supernodes=config.federation.num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": gpus},
                "init_args": {
                    "num_cpus": workers,
                    "num_gpus": 1 if gpus else 0,
                    "include_dashboard": False,
                    "logging_level": "ERROR",
                    "log_to_driver": verbose,
                },
            },
        )
    run_dir = Path(config.output.run_dir)
    if not (run_dir / "summary.json").exists():
        partial = f" and {run_dir}" if run_dir.exists() else ""
        raise RuntimeError(f"the federation stopped before finishing; see the log above{partial}")
    return run_dir
