"""Local path or hub id: a mistyped local path is an error naming its key, raised with the configuration; only hub ids reach the hub."""

from __future__ import annotations

import json

import datasets
import flwr.simulation
import pytest

import florist.cli
from florist.config import load_config
from florist.data import load_examples
from florist.evaluation import mmlu
from florist.evaluation.mmlu import load_mmlu
from florist.federation.settings import config_from_run_config
from florist.sources import looks_like_path

SOURCE_KEYS = ("model.name", "data.source", "data.test_source", "evaluation.mmlu")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Fails the test if anything asks the hub for a dataset."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"went to the hub with {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize(
    "value",
    ["/tmp/mmlu_typo.json", "mmlu_typo.json", "train.JSONL", "data.parquet", "./clients", "../shared/data", "~/data",
     "a/b/c", "a//b", "a/../b", "C:\\data", ".hidden"],
)
def test_values_that_look_like_paths(value):
    assert looks_like_path(value)


@pytest.mark.parametrize("value", ["cais/mmlu", "databricks/databricks-dolly-15k", "HuggingFaceTB/SmolLM2-135M-Instruct", "embedded", "gpt2", "not an id"])
def test_hub_ids_and_other_names_without_a_separator_are_not_paths(value):
    assert not looks_like_path(value)


def test_namespace_slash_name_is_a_path_when_the_namespace_is_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("data/dolly")
    (tmp_path / "data").mkdir()
    assert looks_like_path("data/dolly")


@pytest.mark.parametrize("key", SOURCE_KEYS)
@pytest.mark.parametrize("value", ["/nonexistent/mmlu_typo.json", "typo.jsonl", "./missing_dir"])
def test_a_missing_local_source_is_refused_with_the_configuration(key, value):
    with pytest.raises(ValueError) as error:
        load_config(None, [f"{key}={json.dumps(value)}"])
    message = str(error.value)
    assert "\n" not in message and f"{key}: no such file or directory: {value}" in message
    assert message.startswith(f"--set {key}=")


@pytest.mark.parametrize("key", SOURCE_KEYS)
def test_an_existing_local_source_and_a_hub_id_pass(key, tmp_path):
    (tmp_path / "file.json").write_text("[]")
    for value in (str(tmp_path / "file.json"), "org/name"):
        assert load_config(None, [f"{key}={json.dumps(value)}"])


def test_a_finished_runs_configuration_reads_back_without_its_data(tmp_path):
    data = tmp_path / "clients.json"
    data.write_text("[]")
    stored = tmp_path / "config.toml"
    stored.write_text(f"[data]\nsource = {json.dumps(str(data))}\n")
    data.unlink()
    with pytest.raises(ValueError, match="data.source: no such file"):
        load_config(stored)
    assert load_config(stored, check_sources=False).data.source == str(data)


def test_cli_refuses_a_mistyped_mmlu_path_before_anything_starts(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(florist.cli, "SUBCOMMANDS", ("run",))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **_: pytest.fail("the simulation started"))
    run_dir = tmp_path / "run"
    argv = ["run", "--set", f"evaluation.mmlu={tmp_path / 'mmlu_typo.json'}", "--set", f"output.run_dir={json.dumps(str(run_dir))}"]
    assert florist.cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"evaluation.mmlu: no such file or directory: {tmp_path / 'mmlu_typo.json'}" in error
    assert not run_dir.exists()


# The loaders tell local from hub the same way, for callers that do not go through the configuration.


def test_load_examples_does_not_send_a_mistyped_local_directory_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="no such file or directory: data/dolly"):
        load_examples("data/dolly")


def test_load_mmlu_refuses_a_missing_file_and_a_directory(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_mmlu(str(tmp_path / "mmlu_typo.json"))
    with pytest.raises(ValueError, match="not a file"):
        load_mmlu(str(tmp_path))


def test_load_mmlu_reads_a_local_file(tmp_path):
    record = {"instruction": "", "input": "Question: 2+2? Options: A. 3, B. 4, C. 5, D. 6", "output": "The answer is: B. 4", "class": "math"}
    (tmp_path / "mmlu.json").write_text(json.dumps([record]))
    [question] = load_mmlu(str(tmp_path / "mmlu.json"))
    assert question.answer == 1 and question.choices[1] == "4"


def test_load_mmlu_sends_the_given_hub_id_to_the_hub(monkeypatch):
    asked = []
    row = {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: asked.append((args, kwargs)) or [row])
    [question] = load_mmlu("my-org/mmlu-mirror")
    assert asked == [(("my-org/mmlu-mirror", "all"), {"split": "test"})]
    assert question.subject == "math" and mmlu.LETTERS[question.answer] == "B"


def test_the_server_checks_the_sources_its_run_config_names():
    """Only the server reads the run config (a node takes the shared settings from each instruction):
    the MMLU file and test data it names must exist on the server."""
    run_config = {"overrides": 'evaluation.mmlu="/server/only/mmlu_1444.json"; data.test_source="/server/only/test.json"'}
    with pytest.raises(ValueError, match="no such file or directory: /server/only/"):
        config_from_run_config(run_config)
