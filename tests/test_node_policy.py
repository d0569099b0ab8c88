"""A site's own policy: decoded from its node config, and a hostile server refused in one line.

The ClientApp tests play a SuperNode (`build_client_app()` with no configuration, as `flwr run`
starts it) and a server that sends what Flower would deliver: a path of its choosing, a rank or a
sequence length far beyond the caps, an embedding trained in full, a model the node did not pin.
Every refusal must come back as the reply's one-line error naming the key, before the node opens
any file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from transformers import AutoModelForCausalLM

from florist.config import RunConfig, from_shared_settings, load_config
from florist.data import Example
from florist.federation import node, workspace
from florist.federation.client_app import build_client_app
from florist.federation.identity import identity_of, settings_fingerprint
from florist.federation.messages import CONFIG, IDENTITY, METRICS, TRAINED, EVALUATED, Instruction, instruction_content
from florist.federation.node_config import Refused
from florist.federation.node_policy import DEFAULT_CAPS, NodePolicy, message_bytes, node_policy

from federations import federation_config

pytestmark = pytest.mark.usefixtures("server_task")

# -- what the node opens --------------------------------------------------------------------------

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace")).resolve()))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only while a test asks


@pytest.fixture
def opened(monkeypatch):
    """Every file opened while the test runs, with the node's caches emptied first (a cached model or
    data set would hide a read)."""
    global _opened
    monkeypatch.setattr(workspace, "_current", None)
    node._node_data.cache_clear()
    _opened = []
    yield _opened
    _opened = None


def opened_under(paths: list[str], directory: Path) -> list[str]:
    root = str(directory.resolve())
    return [path for path in paths if path.startswith(root)]


# -- a site and its server --------------------------------------------------------------------------


def write_examples(path: Path, categories: dict[str, int]) -> Path:
    examples = [
        {"instruction": f"name {category} item {i}", "response": f"{category}{i}", "category": category}
        for category, count in categories.items()
        for i in range(count)
    ]
    path.write_text(json.dumps(examples))
    return path


@pytest.fixture
def site(tmp_path, tiny_model_dir) -> dict:
    """A SuperNode's node config: its data and test data, its model pinned by path."""
    directory = tmp_path / "site"
    directory.mkdir()
    return {
        "partition-id": 1,
        "data": str(write_examples(directory / "train.json", {"capital": 6, "colour": 6})),
        "test-data": str(write_examples(directory / "test.json", {"capital": 10, "colour": 3})),
        "model": str(tiny_model_dir),
        "threads": 1,
    }


@pytest.fixture
def decoys(tmp_path) -> dict[str, Path]:
    """Files a hostile server names, on the node's machine: a configuration, data, a model directory."""
    directory = tmp_path / "decoys"
    directory.mkdir()
    (directory / "model").mkdir()
    (directory / "model" / "config.json").write_text("{}")
    config = directory / "federation.toml"
    config.write_text('[data]\nsource = "%s"\n' % (directory / "secret.json"))
    return {
        "config-file": config,
        "data": write_examples(directory / "secret.json", {"secret": 12}),
        "model": directory / "model",
    }


@pytest.fixture
def config(tiny_model_dir, tmp_path) -> RunConfig:
    return federation_config(tiny_model_dir, tmp_path / "run", "florist")


@pytest.fixture(scope="module")
def base_digest(tiny_model_dir) -> str:
    return identity_of(RunConfig(), AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)).model_digest


def server_message(settings: dict, digest: str, kind: str = MessageType.TRAIN, chain: list[str] = ()) -> Message:
    """What a server sends: `settings`, fingerprinted as the server would, whatever they hold."""
    instruction = Instruction(1, list(chain), settings_fingerprint(settings), digest, settings)
    return Message(instruction_content(instruction), dst_node_id=21, message_type=kind)


def supernode_context(node_config: dict, decoys: dict[str, Path]) -> Context:
    """A SuperNode's context; its run config is the one `flwr run` passes, naming the decoys."""
    run_config = {"config-file": str(decoys["config-file"]), "overrides": f'data.source="{decoys["data"]}"'}
    return Context(run_id=7, node_id=21, node_config=node_config, state=RecordDict(), run_config=run_config)


def refusal(reply: Message) -> str:
    assert reply.has_error(), "the node did not refuse"
    reason = reply.error.reason
    assert "\n" not in reason and len(reason) <= 400, reason
    return reason


# -- decoding the node config -----------------------------------------------------------------------


