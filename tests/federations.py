"""The small federation every federation test builds on: three clients of ranks 2, 4, 8 on the
tiny model and a small slice of the embedded task."""

from __future__ import annotations

import json
from pathlib import Path

from florist.config import RunConfig, load_config

CLIENT_RANKS = [2, 4, 8]
ROUNDS = 2


def federation_config(model_dir: Path, run_dir: Path, method: str, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"model.name={json.dumps(str(model_dir))}",
            'model.autocast="none"',
            "data.examples_per_category=4",
            "data.test_per_category=1",
            "data.min_client_examples=2",
            f"federation.num_clients={len(CLIENT_RANKS)}",
            f"federation.ranks={CLIENT_RANKS}",
            f"federation.rounds={ROUNDS}",
            f"aggregation.method={json.dumps(method)}",
            "training.local_steps=2",
            "training.batch_size=4",
            "training.learning_rate=0.05",
            "evaluation.max_new_tokens=2",
            f"output.run_dir={json.dumps(str(run_dir))}",
            *extra,
        ],
    )
