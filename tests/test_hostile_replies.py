"""The server survives any reply (issue 19): for every message type a node replies with (train,
evaluate, query), every field the server reads is sent missing, of the wrong type, NaN or inf,
huge, deeply nested or carrying markup, by a fourth node whose reply arrives first. Each time the
strategy records that reply as refused or rejected with a one-line reason, the stage completes,
its record is strict JSON, and what the three honest nodes made of it is exactly what they make
without the hostile node."""

from __future__ import annotations

import io
import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from florist.aggregation import LoraFactors
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.client_app import build_client_app
from florist.federation.identity import settings_fingerprint
from florist.federation.messages import (
    ADAPTER,
    EVALUATED,
    GAP,
    IDENTITY,
    MAX_SETTINGS_TEXT,
    METRICS,
    SCORED,
    TRAINED,
    Identity,
    Instruction,
)
from florist.federation.console import show_round
from florist.federation.reports import MAX_REASON, EvaluationReport, NodeScore
from florist.federation.server_app import round_record, serve
from florist.federation.strategy import LoraStrategy
from florist.lora.adapters import read_adapter
from florist.reporting.run_directory import read_rounds

from federations import federation_config
from local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("server_task")

MODULES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}
RANKS = [2, 4, 8, 4]
HONEST = {11: 0, 22: 1, 33: 2}
HOSTILE, HOSTILE_PARTITION = 44, 3
NODES = [*HONEST, HOSTILE]
MISSING = object()
MARKUP = "[/][bold red]x[/bold red] \x1b[31m:smile:"
"""rich markup (an unmatched closing tag raises in a console that reads markup), an emoji code and an ANSI escape."""


def make_strategy(method: str = "florist", **aggregation) -> LoraStrategy:
    settings = {
        "federation": {"num_clients": len(RANKS), "ranks": RANKS},
        "aggregation": {"method": method, **aggregation},
        "data": {"validation_fraction": 0.3},
    }
    config = RunConfig.model_validate(settings)
    shared = config.shared_settings()
    norms = {name: math.sqrt(m * n) for name, (m, n) in MODULES.items()}  # a base weight of unit-variance entries
    return LoraStrategy(config, MODULES, norms, Identity(settings_fingerprint(shared), shared, "model-digest"))


def factors(partition: int, seed: int) -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    rank = RANKS[partition]
    return {
        name: LoraFactors(A=torch.randn(rank, n, generator=generator), B=torch.randn(m, rank, generator=generator), scale=2.0)
        for name, (m, n) in MODULES.items()
    }


def reply_to(strategy: LoraStrategy, instruction: Message, status: str, metrics: dict) -> Message:
    content = RecordDict({IDENTITY: strategy.identity.record(status), METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=instruction)


def base_metrics(instruction: Message, partition: int) -> dict:
    read = Instruction.read(instruction)
    return {"round": read.round, "partition-id": partition, "chain-length": len(read.chain)}


def train_reply(strategy: LoraStrategy, instruction: Message, partition: int) -> Message:
    metrics = base_metrics(instruction, partition) | {
        "num-examples": 10 + partition,
        "rank": RANKS[partition],
        "train-loss": 1.0 + partition / 10,
        "train-steps": 2,
        "train-tokens": 50,
        "train-seconds": 0.1,
        "peak-rss-mib": 100.0,
    }
    message = reply_to(strategy, instruction, TRAINED, metrics)
    payload.put(message.content, ADAPTER, factors(partition, seed=partition), "float32")
    return message


def evaluate_reply(strategy: LoraStrategy, instruction: Message, partition: int) -> Message:
    metrics = base_metrics(instruction, partition) | {
        "num-examples": 3 + partition,
        "test_loss": 2.0 + partition / 10,
        "test_tokens": 40 + partition,
        "test_perplexity": math.exp(2.0 + partition / 10),
        "rouge_l": 0.25 * partition,
        "exact_match/open_qa": 0.5,
    }
    return reply_to(strategy, instruction, EVALUATED, metrics)


def score_reply(strategy: LoraStrategy, instruction: Message, partition: int) -> Message:
    metrics = base_metrics(instruction, partition) | {"tokens": 30 + partition, "loss-0": 2.5 - partition / 10, "loss-1": 2.0 + partition / 10}
    return reply_to(strategy, instruction, SCORED, metrics)


# -- the stages, each played with or without a hostile reply that arrives first -----------------


def play_train(mutate=None) -> tuple[LoraStrategy, dict]:
    strategy = make_strategy(tau=0.9)
    strategy.begin_round(1, NODES)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, NODES)}
    if mutate is not None:
        strategy.receive_train(HOSTILE, mutate(train_reply(strategy, instructions[HOSTILE], HOSTILE_PARTITION)))
    for node, partition in HONEST.items():
        strategy.receive_train(node, train_reply(strategy, instructions[node], partition))
    strategy.note_late([] if mutate is not None else [HOSTILE])
    report = strategy.finish_round()
    record = round_record(1, report, {}, None, {})
    outcome = {"update": strategy.chain.updates[0], "clients": record["clients"]}
    return strategy, {"events": record["events"], "record": record, **outcome}