def test_a_node_config_with_only_its_partition_and_data_gets_the_safe_defaults(site):
    policy = NodePolicy.from_node_config({"partition-id": 0, "data": site["data"]})
    assert policy.caps == DEFAULT_CAPS
    assert policy.model == "smollm2-135m-instruct" and policy.model_digest is None
    assert policy.lora_bias == "none" and policy.modules_to_save == () and policy.min_category_examples == 10
    assert not policy.in_process


def test_every_cap_and_permission_is_read_from_the_node_config(site, tmp_path):
    policy = NodePolicy.from_node_config(
        site
        | {
            "max-rank": 8, "max-length": 256, "max-local-steps": 3, "max-batch-size": 4, "max-new-tokens": 16,
            "max-chain-length": 7, "max-message-mb": 2.5, "lora-bias": "lora_only", "modules-to-save": "lm_head, score",
            "min-category-examples": 3, "model-digest": "0123456789abcdef",
        }
    )
    assert (policy.caps.rank, policy.caps.max_length, policy.caps.local_steps, policy.caps.batch_size) == (8, 256, 3, 4)
    assert (policy.caps.new_tokens, policy.caps.chain_length, policy.caps.message_mb) == (16, 7, 2.5)
    assert policy.lora_bias == "lora_only" and policy.modules_to_save == ("lm_head", "score")
    assert policy.min_category_examples == 3 and policy.model_digest == "0123456789abcdef"
    assert policy.model == str(Path(site["model"]).resolve())


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"data": "/nonexistent/site/train.jsonl"}, "node config data: no such file or directory"),
        ({"test-data": "/nonexistent/site/test.jsonl"}, "node config test-data: no such file or directory"),
        ({"model": "/nonexistent/site/model"}, "node config model: no such model directory"),
        ({"rank": "0"}, "node config rank='0' must be an integer >= 1"),
        ({"max-rank": 2.5}, "node config max-rank=2.5 must be an integer >= 1"),
        ({"max-length": True}, "node config max-length=True must be an integer >= 1"),
        ({"max-message-mb": float("inf")}, "node config max-message-mb=inf must be a finite number > 0"),
        ({"lora-bias": "some"}, "node config lora-bias='some' must be one of none, lora_only, all"),
        ({"modules-to-save": 3}, "node config modules-to-save=3 must be a string"),
        ({"model-digest": "ABC"}, "node config model-digest='ABC' must be 16 lowercase hex digits"),
        ({"colour": "red"}, "node config key 'colour' is unknown"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "node config device="),
    ],
)
def test_a_bad_node_config_is_one_line_naming_the_key_and_never_the_path(site, entry, expected):
    with pytest.raises(Refused) as refused:
        NodePolicy.from_node_config(site | entry)
    message = str(refused.value)
    assert message.startswith(expected) and "\n" not in message
    assert "/nonexistent" not in message


def test_an_empty_data_file_is_refused(site, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Refused, match="^node config data: the file or directory is empty$"):
        NodePolicy.from_node_config(site | {"data": str(empty)})


def test_the_policy_is_decoded_once_per_node_config(site):
    assert node_policy(site) is node_policy(dict(reversed(list(site.items()))))
    assert node_policy(site | {"max-rank": 4}) is not node_policy(site)


# -- what a run may ask -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_config", "override", "refusal"),
    [
        ({"rank": 65}, "", "node config max-rank=64: the run asks for rank (its node config's rank) 65"),
        ({}, "federation.ranks=[2, 65, 8]", "node config max-rank=64: the run asks for rank (federation.ranks) 65"),
        ({}, "data.max_length=1025", "node config max-length=1024: the run asks for data.max_length 1025"),
        ({}, "training.local_steps=501", "node config max-local-steps=500: the run asks for training.local_steps 501"),
        ({}, "training.batch_size=65", "node config max-batch-size=64: the run asks for training.batch_size 65"),
        ({}, "evaluation.batch_size=65", "node config max-batch-size=64: the run asks for evaluation.batch_size 65"),
        ({}, "evaluation.max_new_tokens=257", "node config max-new-tokens=256: the run asks for evaluation.max_new_tokens 257"),
        ({"max-length": 100}, "data.max_length=101", "node config max-length=100: the run asks for data.max_length 101"),
    ],
)
def test_a_run_one_above_a_cap_is_refused_naming_the_cap_and_the_setting_and_one_at_it_is_admitted(
    site, tiny_model_dir, tmp_path, node_config, override, refusal
):
    above = federation_config(tiny_model_dir, tmp_path / "run", "florist", *filter(None, [override]))
    with pytest.raises(Refused) as refused:
        NodePolicy.from_node_config(site | node_config).admit(above)
    assert str(refused.value) == refusal
    at_cap = {key: value - 1 for key, value in node_config.items() if key == "rank"}
    below = override.replace("65", "64").replace("1025", "1024").replace("501", "500").replace("257", "256").replace("101", "100")
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", *filter(None, [below]))
    assert NodePolicy.from_node_config(site | node_config | at_cap).admit(config).partition == 1


