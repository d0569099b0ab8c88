"""A tampered checkpoint is refused with one line naming the file, before the resumed server
changes anything in the run directory; an untampered one resumes as before.

The checkpoints are real: a federation on the tiny model (the real server loop and ClientApp in
this process, local_grid.py) writes them, and each test tampers a copy on disk as anyone who can
write the run directory could: a byte changed, a file renamed, removed or replaced by a symbolic
link, state.json edited, or a tensor file rewritten with its digest recomputed, so that only the
checks of its values can catch it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from florist.config import RunConfig
from florist.federation.client_app import build_client_app
from florist.federation.server_app import serve
from florist.lora.adapters import read_adapter
from florist.reporting.run_directory import read_rounds

from federations import federation_config
from local_grid import LocalGrid, ServerCrash, crash_before_round

NODES = {101: 0, 202: 1, 303: 2}
SETTINGS = ["federation.round_timeout=30", "federation.connect_timeout=1", "evaluation.base=false"]


def config_for(model_dir: Path, run: Path, method: str, *extra: str) -> RunConfig:
    return federation_config(model_dir, run, method, *SETTINGS, *extra)


def grid_for(config: RunConfig) -> LocalGrid:
    return LocalGrid(build_client_app(config), {node: {"partition-id": p} for node, p in NODES.items()})


def finished_run(model_dir: Path, run: Path, method: str) -> Path:
    with pytest.MonkeyPatch.context() as monkeypatch:
        from flwr.supercore.task_identity import TaskIdentity

        threads = torch.get_num_threads()
        for key, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
            monkeypatch.setattr(TaskIdentity, key, value)
        config = config_for(model_dir, run, method)
        path = serve(config, grid_for(config))
        torch.set_num_threads(threads)
        return path


@pytest.fixture(scope="module")
def florist_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished two-round FLoRIST run: its checkpoint holds a chain of two updates."""
    return finished_run(tiny_model_dir, tmp_path_factory.mktemp("florist") / "run", "florist")


@pytest.fixture(scope="module")
def flexlora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished two-round FlexLoRA run: its checkpoint holds the current adapter and each partition's truncation."""
    return finished_run(tiny_model_dir, tmp_path_factory.mktemp("flexlora") / "run", "flexlora")


# -- tampering, as done on disk ------------------------------------------------------------------


def state_path(run: Path) -> Path:
    return run / "checkpoint" / "state.json"