def trained_strategy(**aggregation) -> LoraStrategy:
    strategy = make_strategy(**aggregation)
    strategy.begin_round(1, list(HONEST))
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, list(HONEST))}
    for node, partition in HONEST.items():
        strategy.receive_train(node, train_reply(strategy, instructions[node], partition))
    strategy.finish_round()
    return strategy


def play_evaluate(mutate=None) -> tuple[LoraStrategy, dict]:
    strategy = trained_strategy(tau=0.9)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, NODES)}
    if mutate is not None:
        strategy.receive_evaluate(HOSTILE, mutate(evaluate_reply(strategy, instructions[HOSTILE], HOSTILE_PARTITION)))
    for node, partition in HONEST.items():
        strategy.receive_evaluate(node, evaluate_reply(strategy, instructions[node], partition))
    report = strategy.finish_evaluate([] if mutate is not None else [HOSTILE])
    record = round_record(1, None, {}, report, {})["federated_evaluation"]
    return strategy, {"events": record["events"], "record": record, "combined": record["combined"], "nodes": record["nodes"]}


def play_select(mutate=None) -> tuple[LoraStrategy, dict]:
    strategy = trained_strategy(tau_candidates=[0.8, 0.5])
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_select(1, NODES)}
    if mutate is not None:
        strategy.receive_select(HOSTILE, mutate(score_reply(strategy, instructions[HOSTILE], HOSTILE_PARTITION)))
    for node, partition in HONEST.items():
        strategy.receive_select(node, score_reply(strategy, instructions[node], partition))
    selection = strategy.finish_select([] if mutate is not None else [HOSTILE]).record()
    outcome = {"chosen": selection["chosen"], "loss": selection["validation_loss"], "nodes": selection["nodes"]}
    return strategy, {"events": selection["events"], "record": selection, "update": strategy.chain.updates[-1], **outcome}


STAGES = {"train": play_train, "evaluate": play_evaluate, "query": play_select}


# -- mutations ------------------------------------------------------------------------------------


def set_field(record: str, key: str, value):
    """A mutation that sets `key` of the reply's record `record` to `value` (MISSING deletes it)."""

    def mutate(message: Message) -> Message:
        fields = message.content[record]
        if value is MISSING:
            del fields[key]
        else:
            fields[key] = value
        return message

    return mutate


def set_metric(key: str, value):
    return set_field(METRICS, key, value)


def set_identity(key: str, value):
    return set_field(IDENTITY, key, value)


def set_record(key: str, record):
    def mutate(message: Message) -> Message:
        if record is MISSING:
            del message.content[key]
        else:
            message.content[key] = record
        return message

    return mutate


def settings_with(change):
    def mutate(message: Message) -> Message:
        identity = message.content[IDENTITY]
        identity["settings"] = change(json.loads(identity["settings"]))
        return message

    return mutate


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