def test_tensors_trained_in_full_are_sent_only_where_the_node_allows_them(site, tiny_model_dir, tmp_path):
    def asks(*overrides: str) -> RunConfig:
        return federation_config(tiny_model_dir, tmp_path / "run", "florist", *overrides)

    embedding, biases, every_bias = asks('model.modules_to_save=["embed_tokens"]'), asks('model.lora_bias="lora_only"'), asks('model.lora_bias="all"')
    default = NodePolicy.from_node_config(site)
    with pytest.raises(Refused, match=r"^node config modules-to-save does not allow 'embed_tokens': the server asks model.modules_to_save \['embed_tokens'\]"):
        default.admit(embedding)
    with pytest.raises(Refused, match=r"^node config lora-bias='none': the server asks model.lora_bias='lora_only'"):
        default.admit(biases)
    lora_only = NodePolicy.from_node_config(site | {"lora-bias": "lora_only", "modules-to-save": "lm_head"})
    assert lora_only.admit(biases).rank == 4
    with pytest.raises(Refused, match=r"^node config lora-bias='lora_only': the server asks model.lora_bias='all'"):
        lora_only.admit(every_bias)
    with pytest.raises(Refused, match="does not allow 'embed_tokens'"):
        lora_only.admit(embedding)
    assert NodePolicy.from_node_config(site | {"lora-bias": "all", "modules-to-save": "embed_tokens"}).admit(embedding).rank == 4


def test_a_supernode_without_data_is_refused_and_a_simulated_one_takes_its_part_of_the_split(config):
    with pytest.raises(Refused, match="^node config lacks data: a site trains only on the file its node config names$"):
        NodePolicy.from_node_config({"partition-id": 0}).admit(config)
    assert NodePolicy.for_run({"partition-id": 0}, config).admit(config).data is None


@pytest.mark.parametrize(
    "override",
    [
        'model.modules_to_save=["lm_head"]', 'model.lora_bias="all"', "federation.ranks=[2, 4, 128]", "data.max_length=4096",
        "training.local_steps=1000", "evaluation.batch_size=100", "evaluation.max_new_tokens=512", "federation.rounds=200",
    ],
)
def test_the_simulations_nodes_allow_what_its_configuration_asks(tiny_model_dir, tmp_path, override):
    """`florist run` builds its nodes from the operator's own configuration: what is beyond a
    SuperNode's default policy is admitted there, and only there."""
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", override)
    simulated = NodePolicy.for_run({"partition-id": 2}, config)
    assert simulated.admit(config).rank == config.federation.rank_of(2)
    assert simulated.model == config.model.name and simulated.min_category_examples == 1
    chain = ["digest"] * config.federation.rounds
    assert simulated.read_instruction(server_message(config.shared_settings(), "d", chain=chain)).chain == chain
    site = tmp_path / "site.json"
    write_examples(site, {"a": 1})
    deployed = NodePolicy.from_node_config({"partition-id": 2, "data": str(site)})
    refusals = []
    for check in (lambda: deployed.admit(config), lambda: deployed.read_instruction(server_message(config.shared_settings(), "d", chain=chain))):
        try:
            check()
        except Refused as refused:
            refusals.append(str(refused))
    assert len(refusals) == 1, refusals


# -- the instruction --------------------------------------------------------------------------------


