"""A florist-secure round with the secure sum (privacy.secure_aggregation) against the same round
summed in the clear: wall time and bytes both ways, on the inline engine (every site in this process,
one after another), for the tests' federation (tests/federations.py: 3 sites of ranks 2, 4, 8, 2 local
steps, no evaluation here) on a model given by path: the tests' tiny Llama (tests/conftest.py
`tiny_model_dir`, saved by any pytest run that uses it) or SmolLM2-135M-Instruct's directory.

The round's time is the run directory's wall time to the end of round 1 less round 0's (the base
load); the bytes are metrics.jsonl's, which count every protocol message both ways.

    .venv/bin/python benchmarks/secure_round.py --model /tmp/tiny-llama --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from florist.config import load_config
from florist.federation.simulation import run_federation
from florist.reporting.run_directory import read_rounds

SETTINGS = [
    'aggregation.method="florist-secure"', "federation.num_clients=3", "federation.ranks=[2, 4, 8]", "federation.rounds=1",
    'federation.engine="inline"', "data.examples_per_category=4", "data.test_per_category=1", "data.min_client_examples=2",
    "training.local_steps=2", "training.batch_size=4", "training.learning_rate=0.05", "evaluation.server=false", 'model.autocast="none"',
]


def measure(model: Path, directory: Path, secure: bool) -> dict:
    run_dir = directory / ("secure" if secure else "clear")
    overrides = [f"model.name={json.dumps(str(model))}", f"privacy.secure_aggregation={str(secure).lower()}", f"output.run_dir={json.dumps(str(run_dir))}"]
    config = load_config(None, [*SETTINGS, *overrides])
    base, first = read_rounds(run_federation(config))
    return {
        "secure": secure,
        "round_seconds": first["wall_seconds"] - base["wall_seconds"],
        "down_bytes": first["communication"]["down_bytes"],
        "up_bytes": first["communication"]["up_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the model's directory")
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(arguments.repeats):
            for secure in (False, True):
                rows.append(measure(arguments.model, Path(directory) / str(repeat), secure))
    print(f"load average at end: {os.getloadavg()}")
    print("| summing | round s | down bytes | up bytes |\n|---|---|---|---|")
    for row in rows:
        print(f"| {'secure sum' if row['secure'] else 'clear'} | {row['round_seconds']:.1f} | {row['down_bytes']} | {row['up_bytes']} |")


if __name__ == "__main__":
    main()