NUMBER_CASES = {
    "missing": MISSING,
    "list": [1.0, 2.0],
    "nan": math.nan,
    "inf": math.inf,
    "minus-inf": -math.inf,
    "beyond-1e300": 1e308,
    "beyond-int64": 2**64,
}
INTEGER_CASES = NUMBER_CASES | {"fraction": 1.5, "negative": -1}
TEXT_CASES = {
    "missing": MISSING,
    "number": 7,
    "bytes": b"\x00\xff",
    "huge": "x" * (MAX_SETTINGS_TEXT + 1),
    "nested": "[" * 200_000 + "]" * 200_000,
    "markup": MARKUP,
}
SETTINGS_CASES = {
    "json-list": settings_with(lambda settings: "[1]"),
    "nested-200000": settings_with(lambda settings: "[" * 200_000 + "]" * 200_000),
    "nested-object": settings_with(lambda settings: json.dumps(nested(40))),
    "nan-value": settings_with(lambda settings: json.dumps({**settings, "training.learning_rate": math.nan})),
    "markup-value": settings_with(lambda settings: json.dumps({**settings, "model.name": MARKUP})),
    "markup-key": settings_with(lambda settings: json.dumps({**settings, MARKUP: 1})),
    "huge-number": settings_with(lambda settings: json.dumps(settings)[:-1] + ', "x": 1e999}'),
    "huge-integer": settings_with(lambda settings: json.dumps(settings)[:-1] + ', "x": ' + "9" * 5000 + "}"),
}
RECORD_CASES = {
    "identity-missing": set_record(IDENTITY, MISSING),
    "identity-as-metrics": set_record(IDENTITY, MetricRecord({"status": 1})),
    "metrics-missing": set_record(METRICS, MISSING),
    "metrics-as-config": set_record(METRICS, ConfigRecord({"round": "1", "partition-id": "3", "text": MARKUP})),
    "metrics-as-arrays": set_record(METRICS, ArrayRecord({"round": Array(np.ones(2))})),
    "too-many-metrics": lambda message: set_record(METRICS, MetricRecord({**message.content[METRICS], **{f"m{k}": 0.0 for k in range(5000)}}))(message),
    "long-metric-name": lambda message: set_metric("x" * 2000, 1.0)(message),
    "markup-metric-nan": set_metric(MARKUP, math.nan),
}
STATUS_CASES = {"status-other-stage": set_identity("status", "mismatch-ish"), "status-markup": set_identity("status", MARKUP)}


def cases(fields: dict[str, dict]) -> dict[str, object]:
    """Every mutation of a message type: each field with each case of its kind, the identity's text
    fields, its settings, the records themselves."""
    mutations = {}
    for field, kind in fields.items():
        for case, value in kind.items():
            mutations[f"{field}:{case}"] = set_metric(field, value)
    for field in ("status", "fingerprint", "settings", "model-digest"):
        for case, value in TEXT_CASES.items():
            mutations[f"identity.{field}:{case}"] = set_identity(field, value)
    mutations |= {f"settings:{case}": mutate for case, mutate in SETTINGS_CASES.items()}
    mutations |= RECORD_CASES | STATUS_CASES
    return mutations


def replace_array(key_of, array_of):
    """Replace the first array whose key `key_of` picks with what `array_of` makes of its values."""

    def mutate(message: Message) -> Message:
        record = message.content[ADAPTER]
        key = next(key for key in record if key_of(key))
        values = record[key].numpy()
        del record[key]
        made = array_of(values)
        if made is not None:
            record[made[0] if isinstance(made, tuple) else key] = made[1] if isinstance(made, tuple) else made
        return message

    return mutate