def test_the_shared_settings_rebuild_the_servers_configuration_with_the_nodes_model(tiny_model_dir, tmp_path):
    for config in (
        load_config(),
        federation_config(tiny_model_dir, tmp_path / "run", "ffa", "data.validation_fraction=0.25", 'model.autocast="bf16"'),
        federation_config(tiny_model_dir, tmp_path / "run", "florist", "aggregation.tau_candidates=[0.5, 1.0]", "data.validation_fraction=0.3"),
    ):
        rebuilt = from_shared_settings(config.shared_settings(), "/site/model")
        assert rebuilt.shared_settings() == config.shared_settings()
        assert rebuilt.model.name == "/site/model" and rebuilt.data.source == "embedded" and rebuilt.evaluation.mmlu == ""


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.name", "/srv/other-model"),
        ("data.source", "/srv/site-b/train.jsonl"),
        ("data.test_source", "/etc/passwd"),
        ("evaluation.mmlu", "/srv/mmlu.json"),
        ("output.run_dir", "/tmp/x"),
        ("config-file", "/srv/federation.toml"),
    ],
)
def test_a_setting_that_is_not_shared_is_refused_naming_it(site, config, key, value):
    settings = config.shared_settings() | {key: value}
    with pytest.raises(Refused) as refused:
        NodePolicy.from_node_config(site).run_config(settings)
    assert str(refused.value).startswith(f"the server's settings set {key!r}, which is not a shared setting")
    assert value not in str(refused.value)


def test_a_bad_shared_setting_is_refused_naming_its_key(site, config):
    policy = NodePolicy.from_node_config(site)
    with pytest.raises(Refused, match=r"^the server's settings: training.local_steps: .*\(got 'many'\)$"):
        policy.run_config(config.shared_settings() | {"training.local_steps": "many"})
    with pytest.raises(Refused, match=r"^the server's settings: wire.colour: no such configuration key$"):
        policy.run_config(config.shared_settings() | {"wire.colour": "red"})
    huge = str(policy_refusal(policy, config.shared_settings() | {"data.template": "x" * 100_000}))
    assert len(huge) <= 400 and huge.endswith("...")


def policy_refusal(policy: NodePolicy, settings: dict) -> Refused:
    try:
        policy.run_config(settings)
    except Refused as refused:
        return refused
    raise AssertionError("not refused")


def test_an_instruction_beyond_its_size_or_chain_cap_or_malformed_is_refused_before_it_is_decoded(site, config):
    policy = NodePolicy.from_node_config(site | {"max-message-mb": 0.01, "max-chain-length": 2})
    settings = config.shared_settings()
    honest = server_message(settings, "d", chain=["a", "b"])
    assert policy.read_instruction(honest).settings == settings
    big = server_message(settings, "d", chain=["a", "b"])
    big.content["update:1"] = ConfigRecord({"padding": "x" * 20_000})
    assert message_bytes(big) > 0.01 * 2**20 > message_bytes(honest)
    with pytest.raises(Refused, match=r"^node config max-message-mb=0.01: the instruction is 0.0\d+ MiB$"):
        policy.read_instruction(big)
    with pytest.raises(Refused, match="^node config max-chain-length=2: the instruction lists 3 merged updates$"):
        policy.read_instruction(server_message(settings, "d", chain=["a", "b", "c"]))
    forged = server_message(settings, "d")
    forged.content[CONFIG]["settings"] = json.dumps(settings | {"training.local_steps": 400}, sort_keys=True)
    with pytest.raises(Refused, match="^the instruction's settings do not match its fingerprint$"):
        policy.read_instruction(forged)
    for malformed in ("[1]", "[" * 200_000 + "]" * 200_000, "{"):
        message = server_message(settings, "d")
        message.content[CONFIG]["settings"] = malformed
        with pytest.raises(Refused, match="^the instruction's config record is malformed: "):
            NodePolicy.from_node_config(site).read_instruction(message)


def test_per_category_scores_are_sent_only_for_categories_of_enough_examples(site):
    examples = [Example("q", "a", category="capital")] * 10 + [Example("q", "a", category="colour")] * 9
    scores = {"exact_match": 0.5, "rouge_l": 0.4, "exact_match/capital": 0.6, "exact_match/colour": 1 / 9}
    assert NodePolicy.from_node_config(site).shareable(scores, examples) == {"exact_match": 0.5, "rouge_l": 0.4, "exact_match/capital": 0.6}
    assert NodePolicy.from_node_config(site | {"min-category-examples": 9}).shareable(scores, examples) == scores


# -- a SuperNode's ClientApp against a hostile server --------------------------------------------------


