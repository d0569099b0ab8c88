"""A florist-secure round with the secure sum (privacy.secure_aggregation) against the same round
summed in the clear: wall time and bytes both ways, on the inline engine (every site in this process,
one after another), for the tests' federation (tests/federations.py: 3 sites of ranks 2, 4, 8, 2 local
steps, no evaluation here) on a model given by path: the tests' tiny Llama (tests/conftest.py
`tiny_model_dir`, saved by any pytest run that uses it) or SmolLM2-135M-Instruct's directory.

The round's time is the run directory's wall time to the end of round 1 less round 0's (the base
load); the bytes are metrics.jsonl's, which count every protocol message both ways.

With --evaluation it measures instead the sites' federated evaluation of the base model (round 0,
evaluation.federated, privacy.min_category_count 1): its evaluation seconds and bytes, the evaluation
sums masked by the secure sum against sent in the clear (whose replies' metrics no stage counts).

    .venv/bin/python benchmarks/secure_round.py --model /tmp/tiny-llama --repeats 3
    .venv/bin/python benchmarks/secure_round.py --model /tmp/tiny-llama --repeats 3 --evaluation
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


EVALUATION = ["evaluation.federated=true", "evaluation.base=true", "privacy.min_category_count=1"]


def measure(model: Path, directory: Path, secure: bool, evaluation: bool) -> dict:
    run_dir = directory / ("secure" if secure else "clear")
    overrides = [f"model.name={json.dumps(str(model))}", f"privacy.secure_aggregation={str(secure).lower()}", f"output.run_dir={json.dumps(str(run_dir))}"]
    config = load_config(None, [*SETTINGS, *(EVALUATION if evaluation else []), *overrides])
    base, first = read_rounds(run_federation(config))
    measured = base if evaluation else first
    return {
        "secure": secure,
        "seconds": base["evaluation_seconds"] if evaluation else first["wall_seconds"] - base["wall_seconds"],
        "down_bytes": measured["communication"]["down_bytes"],
        "up_bytes": measured["communication"]["up_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the model's directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--evaluation", action="store_true", help="measure the base model's federated evaluation, not a training round")
    arguments = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(arguments.repeats):
            for secure in (False, True):
                rows.append(measure(arguments.model, Path(directory) / str(repeat), secure, arguments.evaluation))
    print(f"load average at end: {os.getloadavg()}")
    print(f"| summing | {'evaluation' if arguments.evaluation else 'round'} s | down bytes | up bytes |\n|---|---|---|---|")
    for row in rows:
        print(f"| {'secure sum' if row['secure'] else 'clear'} | {row['seconds']:.1f} | {row['down_bytes']} | {row['up_bytes']} |")


if __name__ == "__main__":
    main()