def npy_array(header: dict, data: bytes) -> Array:
    """An Array whose .npy bytes carry `header` (a hostile one may declare anything) and `data`."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    return Array(dtype="float32", shape=tuple(header["shape"]), stype=SType.NUMPY, data=stream.getvalue() + data)


def claiming(shape: tuple[int, ...], descr: str = "<f4"):
    return lambda values: npy_array({"descr": descr, "fortran_order": False, "shape": shape}, values.tobytes())


def with_values(change):
    return lambda values: Array(change(values.copy()))


def set_scale(key: str, value):
    def mutate(message: Message) -> Message:
        scales = message.content[f"{ADAPTER}:scales"]
        if value is MISSING:
            del scales[key]
        else:
            scales[key] = value
        return message

    return mutate


def poisoned(values: np.ndarray, value: float) -> np.ndarray:
    values.flat[0] = value
    return values


def is_b(key: str) -> bool:
    return key.endswith(".B")


ADAPTER_CASES = {
    "adapter-missing": set_record(ADAPTER, MISSING),
    "adapter-as-config": set_record(ADAPTER, ConfigRecord({"layers.0.q_proj.B": MARKUP})),
    "array-missing": replace_array(is_b, lambda values: None),
    "array-float64": replace_array(is_b, lambda values: Array(values.astype(np.float64))),
    "array-big-endian": replace_array(is_b, lambda values: Array(values.astype(">f4"))),
    "array-nan": replace_array(is_b, with_values(lambda values: poisoned(values, math.nan))),
    "array-inf": replace_array(is_b, with_values(lambda values: poisoned(values, math.inf))),
    "array-huge-values": replace_array(is_b, with_values(lambda values: values * np.float32(1e37))),
    "header-2^20x2^20": replace_array(is_b, claiming((2**20, 2**20))),
    "header-more-than-the-bytes": replace_array(is_b, lambda values: npy_array({"descr": "<f4", "fortran_order": False, "shape": values.shape}, values.tobytes()[:-4])),
    "header-object-dtype": replace_array(is_b, claiming((1,), descr="|O")),
    "header-garbage": replace_array(is_b, lambda values: Array(dtype="float32", shape=values.shape, stype=SType.NUMPY, data=b"\x93NUMPY garbage")),
    "header-rank-9": replace_array(is_b, lambda values: Array(np.ones((values.shape[0], 9), np.float32))),
    "header-3-dims": replace_array(is_b, lambda values: Array(values[None])),
    "not-numpy": replace_array(is_b, lambda values: Array(dtype="float32", shape=values.shape, stype="pickle", data=values.tobytes())),
    "markup-array-key": replace_array(is_b, lambda values: (f"{MARKUP}.B", Array(values))),
    "markup-module": replace_array(is_b, lambda values: ("layers.0.q_proj[/].B", Array(values))),
    "scales-missing": set_record(f"{ADAPTER}:scales", MISSING),
    "scales-as-metrics": set_record(f"{ADAPTER}:scales", MetricRecord({"layers.0.q_proj": 2.0})),
    "wire-missing": set_scale(payload.FORMAT_KEY, MISSING),
    "wire-number": set_scale(payload.FORMAT_KEY, 7),
    "wire-markup": set_scale(payload.FORMAT_KEY, MARKUP),
    "wire-other-format": set_scale(payload.FORMAT_KEY, "float16"),
    **{f"scale:{case}": set_scale("layers.0.q_proj", value) for case, value in (NUMBER_CASES | {"text": MARKUP, "zero": 0.0}).items() if case != "list"},
    "scale-list": set_scale("layers.0.q_proj", [1.0]),
}

TRAIN_FIELDS = {
    "round": INTEGER_CASES,
    "partition-id": INTEGER_CASES,
    "chain-length": INTEGER_CASES,
    "num-examples": INTEGER_CASES,
    "train-loss": NUMBER_CASES,
    "train-seconds": NUMBER_CASES,
    "train-tokens": NUMBER_CASES,
    "peak-rss-mib": NUMBER_CASES,
    "train-steps": {case: value for case, value in NUMBER_CASES.items() if case != "missing"},  # unread, yet a metric
}
EVALUATE_FIELDS = {
    "round": INTEGER_CASES,
    "partition-id": INTEGER_CASES,
    "chain-length": INTEGER_CASES,
    "num-examples": INTEGER_CASES,
    "test_loss": {case: value for case, value in NUMBER_CASES.items() if case != "missing"} | {"1000": 1000.0, "negative": -1.0},
    "test_tokens": {case: value for case, value in INTEGER_CASES.items() if case != "missing"},
    "rouge_l": {case: value for case, value in NUMBER_CASES.items() if case != "missing"},
}
QUERY_FIELDS = {
    "round": INTEGER_CASES,
    "partition-id": INTEGER_CASES,
    "chain-length": INTEGER_CASES,
    "tokens": INTEGER_CASES,
    "loss-0": NUMBER_CASES,
    "loss-1": NUMBER_CASES,
}

MUTATIONS = {
    "train": cases(TRAIN_FIELDS) | ADAPTER_CASES,
    "evaluate": cases(EVALUATE_FIELDS),
    "query": cases(QUERY_FIELDS),
}
ALL = [(stage, name) for stage, mutations in MUTATIONS.items() for name in mutations]


@pytest.fixture(scope="module")
def honest_outcomes() -> dict[str, dict]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        from flwr.supercore.task_identity import TaskIdentity

        for key, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
            monkeypatch.setattr(TaskIdentity, key, value)
        return {stage: play()[1] for stage, play in STAGES.items()}


def assert_same_outcome(outcome: dict, honest: dict) -> None:
    """What the honest nodes made of the stage, with and without the hostile reply, to the bit."""
    for key, value in honest.items():
        if key in ("events", "record"):
            continue
        if key == "update":
            for name, module in value.modules.items():
                got = outcome["update"].modules[name]
                assert torch.equal(got.A, module.A) and torch.equal(got.B, module.B) and got.scale == module.scale, name
        else:
            assert outcome[key] == value, key


def hostile_events(outcome: dict) -> list[dict]:
    return [event for event in outcome["events"] if event["node"] == HOSTILE]


@pytest.mark.parametrize(("stage", "mutation"), ALL, ids=[f"{stage}-{name}" for stage, name in ALL])
def test_a_hostile_reply_is_refused_and_the_stage_ends_as_without_it(stage, mutation, honest_outcomes, capsys):
    _, outcome = STAGES[stage](MUTATIONS[stage][mutation])
    [event] = hostile_events(outcome)
    assert event["status"] in ("rejected", "refused"), event
    reason = event["reason"]
    assert reason and reason.isprintable() and len(reason) <= MAX_REASON + 40, reason
    assert_same_outcome(outcome, honest_outcomes[stage])
    json.dumps(outcome["record"], allow_nan=False)  # strict JSON: no NaN, no Infinity
    printed = capsys.readouterr().err
    assert f"node {HOSTILE} {event['status']}: {reason}" in printed


# -- the issue's list, one by one, with the reason each is given ------------------------------------


THE_ISSUES_LIST = [
    ("train", set_metric("chain-length", MISSING), "metric chain-length is missing"),
    ("train", set_metric("round", math.inf), "metric round is inf, not a finite number"),
    ("train", settings_with(lambda settings: "[1]"), "identity settings are a JSON list, not an object"),
    ("train", settings_with(lambda settings: "[" * 200_000 + "]" * 200_000), "identity settings are nested too deeply"),
    ("train", replace_array(is_b, claiming((2**20, 2**20))), "header declares (1048576, 1048576) float32 (4398046511104 bytes)"),
    ("evaluate", set_metric("rouge_l", [0.5, 0.5]), "metric rouge_l is a list, not a number"),
    ("evaluate", set_metric("test_loss", 1000.0), "test_loss 1000.0 is outside [0, 700]"),
    ("query", set_metric("tokens", math.inf), "metric tokens is inf, not a finite number"),
    ("train", set_identity("status", "[/]"), "unexpected reply status '[/]'"),
    ("evaluate", set_identity("model-digest", "[/]"), "base model differs (weights digest [/], the server's is model-digest)"),
]


@pytest.mark.parametrize(("stage", "mutate", "reason"), THE_ISSUES_LIST, ids=[reason for _, _, reason in THE_ISSUES_LIST])
def test_each_reply_that_ended_the_run_is_refused_with_its_reason(stage, mutate, reason, honest_outcomes, capsys):
    _, outcome = STAGES[stage](mutate)
    [event] = hostile_events(outcome)
    assert reason in event["reason"]
    assert_same_outcome(outcome, honest_outcomes[stage])
    assert reason in capsys.readouterr().err  # printed as sent: [/] is text, not markup


def test_an_array_header_is_checked_before_anything_is_allocated():
    """A B factor whose header declares 16384 x 16384 float32 (1 GiB) over the 40 bytes it holds:
    refused with at most a few MiB allocated (numpy's loader would allocate the 1 GiB first)."""
    strategy = make_strategy()
    strategy.begin_round(1, [HOSTILE])
    (instruction,) = strategy.configure_train(1, [HOSTILE])
    hostile = replace_array(is_b, claiming((2**14, 2**14)))(train_reply(strategy, instruction, HOSTILE_PARTITION))
    tracemalloc.start()
    try:
        strategy.receive_train(HOSTILE, hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (event,) = strategy._active().report.events
    assert event.status == "rejected" and "declares (16384, 16384)" in event.reason
    assert peak < 4 * 2**20, peak


def test_the_node_side_reader_refuses_a_header_that_claims_more_than_its_bytes():
    """payload.take, which a node also runs on the server's messages, reads no array whose header
    does not describe exactly the bytes behind it."""
    content = RecordDict()
    payload.put(content, "update:1", factors(0, seed=1), "float32")
    key = next(key for key in content["update:1"] if key.endswith(".A"))
    content["update:1"][key] = claiming((2**20, 2**20))(content["update:1"][key].numpy())
    with pytest.raises(ValueError, match=r"header declares \(1048576, 1048576\) float32 \(4398046511104 bytes\), and 40 bytes follow it"):
        payload.take(content, "update:1")


def test_an_error_reply_is_recorded_as_one_printable_line(honest_outcomes, capsys):
    def crashed(message: Message) -> Message:
        return Message(Error(code=1, reason=f"Traceback ...\n  {MARKUP}\n" + "y" * 10_000), reply_to=message)

    _, outcome = play_train(crashed)
    [event] = hostile_events(outcome)
    assert event["status"] == "failed"
    assert event["reason"].startswith("yyy") and event["reason"].endswith("(10000 characters)")
    assert len(event["reason"]) <= MAX_REASON + 40
    assert_same_outcome(outcome, honest_outcomes["train"])
    _, outcome = play_train(lambda message: Message(Error(code=1, reason=MARKUP), reply_to=message))
    [event] = hostile_events(outcome)
    assert event["reason"] == MARKUP.replace("\x1b", "\\x1b")
    assert event["reason"] in capsys.readouterr().err


@pytest.mark.parametrize("needs", [MISSING, math.nan, [1], 2**64, 0, 5], ids=["missing", "nan", "list", "huge", "zero", "beyond-the-chain"])
def test_a_gap_reply_that_names_no_update_to_resend_is_refused(needs):
    strategy = trained_strategy(tau=0.9)
    strategy.begin_round(2, [HOSTILE])
    (instruction,) = strategy.configure_train(2, [HOSTILE])
    metrics = base_metrics(instruction, HOSTILE_PARTITION)
    if needs is not MISSING:
        metrics["needs-update"] = needs
    assert strategy.receive_train(HOSTILE, reply_to(strategy, instruction, GAP, metrics)) == []
    (event,) = strategy._active().report.events
    if isinstance(needs, int) and not isinstance(needs, bool) and needs < 2**63:
        assert (event.status, event.reason) == ("failed", f"chain gap at update {needs}, outside the chain of 1 updates")
    else:
        assert event.status == "rejected" and "metric needs-update" in event.reason


def test_a_node_supplied_metric_name_is_recorded_and_printed_as_sent(capsys):
    """A score named with markup is a score like any other: recorded under its name, printed verbatim
    (a console that read markup would print it as a bold red `score` and a smiley)."""
    name = "[bold red]score :smile:"
    _, outcome = play_evaluate(set_metric(name, 0.5))
    assert hostile_events(outcome) == []
    [hostile] = [node for node in outcome["nodes"] if node["node"] == HOSTILE]
    assert hostile["metrics"][name] == 0.5
    report = EvaluationReport(1, scores=[NodeScore(HOSTILE, HOSTILE_PARTITION, 2, {name: 0.5})])
    show_round(round_record(1, None, {}, report, {}))
    assert f"round 1 federated evaluation: {{{name!r}: 0.5}}" in capsys.readouterr().err


# -- the whole federation, with a hostile node among honest ones -----------------------------------

HOSTILE_TRAIN = [
    (set_metric("chain-length", MISSING), "metric chain-length is missing"),
    (replace_array(is_b, claiming((2**20, 2**20))), "header declares (1048576, 1048576)"),
    (set_metric("round", math.inf), "metric round is inf"),
    (set_identity("status", MARKUP), "unexpected reply status '[/][bold red]x[/bold red] \\x1b[31m:smile:'"),
]
HOSTILE_EVALUATE = [
    (set_metric("rouge_l", [0.5, 0.5]), "metric rouge_l is a list, not a number"),
    (set_metric("test_loss", 1000.0), "test_loss 1000.0 is outside [0, 700]"),
    (settings_with(lambda settings: "[" * 200_000 + "]" * 200_000), "identity settings are nested too deeply"),
    (settings_with(lambda settings: "[1]"), "identity settings are a JSON list, not an object"),
]


def hostile_node():
    """A node that trains and evaluates like the others, then breaks its reply: each message in
    turn, one of the ways above."""
    sent = {TRAINED: 0, EVALUATED: 0}

    def tamper(instruction: Message, reply: Message) -> Message:
        status = reply.content[IDENTITY]["status"]
        mutations = HOSTILE_TRAIN if status == TRAINED else HOSTILE_EVALUATE
        mutate, _ = mutations[sent[status] % len(mutations)]
        sent[status] += 1
        return mutate(Message(RecordDict(dict(reply.content.items())), reply_to=instruction))

    return tamper


def strict_json(text: str) -> object:
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_federation_with_a_hostile_node_completes_as_the_federation_without_it(tiny_model_dir, tmp_path):
    """Four sites, the fourth hostile: every round's train reply and evaluation reply it sends is
    broken in one of the ways that used to end the run. The run completes, every hostile reply is
    refused, metrics.jsonl is strict JSON, and the global adapter and the honest sites' scores are
    those of the same federation run without the hostile node."""
    extra = [
        "federation.num_clients=4", "federation.ranks=[2, 4, 8, 4]", "federation.rounds=4", "federation.round_timeout=30",
        "federation.connect_timeout=1", "evaluation.base=false", "evaluation.server=false", "evaluation.federated=true",
        "evaluation.every_round=true",
    ]
    runs = {}
    for name, nodes in (("honest", {101: 0, 202: 1, 303: 2}), ("hostile", {101: 0, 202: 1, 303: 2, 404: 3})):
        config = federation_config(tiny_model_dir, tmp_path / name, "florist", *extra)
        grid = LocalGrid(build_client_app(config), {node: {"partition-id": p} for node, p in nodes.items()})
        if 404 in nodes:
            grid.nodes[404].tamper = hostile_node()
        runs[name] = serve(config, grid)

    rounds = [strict_json(line) for line in (runs["hostile"] / "metrics.jsonl").read_text().splitlines()]
    honest = read_rounds(runs["honest"])
    assert [record["round"] for record in rounds] == [record["round"] for record in honest] == [0, 1, 2, 3, 4]
    for record, reference, (_, train_reason), (_, evaluate_reason) in zip(rounds[1:], honest[1:], HOSTILE_TRAIN, HOSTILE_EVALUATE, strict=True):
        [train_event] = [e for e in record["events"] if e["node"] == 404]
        [evaluate_event] = [e for e in record["federated_evaluation"]["events"] if e["node"] == 404]
        assert train_event["status"] == evaluate_event["status"] == "rejected", (train_event, evaluate_event)
        assert train_reason in train_event["reason"] and evaluate_reason in evaluate_event["reason"]
        assert [c["partition"] for c in record["clients"]] == [0, 1, 2]
        assert [c["train_loss"] for c in record["clients"]] == [c["train_loss"] for c in reference["clients"]]
        assert record["ranks"] == reference["ranks"]
        assert record["federated_evaluation"]["combined"] == reference["federated_evaluation"]["combined"]
        assert record["federated_evaluation"]["nodes"] == reference["federated_evaluation"]["nodes"]
    _, final = read_adapter(runs["hostile"] / "final" / "adapter")
    _, expected = read_adapter(runs["honest"] / "final" / "adapter")
    assert list(final.modules) == list(expected.modules)
    for name, module in expected.modules.items():
        assert torch.equal(final.modules[name].A, module.A) and torch.equal(final.modules[name].B, module.B), name