@pytest.mark.parametrize(
    ("hostile", "named"),
    [
        ({"data.source": "DECOY_DATA"}, "'data.source', which is not a shared setting"),
        ({"model.name": "DECOY_MODEL"}, "'model.name', which is not a shared setting"),
        # Far beyond the caps, yet small enough that a node which failed to refuse would fail this test, not the machine.
        ({"federation.ranks": [100000]}, "node config max-rank=64: the run asks for rank (federation.ranks) 100000"),
        ({"data.max_length": 100000}, "node config max-length=1024: the run asks for data.max_length 100000"),
        ({"model.modules_to_save": ["embed_tokens"]}, "node config modules-to-save does not allow 'embed_tokens'"),
        ({"model.lora_bias": "all"}, "node config lora-bias='none': the server asks model.lora_bias='all'"),
    ],
)
def test_a_supernode_refuses_a_hostile_instruction_in_one_line_and_opens_no_file(
    site, decoys, config, base_digest, tiny_model_dir, tmp_path, opened, hostile, named
):
    app = build_client_app()
    paths = {"DECOY_DATA": str(decoys["data"]), "DECOY_MODEL": str(decoys["model"])}
    settings = config.shared_settings() | {key: paths.get(value, value) for key, value in hostile.items() if isinstance(value, str)}
    settings |= {key: value for key, value in hostile.items() if not isinstance(value, str)}
    reason = refusal(app(server_message(settings, base_digest), supernode_context(site, decoys)))
    assert named in reason
    assert opened_under(opened, tmp_path) == [] and opened_under(opened, tiny_model_dir) == []
    assert "capital" not in reason and "site" not in reason


def test_the_same_supernode_trains_for_an_honest_server_and_reads_only_its_own_files(site, decoys, config, base_digest, tiny_model_dir, tmp_path, opened):
    """The control of the test above: the audit sees the node's files opened when it does work, and no decoy."""
    reply = build_client_app()(server_message(config.shared_settings(), base_digest), supernode_context(site, decoys))
    assert not reply.has_error() and reply.content[IDENTITY]["status"] == TRAINED
    assert int(reply.content[METRICS]["num-examples"]) == 12 and int(reply.content[METRICS]["rank"]) == 4
    touched = opened_under(opened, tmp_path)
    assert str(Path(site["data"]).resolve()) in touched and opened_under(opened, tiny_model_dir)
    assert not opened_under(opened, decoys["data"].parent)


def test_a_supernode_pins_its_model(site, decoys, config, base_digest, tiny_model_dir, opened):
    """Its own model only: a digest it pinned that its weights do not have is refused naming
    model-digest; a server whose base model differs gets the mismatch that names the digests."""
    pinned = site | {"model-digest": "0" * 16}
    reason = refusal(build_client_app()(server_message(config.shared_settings(), base_digest), supernode_context(pinned, decoys)))
    assert reason == f"node config model-digest={'0' * 16}: its model's weights have digest {base_digest}"
    other_server = build_client_app()(server_message(config.shared_settings(), "f" * 16), supernode_context(site, decoys))
    assert other_server.content[IDENTITY]["status"] == "mismatch" and other_server.content[IDENTITY]["model-digest"] == base_digest
    assert build_client_app()(
        server_message(config.shared_settings(), base_digest), supernode_context(site | {"model-digest": base_digest}, decoys)
    ).content[IDENTITY]["status"] == TRAINED


def test_a_supernode_refuses_a_lora_on_its_embedding(site, decoys, config, base_digest):
    settings = config.shared_settings() | {"model.target_modules": ["q_proj", "embed_tokens"]}
    reason = refusal(build_client_app()(server_message(settings, base_digest), supernode_context(site, decoys)))
    assert reason == "model.target_modules: model.embed_tokens is a Embedding, not a linear layer; a node adapts linear layers only"


def test_a_supernode_that_fails_on_its_own_file_sends_only_the_failures_type(site, decoys, config, base_digest, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "patient 4711 has", "response": "SECRET-DIAGNOSIS", "oops": 1,')
    reply = build_client_app()(server_message(config.shared_settings(), base_digest), supernode_context(site | {"data": str(broken)}, decoys))
    assert refusal(reply) == "the node failed (ValueError); its own log has the details"


def test_a_supernode_sends_per_category_scores_only_for_categories_of_enough_examples(site, decoys, config, base_digest):
    """Its test data: 10 capitals (sent, at the default minimum of 10) and 3 colours (held back)."""
    reply = build_client_app()(server_message(config.shared_settings(), base_digest, MessageType.EVALUATE), supernode_context(site, decoys))
    assert reply.content[IDENTITY]["status"] == EVALUATED
    metrics = dict(reply.content[METRICS])
    assert int(metrics["num-examples"]) == 13 and "exact_match" in metrics
    assert "exact_match/capital" in metrics and "exact_match/colour" not in metrics
