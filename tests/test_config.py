"""Run configuration: TOML plus overrides, and every bad input refused in one line before training starts."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import flwr.simulation
import pytest
import tomli_w

from florist.cli import main
from florist.config import DEFAULT_CONFIG, RunConfig, load_config
from florist.data import generate_embedded
from florist.federation.datasets import federated_data
from florist.federation.settings import as_deployed, config_from_run_config
from florist.federation.simulation import prepare, run_federation


def one_line_error(call, *args) -> str:
    with pytest.raises(ValueError) as caught:
        call(*args)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


def test_default_config_is_the_packaged_toml():
    config = load_config()
    for section, values in tomllib.loads(DEFAULT_CONFIG.read_text()).items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"


def test_file_then_overrides_of_every_value_type(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[aggregation]\nmethod = "flora"\ntau = 0.5\n\n[federation]\nnum_clients = 2\nranks = [2, 4]\n')
    config = load_config(
        path,
        [
            "aggregation.tau=0.75",  # a number, over the file's
            "aggregation.method=fedit",  # a bare word is a string
            'model.name="some/model"',  # a quoted string
            "federation.ranks=[8]",  # a list
            "evaluation.every_round=true",
            "data.max_length = 64",  # spaces around '='
        ],
    )
    assert config.aggregation.tau == 0.75 and config.aggregation.method == "fedit"
    assert config.model.name == "some/model" and config.federation.ranks == [8] and config.federation.num_clients == 2
    assert config.evaluation.every_round is True and config.data.max_length == 64
    assert config.training == RunConfig().training  # untouched sections keep their defaults
    assert config.federation.rank_of(1) == 8 and config.federation.alpha_of(1) == 16.0


def test_flwr_run_config_reads_the_file_and_its_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[aggregation]\nmethod = "flora"\n')
    overrides = 'aggregation.tau=0.6; model.name="a b" ;evaluation.every_round=true; federation.ranks=[2, 4, 8, 8, 8, 8, 8, 8];'
    config = config_from_run_config({"config-file": str(path), "overrides": overrides, "resume": ""})
    assert config.aggregation.method == "flora" and config.aggregation.tau == 0.6
    assert config.model.name == "a b" and config.evaluation.every_round is True
    assert config.federation.ranks == [2, 4, 8, 8, 8, 8, 8, 8]
    assert config_from_run_config({}) == load_config()
    with pytest.raises(ValueError, match=r"--set aggregation.taux=1: aggregation.taux: no such configuration key"):
        config_from_run_config({"overrides": "aggregation.taux=1"})


def test_a_deployment_records_that_its_data_is_node_local_and_keeps_the_servers_held_out_examples(tmp_path):
    """A deployment's sites train on their own files: its recorded configuration says so instead
    of naming a source that was never split, and the server evaluates on what it did before."""
    embedded = load_config(None, ["data.test_per_category=2", "training.seed=3"])
    deployed = as_deployed(embedded)
    assert (deployed.data.source, deployed.data.test_source) == ("node-local", "embedded")
    split = federated_data(deployed)
    assert split.clients == [] and split.test == generate_embedded(2, 3, split="test")
    assert as_deployed(deployed) == deployed
    recorded = tmp_path / "config.toml"
    recorded.write_text(tomli_w.dumps(deployed.model_dump(exclude_none=True)))
    assert load_config(recorded) == deployed  # a resumed deployment reads it back

    directory = tmp_path / "sites"
    directory.mkdir()
    for name in ("client_0.json", "client_1.json", "test.json"):
        write_json(directory / name, [{"instruction": f"{name} q", "response": "a"}])
    given = as_deployed(load_config(None, [f"data.source={json.dumps(str(directory))}", 'data.partition="given"']))
    assert given.data.test_source == str(directory)
    assert [e.instruction for e in federated_data(given).test] == ["test.json q"]
    held_out = write_json(tmp_path / "held_out.json", [{"instruction": "h", "response": "a"}])
    named = as_deployed(load_config(None, [f"data.source={json.dumps(str(held_out))}", f"data.test_source={json.dumps(str(held_out))}"]))
    assert named.data.test_source == str(held_out)
    assert as_deployed(load_config(None, [f"data.source={json.dumps(str(held_out))}"])).data.test_source == ""


@pytest.mark.parametrize(
    "override, named",
    [
        ("federation.ranks=[0, 4, 4, 4, 4, 4, 4, 4]", ["federation.ranks", "0"]),
        ("federation.ranks=[4, 4]", ["federation.ranks", "2 values", "8 clients"]),
        ("aggregation.tau=0", ["aggregation.tau", "0"]),
        ("aggregation.tau=1.5", ["aggregation.tau", "1.5"]),
        ("aggregation.tau=high", ["aggregation.tau", "high"]),
        ("aggregation.method=fedavg", ["aggregation.method", "fedavg"]),
        ("aggregation.route=lanczos", ["aggregation.route", "lanczos"]),
        ("aggregation.memory_budget_mb=0", ["aggregation.memory_budget_mb", "0"]),
        ("aggregation.download_budget_mb=-1", ["aggregation.download_budget_mb", "-1"]),
        ("aggregation.budget_criterion=loss", ["aggregation.budget_criterion", "loss"]),
        ("aggregation.min_rank=0", ["aggregation.min_rank", "0"]),
        ("aggregation.memory_budget_mb=nan", ["aggregation.memory_budget_mb", "nan"]),
        ("aggregation.taus=0.5", ["aggregation.taus", "no such configuration key"]),
        ("nosuch.key=1", ["nosuch", "no such configuration key"]),
        ("data.template=llama", ["data.template", "llama"]),
        ("training.local_steps=0", ["training.local_steps", "0"]),
        ("tau=0.5", ["tau=0.5", "section.key=value"]),
        ("aggregation.tau", ["aggregation.tau", "section.key=value"]),
        ("a.b.c=1", ["a.b.c=1"]),
        ('model.lora_bias="some"', ["model.lora_bias", "some"]),
        ('model.modules_to_save=["q_proj"]', ["model.modules_to_save", "'q_proj' is also in model.target_modules"]),
        ('model.modules_to_save=["lm_head", "lm_head"]', ["model.modules_to_save", "'lm_head' is listed twice"]),
        ("federation.min_sites=0", ["federation.min_sites", "0"]),
        ("federation.min_sites=9", ["federation.min_sites 9 is above the 8 clients sampled per round"]),
        ("federation.min_clients=1", ["federation.min_clients 1 is below federation.min_sites 2"]),
    ],
)
def test_bad_values_and_keys_are_named_in_one_line(override, named):
    message = one_line_error(load_config, None, [override])
    for part in named:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (['aggregation.method="flora"'], ["federation.warm_start", "'flora'"]),
        (['aggregation.method="flexlora"'], ["federation.warm_start", "'flexlora'"]),
        (["wire.client_tau=0.9"], ["wire.client_tau", "federation.warm_start"]),
    ],
)
def test_a_warm_start_needs_florist_and_an_untruncated_upload(overrides, named):
    message = one_line_error(load_config, None, ["federation.warm_start=true", *overrides])
    for part in named:
        assert part in message, (part, message)
    config = load_config(None, ["federation.warm_start=true"])
    assert config.shared_settings()["federation.warm_start"] is True  # server and nodes must agree on it


def test_what_is_trained_in_full_is_a_setting_every_node_must_share():
    config = load_config(None, ['model.lora_bias="lora_only"', 'model.modules_to_save=["lm_head"]'])
    shared = config.shared_settings()
    assert shared["model.lora_bias"] == "lora_only" and shared["model.modules_to_save"] == ["lm_head"]
    assert load_config().model.lora_bias == "none" and load_config().model.modules_to_save == []


def test_bad_configuration_files_are_named(tmp_path):
    assert str(tmp_path / "missing.toml") in one_line_error(load_config, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[aggregation\ntau = 0.5\n")
    assert str(broken) in one_line_error(load_config, broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[aggregation]\ntua = 0.5\n")
    message = one_line_error(load_config, unknown)
    assert str(unknown) in message and "aggregation.tua" in message


# ---------------------------------------------------------------------------------------------
# Inputs only the run can check (model, data, run directory): refused by prepare, before Ray starts.


@pytest.fixture
def no_simulation(monkeypatch):
    """Fails the test if the simulation engine is reached."""

    def refuse(**_):
        raise AssertionError("the simulation started despite a bad input")

    monkeypatch.setattr(flwr.simulation, "run_simulation", refuse)


def small_run(tiny_model_dir: Path, tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(
        None,
        [
            f"model.name={json.dumps(str(tiny_model_dir))}",
            "data.examples_per_category=2",
            "data.min_client_examples=1",
            "federation.num_clients=2",
            "federation.ranks=[2]",
            f"output.run_dir={json.dumps(str(tmp_path / 'run'))}",
            *overrides,
        ],
    )


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_a_good_configuration_prepares(tiny_model_dir, tmp_path):
    config = small_run(tiny_model_dir, tmp_path, 'output.run_dir="' + str(tmp_path) + '/{method}-run"')
    assert prepare(config).output.run_dir == str(tmp_path / "florist-run")


@pytest.mark.parametrize(
    "case",
    ["not a model directory", "missing field", "more clients than examples",
     "no test split", "given without a directory", "non-empty run directory", "unreadable MMLU file", "tied modules_to_save",
     "a deployment's node-local data"],
)
def test_bad_run_inputs_are_refused_before_training(case, tiny_model_dir, tmp_path, no_simulation):
    examples = [{"instruction": f"q{k}", "response": f"a{k}"} for k in range(3)]
    three = write_json(tmp_path / "three.json", examples)
    (tmp_path / "run").mkdir()
    overrides, named = {
        "not a model directory": ([f"model.name={json.dumps(str(tmp_path))}"], str(tmp_path)),
        "missing field": (
            [f"data.source={json.dumps(str(write_json(tmp_path / 'partial.json', [*examples, {'instruction': 'q'}])))}"],
            "'response'",
        ),
        "more clients than examples": (
            [f'data.source="{three}"', f'data.test_source="{three}"', "federation.num_clients=4"],
            "4 clients",
        ),
        "no test split": ([f'data.source="{three}"'], str(three)),
        "given without a directory": ([f'data.source="{three}"', 'data.partition="given"'], str(three)),
        "non-empty run directory": ([], str(tmp_path / "run")),
        "unreadable MMLU file": ([f"evaluation.mmlu={json.dumps(str(tmp_path / 'mmlu.json'))}"], str(tmp_path / "mmlu.json")),
        "tied modules_to_save": (['model.modules_to_save=["lm_head"]'], "lm_head.weight is tied to model.embed_tokens.weight"),
        "a deployment's node-local data": (['data.source="node-local"'], "data.source 'node-local' is a deployment's"),
    }[case]
    (tmp_path / "mmlu.json").write_text("{not JSON")
    if case == "non-empty run directory":
        (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    config = small_run(tiny_model_dir, tmp_path, *overrides)
    assert named in one_line_error(run_federation, config)


def test_cli_reports_a_bad_value_in_one_line_and_exits_2(capsys, no_simulation):
    assert main(["run", "--set", "aggregation.tau=2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("florist: error: ")
    assert "aggregation.tau" in err and "(got 2)" in err


def test_cli_reports_a_bad_model_before_training(capsys, no_simulation, tmp_path):
    run_dir = json.dumps(str(tmp_path / "run"))
    assert main(["run", "--set", 'model.name="/nonexistent/model"', "--set", f"output.run_dir={run_dir}"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("florist: error: ") and "/nonexistent/model" in err
    assert not (tmp_path / "run").exists()


def test_a_download_budget_replaces_tau_and_is_florists_alone():
    """The wire's costs are the federation's to add (test_strategy.py); the configuration gives the budget."""
    config = load_config(None, ["aggregation.download_budget_mb=7.5", "aggregation.budget_criterion=per-byte"])
    options = config.aggregation.options()
    assert options == {"max_rank": None, "route": "gram", "memory_budget_mb": 1024.0, "download_budget_mb": 7.5, "budget_criterion": "per-byte", "min_rank": 1}
    assert load_config().aggregation.options()["tau"] == 0.9
    message = one_line_error(load_config, None, ["aggregation.download_budget_mb=7.5", "aggregation.tau=0.9"])
    assert "aggregation.tau (0.9) and aggregation.download_budget_mb (7.5) are both set; set one" in message
    message = one_line_error(load_config, None, ["aggregation.download_budget_mb=7.5", 'aggregation.method="flora"'])
    assert "aggregation.download_budget_mb chooses FLoRIST's ranks; method 'flora' has none" in message


def test_a_budgeted_configuration_as_a_run_directory_stores_it_loads_back(tmp_path):
    """config.toml holds the model dump; tau's default in it would clash with the budget on resume."""
    config = load_config(None, ["aggregation.download_budget_mb=2", 'aggregation.budget_criterion="absolute"'])
    stored = tmp_path / "config.toml"
    stored.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
    assert load_config(stored) == config
    assert "tau" not in tomllib.loads(stored.read_text())["aggregation"]
    assert load_config().model_dump()["aggregation"]["tau"] == 0.9


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("validation.norm_factor=1", "validation.norm_factor must be > 1, got 1.0"),
        ("validation.clip_factor=0.5", "validation.clip_factor must be in [1, validation.norm_factor = 10], got 0.5"),
        ("validation.clip_factor=12", "validation.clip_factor must be in [1, validation.norm_factor = 10], got 12.0"),
        ("validation.max_weight_share=0", "validation.max_weight_share"),
        ("validation.max_weight_share=1.5", "validation.max_weight_share"),
        ("validation.max_rank=32", "validation.max_rank 32 is below the largest configured client rank 64 (federation.ranks)"),
    ],
)
def test_server_limits_that_would_refuse_honest_clients_are_errors_before_the_run(override, expected):
    assert expected in one_line_error(load_config, None, [override])


def test_no_quorum_falls_below_min_sites():
    """Three sites, half of the sampled ones by default: 2 of 3, and 2 of 2 once a site is gone
    (half of 2 would be 1: one site's update sent back as the aggregate)."""
    three = RunConfig.model_validate({"federation": {"num_clients": 3, "ranks": [4]}}).federation
    assert [three.quorum(sampled) for sampled in (3, 2, 1)] == [2, 2, 2]
    strict = three.model_copy(update={"min_sites": 3})
    assert [strict.quorum(sampled) for sampled in (3, 2)] == [3, 3]
    lone = RunConfig.model_validate({"federation": {"num_clients": 3, "ranks": [4], "min_sites": 1}}).federation
    assert [lone.quorum(sampled) for sampled in (3, 2, 1)] == [2, 1, 1]
    many = RunConfig.model_validate({"federation": {"num_clients": 10, "ranks": [4], "min_fraction": 0.1}}).federation
    assert [many.quorum(sampled) for sampled in (10, 5, 2)] == [2, 2, 2]