def edit_state(run: Path, change: Callable[[dict], None]) -> None:
    record = json.loads(state_path(run).read_text())
    change(record)
    state_path(run).write_text(json.dumps(record, indent=1))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rewrite(run: Path, name: str, change: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> None:
    """Rewrite a checkpoint's tensor file with `change(tensors, metadata)` applied, and record the
    new file's sha256 in state.json, as a forger who knows the format would."""
    path = run / "checkpoint" / name
    with safe_open(path, framework="pt") as handle:
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    change(tensors, metadata)
    data = save(tensors, metadata=metadata)
    path.write_bytes(data)
    edit_state(run, lambda record: record["sha256"].update({name: sha256(data)}))


def first_module(run: Path, name: str) -> str:
    with safe_open(run / "checkpoint" / name, framework="pt") as handle:
        return next(iter(json.loads(handle.metadata()["scales"])))


def set_scale(value: float | str) -> Callable[[Path], str]:
    def tamper(run: Path) -> str:
        module = first_module(run, "update-0002.safetensors")

        def change(tensors, metadata):
            scales = json.loads(metadata["scales"])
            scales[module] = value
            metadata["scales"] = json.dumps(scales)

        rewrite(run, "update-0002.safetensors", change)
        return f"{run}/checkpoint/update-0002.safetensors: module {module}: scale {value!r} is not a finite non-zero number"

    return tamper


def set_value(factor: str, value: float) -> Callable[[Path], str]:
    def tamper(run: Path) -> str:
        module = first_module(run, "update-0002.safetensors")

        def change(tensors, metadata):
            tensors[f"{module}.{factor}"].view(-1)[-1] = value

        rewrite(run, "update-0002.safetensors", change)
        return f"{run}/checkpoint/update-0002.safetensors: module {module}: lora_{factor} holds NaN or Inf values"

    return tamper


def byte_changed(run: Path) -> str:
    path = run / "checkpoint" / "update-0001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the last tensor's values: still a well-formed file of other numbers
    path.write_bytes(bytes(data))
    return f"{path}: its sha256 is not the one state.json records (the file changed after it was written)"


def named(name_of: Callable[[Path], str]) -> Callable[[Path], str]:
    """files.chain[0] names `name_of(run)`: a faithful copy of update-0001 put there, with its digest."""

    def tamper(run: Path) -> str:
        name = name_of(run)
        target = run / "checkpoint" / name
        if not target.exists():
            shutil.copyfile(run / "checkpoint" / "update-0001.safetensors", target)

        def change(record):
            record["files"]["chain"][0] = name
            record["sha256"][name] = record["sha256"].pop("update-0001.safetensors")

        edit_state(run, change)
        return f"{state_path(run)}: files.chain[0] is {name!r}, expected 'update-0001.safetensors', a file of the checkpoint folder"

    return tamper


def swapped(run: Path) -> str:
    edit_state(run, lambda record: record["files"]["chain"].reverse())
    return f"{state_path(run)}: files.chain[0] is 'update-0002.safetensors', expected 'update-0001.safetensors', a file of the checkpoint folder"


def missing(run: Path) -> str:
    path = run / "checkpoint" / "update-0002.safetensors"
    path.unlink()
    return f"{path}: missing, though state.json names it"


def symlinked_file(run: Path) -> str:
    path = run / "checkpoint" / "update-0001.safetensors"
    outside = run.parent / "elsewhere.safetensors"
    path.rename(outside)
    path.symlink_to(outside)  # the same bytes, so the digest matches: only the link gives it away
    return f"{path}: is a symbolic link; a checkpoint's files must be its own"


def symlinked_folder(run: Path) -> str:
    folder = run / "checkpoint"
    outside = run.parent / "elsewhere"
    folder.rename(outside)
    folder.symlink_to(outside)
    return f"{folder}: is a symbolic link; a run's checkpoint folder must be its own"


def absurd_round(value, message: str) -> Callable[[Path], str]:
    def tamper(run: Path) -> str:
        edit_state(run, lambda record: record.update(round=value))
        return f"{state_path(run)}: {message}"

    return tamper


def forged_round(run: Path) -> str:
    """A third round claimed, its metrics record forged to match: the chain still holds two updates."""

    def change(record):
        record["round"] = 3
        record["metrics"].append({**record["metrics"][-1], "round": 3})

    edit_state(run, change)
    return (
        f"{state_path(run)}: round 3 with 2 chain updates, no current adapter and 0 truncations; "
        "this method keeps one chain update per round and nothing else"
    )


def wrong_shape(run: Path) -> str:
    module = first_module(run, "update-0001.safetensors")
    with safe_open(run / "checkpoint" / "update-0001.safetensors", framework="pt") as handle:
        m, rank = handle.get_slice(f"{module}.B").get_shape()
    rewrite(run, "update-0001.safetensors", lambda tensors, _: tensors.update({f"{module}.B": torch.zeros(m + 1, rank)}))
    return f"{run}/checkpoint/update-0001.safetensors: module {module}: lora_B is ({m + 1}, {rank}), expected ({m}, {rank}) by the server's model"


def float64(run: Path) -> str:
    module = first_module(run, "update-0001.safetensors")
    rewrite(run, "update-0001.safetensors", lambda tensors, _: tensors.update({f"{module}.A": tensors[f"{module}.A"].double()}))
    return f"{run}/checkpoint/update-0001.safetensors: module {module}: lora_A is torch.float64, expected torch.float32"


def unadapted_module(run: Path) -> str:
    def change(tensors, metadata):
        scales = json.loads(metadata["scales"])
        scales["lm_head"] = 1.0
        metadata["scales"] = json.dumps(scales)
        tensors["lm_head.A"], tensors["lm_head.B"] = torch.zeros(2, 64), torch.zeros(256, 2)

    rewrite(run, "update-0001.safetensors", change)
    return f"{run}/checkpoint/update-0001.safetensors: holds module 'lm_head', which the server's model does not adapt"


def untrained_tensor(run: Path) -> str:
    def change(tensors, metadata):
        metadata["dense"] = json.dumps(["model.norm.weight"])
        tensors["@dense:model.norm.weight"] = torch.ones(64)

    rewrite(run, "update-0001.safetensors", change)
    return f"{run}/checkpoint/update-0001.safetensors: holds tensor 'model.norm.weight', which the server's model does not train in full"


def unlisted_tensor(run: Path) -> str:
    module = first_module(run, "update-0001.safetensors")
    rewrite(run, "update-0001.safetensors", lambda tensors, _: tensors.pop(f"{module}.B"))
    return f"{run}/checkpoint/update-0001.safetensors: lacks tensor '{module}.B', unlike what its metadata lists"


def map_entry(key: str, entry: str, value, message: str) -> Callable[[Path], str]:
    def tamper(run: Path) -> str:
        edit_state(run, lambda record: record[key].update({entry: value}))
        return f"{state_path(run)}: {message}"

    return tamper


def metrics_entry(change: Callable[[dict], None], message: str) -> Callable[[Path], str]:
    """The last round's metrics record changed: the summary at the run's end would read it."""

    def tamper(run: Path) -> str:
        edit_state(run, lambda record: change(record["metrics"][-1]))
        return f"{state_path(run)}: metrics[2] {message}"

    return tamper


def without_digest(run: Path) -> str:
    edit_state(run, lambda record: record["sha256"].pop("update-0002.safetensors"))
    return f"{state_path(run)}: files.chain[1] 'update-0002.safetensors' has no sha256"


def old_format(run: Path) -> str:
    def change(record):
        record["format"] = 1
        del record["sha256"]

    edit_state(run, change)
    return (
        f"{state_path(run)}: checkpoint format 1 records no file digests and cannot be verified; resume it with the "
        "florist that wrote it, or start the run again"
    )


FLORIST_TAMPERING = {
    "byte-changed": byte_changed,
    "escaping-path": named(lambda run: "../outside.safetensors"),
    "absolute-path": named(lambda run: str(run / "outside.safetensors")),
    "renamed": named(lambda run: "update-0009.safetensors"),
    "swapped": swapped,
    "missing-file": missing,
    "symlinked-file": symlinked_file,
    "symlinked-folder": symlinked_folder,
    "nan-resealed": set_value("A", math.nan),
    "inf-resealed": set_value("B", math.inf),
    "wrong-shape": wrong_shape,
    "float64": float64,
    "unadapted-module": unadapted_module,
    "untrained-tensor": untrained_tensor,
    "unlisted-tensor": unlisted_tensor,
    "zero-scale": set_scale(0.0),
    "inf-scale": set_scale(math.inf),
    "nan-scale": set_scale(math.nan),
    "string-scale": set_scale("2.0"),
    "absurd-round": absurd_round(1_000_000, "round 1000000, but metrics hold the records of rounds [0, 1, 2]"),
    "huge-round": absurd_round(10**30, f"round {10**30}, but metrics hold the records of rounds [0, 1, 2]"),
    "negative-round": absurd_round(-1, "round is -1, not an integer >= 0"),
    "string-round": absurd_round("2", "round is '2', not an integer"),
    "forged-round": forged_round,
    "partition-not-integer": map_entry("partition_of", "101", "0", "partition_of[101] is '0', not an integer"),
    "partition-bool": map_entry("partition_of", "101", True, "partition_of[101] is True, not an integer"),
    "partition-negative": map_entry("partition_of", "101", -2, "partition_of[101] is -2, not an integer >= 0"),
    "node-not-an-id": map_entry("partition_of", "node-7", 0, "partition_of has the key 'node-7', not an integer >= 0"),
    "partition-bound-twice": map_entry(
        "partition_of", "999", 0, "partition_of binds partition 0 to nodes 101 and 999; a partition has one node"
    ),
    "metrics-bytes-as-text": metrics_entry(
        lambda m: m["communication"].update(down_bytes="12"), "communication.down_bytes: input should be a valid integer"
    ),
    "metrics-without-communication": metrics_entry(lambda m: m.pop("communication"), "communication: field required"),
    "metrics-evaluation-list": metrics_entry(lambda m: m.update(evaluation=[1.0]), "evaluation: input should be a valid dictionary"),
    "metrics-loss-as-text": metrics_entry(
        lambda m: m["clients"][0].update(train_loss="0.5"), "clients.0.train_loss: input should be a valid number"
    ),
    "confirmed-beyond-chain": map_entry("confirmed", "101", 3, "confirmed[101] is 3, beyond the chain's 2 updates"),
    "without-digest": without_digest,
    "old-format": old_format,
}


def files_of(run: Path) -> dict[str, bytes | str]:
    """Every file in the run directory, a symbolic link as where it points: what a refused resume must leave as it was."""
    files: dict[str, bytes | str] = {}
    for folder, folders, names in os.walk(run):
        for name in names + [f for f in folders if Path(folder, f).is_symlink()]:
            path = Path(folder, name)
            files[str(path.relative_to(run))] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes()
    return files


def assert_refused(config: RunConfig, run: Path, message: str) -> None:
    before = files_of(run)
    with pytest.raises(ValueError) as refusal:
        serve(config, grid_for(config), resume=run)
    assert str(refusal.value) == message
    assert "\n" not in message
    assert files_of(run) == before


@pytest.mark.parametrize("tamper", list(FLORIST_TAMPERING.values()), ids=list(FLORIST_TAMPERING))
def test_a_tampered_florist_checkpoint_is_refused_naming_the_file_before_anything_changes(
    florist_run, tiny_model_dir, tmp_path, server_task, tamper
):
    run = Path(shutil.copytree(florist_run, tmp_path / "run"))
    assert_refused(config_for(tiny_model_dir, run, "florist"), run, tamper(run))


def rewrite_scale_of(name: Callable[[dict], str], value: float) -> Callable[[Path], str]:
    def tamper(run: Path) -> str:
        file = name(json.loads(state_path(run).read_text())["files"])
        module = first_module(run, file)

        def change(tensors, metadata):
            metadata["scales"] = json.dumps({**json.loads(metadata["scales"]), module: value})

        rewrite(run, file, change)
        return f"{run}/checkpoint/{file}: module {module}: scale {value!r} is not a finite non-zero number"

    return tamper


def nan_in_truncation(run: Path) -> str:
    module = first_module(run, "truncation-round2-client1.safetensors")

    def change(tensors, metadata):
        tensors[f"{module}.B"].view(-1)[0] = math.nan

    rewrite(run, "truncation-round2-client1.safetensors", change)
    return f"{run}/checkpoint/truncation-round2-client1.safetensors: module {module}: lora_B holds NaN or Inf values"


def dense_in_truncation(run: Path) -> str:
    def change(tensors, metadata):
        metadata["dense"] = json.dumps(["lm_head.weight"])
        tensors["@dense:lm_head.weight"] = torch.zeros(256, 64)

    rewrite(run, "truncation-round2-client0.safetensors", change)
    return f"{run}/checkpoint/truncation-round2-client0.safetensors: holds tensor 'lm_head.weight', which the server's model does not train in full"


def current_dropped(run: Path) -> str:
    def change(record):
        record["sha256"].pop(record["files"]["current"])
        record["files"]["current"] = None

    edit_state(run, change)
    return (
        f"{state_path(run)}: round 2 with 0 chain updates and no current adapter; "
        "this method keeps no chain, and a current adapter from round 1 on"
    )


def truncation_renamed(run: Path) -> str:
    def change(record):
        record["files"]["truncations"]["2"] = record["files"]["truncations"].pop("1")

    edit_state(run, change)
    return (
        f"{state_path(run)}: files.truncations[2] is 'truncation-round2-client1.safetensors', "
        "expected 'truncation-round2-client2.safetensors', a file of the checkpoint folder"
    )


FLEXLORA_TAMPERING = {
    "current-scale": rewrite_scale_of(lambda files: files["current"], 0.0),
    "truncation-scale": rewrite_scale_of(lambda files: files["truncations"]["0"], math.inf),
    "truncation-nan": nan_in_truncation,
    "truncation-dense": dense_in_truncation,
    "truncation-renamed": truncation_renamed,
    "current-dropped": current_dropped,
}


@pytest.mark.parametrize("tamper", list(FLEXLORA_TAMPERING.values()), ids=list(FLEXLORA_TAMPERING))
def test_a_tampered_flexlora_checkpoint_is_refused_naming_the_file_before_anything_changes(
    flexlora_run, tiny_model_dir, tmp_path, server_task, tamper
):
    run = Path(shutil.copytree(flexlora_run, tmp_path / "run"))
    assert_refused(config_for(tiny_model_dir, run, "flexlora"), run, tamper(run))


def test_an_untampered_copy_of_either_checkpoint_resumes(florist_run, flexlora_run, tiny_model_dir, tmp_path, server_task):
    """What the tampering tests change is all that gets them refused."""
    for method, finished in (("florist", florist_run), ("flexlora", flexlora_run)):
        run = Path(shutil.copytree(finished, tmp_path / method))
        config = config_for(tiny_model_dir, run, method)
        assert serve(config, grid_for(config), resume=run) == run
        assert read_rounds(run) == read_rounds(finished)


def test_partitions_stay_bound_to_their_nodes_after_a_resume(florist_run, tiny_model_dir, tmp_path, server_task):
    """The checkpoint keeps which node delivered each partition: resumed, a new node claiming partition 0
    is refused and the round goes on without it. An engine that gives its nodes new ids at every
    start (Flower's simulation) resumes with the partitions bound afresh."""
    assert json.loads(state_path(florist_run).read_text())["partition_of"] == {str(node): p for node, p in NODES.items()}
    run = Path(shutil.copytree(florist_run, tmp_path / "run"))
    config = config_for(tiny_model_dir, run, "florist", "federation.rounds=3")
    intruder = {404: 0, 202: 1, 303: 2}
    grid = LocalGrid(build_client_app(config), {node: {"partition-id": p} for node, p in intruder.items()})
    serve(config, grid, resume=run)
    record = read_rounds(run)[3]
    [event] = [e for e in record["events"] if e["node"] == 404]
    assert (event["status"], event["reason"]) == ("refused", "partition-id 0 is bound to node 101, which first delivered it")
    assert [c["node"] for c in record["clients"]] == [202, 303]

    run = Path(shutil.copytree(florist_run, tmp_path / "fresh"))
    fresh = {505: 0, 606: 1, 707: 2}
    grid = LocalGrid(build_client_app(config), {node: {"partition-id": p} for node, p in fresh.items()})
    serve(config_for(tiny_model_dir, run, "florist", "federation.rounds=3"), grid, resume=run, fresh_node_ids=True)
    assert [c["node"] for c in read_rounds(run)[3]["clients"]] == [505, 606, 707]
    assert json.loads(state_path(run).read_text())["partition_of"] == {str(node): p for node, p in fresh.items()}


def test_a_flexlora_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(flexlora_run, tiny_model_dir, tmp_path, server_task):
    """The current adapter and each partition's truncation come back from the checkpoint as they were written."""
    config = config_for(tiny_model_dir, tmp_path / "crashed", "flexlora")
    grid = grid_for(config)
    grid.before_push = crash_before_round(2)
    with pytest.raises(ServerCrash):
        serve(config, grid)
    assert sorted(os.listdir(tmp_path / "crashed" / "checkpoint")) == [
        "global-round1.safetensors",
        "state.json",
        *[f"truncation-round1-client{p}.safetensors" for p in range(3)],
    ]
    resumed = serve(config, grid_for(config), resume=tmp_path / "crashed")
    ours, theirs = read_rounds(resumed), read_rounds(flexlora_run)
    assert [r["evaluation"] for r in ours] == [r["evaluation"] for r in theirs]
    assert [[c["train_loss"] for c in r.get("clients", [])] for r in ours] == [[c["train_loss"] for c in r.get("clients", [])] for r in theirs]
    _, final = read_adapter(resumed / "final" / "adapter")
    _, reference = read_adapter(flexlora_run / "final" / "adapter")
    for name, module in reference.modules.items():
        assert torch.equal(final.modules[name].A, module.A) and torch.equal(final.modules[name].B, module.B), name


def test_an_update_file_a_dead_server_left_behind_is_written_again(florist_run, tiny_model_dir, tmp_path, server_task):
    """A server that died after writing round 3's update but before its state.json left that file;
    the resumed server's own round 3 update replaces it, and its checkpoint verifies."""
    run = Path(shutil.copytree(florist_run, tmp_path / "run"))
    left = run / "checkpoint" / "update-0003.safetensors"
    shutil.copyfile(run / "checkpoint" / "update-0001.safetensors", left)
    config = config_for(tiny_model_dir, run, "florist", "federation.rounds=3")
    serve(config, grid_for(config), resume=run)
    assert left.read_bytes() != (run / "checkpoint" / "update-0001.safetensors").read_bytes()
    assert json.loads(state_path(run).read_text())["sha256"]["update-0003.safetensors"] == sha256(left.read_bytes())
    serve(config, grid_for(config), resume=run)  # the checkpoint it wrote is accepted
    assert [r["round"] for r in read_rounds(run)] == [0, 1, 2, 3]
