"""Federated evaluation under florist-secure: a site replies with sums only, withholds the scores
of small categories and says so, the server combines nothing but the sums and records none of one
site's values, and a site refuses to score the cuts a server chooses (the loss oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from transformers import AutoModelForCausalLM

from florist.config import load_config
from florist.data import Example
from florist.evaluation import LossResult
from florist.federation.client_app import evaluate_round, score_round
from florist.federation.evaluation_sums import EvaluationSums
from florist.federation.federated_evaluation import SecureFederatedEvaluation, evaluation_stage
from florist.federation.messages import CANDIDATE, CUTS, EVALUATED, METRICS, Identity, Malformed, Reply, update_key
from florist.federation.node_policy import NodePolicy
from florist.federation.reports import EvaluationReport, NodeScore
from florist.federation.server_app import round_record

from federations import federation_config
from test_client_app import context, instruction, random_update, status

pytestmark = pytest.mark.usefixtures("server_task")

SUMS = {"test:nll", "test:tokens", "rouge_l:sum", "exact_match:correct", "exact_match:count", "withheld:categories", "withheld:examples"}
ABOUT_THE_REPLY = {"round", "partition-id", "chain-length", "num-examples"}


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def held_out_file(tmp_path):
    """Three examples of category "big" and one of "small"."""
    records = [{"instruction": f"count to {i}", "response": " ".join(map(str, range(i))), "category": "big"} for i in range(2, 5)]
    records.append({"instruction": "say five", "response": "5", "category": "small"})
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return path


def evaluated(tiny_model_dir, tmp_path, base_model, method: str, *extra: str) -> dict:
    config = federation_config(tiny_model_dir, tmp_path / method, method, "aggregation.tau=1.0", *extra)
    pristine = {n: m.weight.detach().clone() for n, m in base_model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    update = random_update(pristine, 3, 1.5, seed=1)
    reply = evaluate_round(
        config,
        instruction(config, base_model, 1, 21, [update], {update_key(1): update}, kind=MessageType.EVALUATE),
        context(21, partition=1, **{"test-data": str(held_out_file(tmp_path))}),
    )
    assert status(reply) == EVALUATED
    return dict(reply.content[METRICS])


def test_a_secure_sites_evaluation_reply_holds_only_sums_and_withholds_small_categories(tiny_model_dir, tmp_path, base_model):
    sums = evaluated(tiny_model_dir, tmp_path, base_model, "florist-secure", "privacy.min_category_count=3")
    clear = evaluated(tiny_model_dir, tmp_path, base_model, "florist")
    assert set(sums) == ABOUT_THE_REPLY | SUMS | {"exact_match/big:correct", "exact_match/big:count"}
    assert sums["withheld:categories"] == 1 and sums["withheld:examples"] == 1  # "small": 1 example, under 3
    assert sums["num-examples"] == 4 and sums["exact_match:count"] == 4 and sums["exact_match/big:count"] == 3
    # The sums are the plain reply's means times their counts (the plain node of `florist run` sends every category).
    assert sums["test:tokens"] == clear["test_tokens"]
    assert sums["test:nll"] / sums["test:tokens"] == pytest.approx(clear["test_loss"], rel=1e-12)
    assert sums["rouge_l:sum"] / 4 == pytest.approx(clear["rouge_l"], rel=1e-12)
    assert sums["exact_match:correct"] / 4 == pytest.approx(clear["exact_match"])
    assert sums["exact_match/big:correct"] / 3 == pytest.approx(clear["exact_match/big"])
    assert "exact_match/small" in clear

    lenient = evaluated(tiny_model_dir, tmp_path, base_model, "florist-secure", "privacy.min_category_count=1")
    assert lenient["withheld:categories"] == 0 and lenient["exact_match/small:count"] == 1


def test_a_sites_own_min_category_examples_holds_when_it_is_the_higher():
    secure = load_config(None, ['aggregation.method="florist-secure"', "privacy.min_category_count=20"])
    assert NodePolicy.from_node_config({"partition-id": 0, "min-category-examples": 30}).category_minimum(secure) == 30
    assert NodePolicy.from_node_config({"partition-id": 0, "min-category-examples": 5}).category_minimum(secure) == 20


def reply_of(partition: int, metrics: dict) -> Reply:
    return Reply(Identity("fingerprint", {}, "digest"), EVALUATED, 1, partition, {"round": 1, "partition-id": partition, "chain-length": 0} | metrics)


def message_of(node: int) -> Message:
    """The message a reply was read from (a clear sums stage reads the reply alone)."""
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)


# Three sites' clear scores: distinctive token counts, so that a recorded per-site value would show.
CLEAR = [
    ({"test_loss": 2.5, "test_tokens": 1013, "rouge_l": 0.34, "exact_match": 0.5, "exact_match/a": 0.5, "exact_match/b": 0.5}, ["a"] * 2 + ["b"] * 2, LossResult(1.75, 5.75, 517)),
    ({"test_loss": 1.25, "test_tokens": 2029, "rouge_l": 0.52, "exact_match": 0.75, "exact_match/a": 0.75}, ["a"] * 4, LossResult(2.0, 7.39, 311)),
    ({"test_loss": 3.0, "test_tokens": 4051, "rouge_l": 0.375, "exact_match": 0.0, "exact_match/a": 0.0, "exact_match/b": 0.0}, ["a"] * 3 + ["b"], None),
]


def site_sums(minimum: int = 2) -> list[EvaluationSums]:
    return [EvaluationSums.of_site(results, validation, [Example("q", "r", category=c) for c in categories], minimum) for results, categories, validation in CLEAR]


def test_the_server_combines_the_sums_as_the_clear_per_site_values_combine():
    stage = evaluation_stage(federation_config("model", "run", "florist-secure"), 1, max_examples=100)
    assert isinstance(stage, SecureFederatedEvaluation)
    for node, sums in enumerate(site_sums(), start=1):
        assert stage.receive(node, reply_of(node, sums.record()), message_of(node))
    combined = stage.finish([]).combined()
    clear = [results for results, _, _ in CLEAR]
    tokens = [r["test_tokens"] for r in clear]
    assert combined["test_loss"] == pytest.approx(sum(r["test_loss"] * r["test_tokens"] for r in clear) / sum(tokens), rel=1e-12)
    assert combined["test_tokens"] == sum(tokens) and combined["examples"] == 12
    assert combined["val_loss"] == pytest.approx((1.75 * 517 + 2.0 * 311) / (517 + 311), rel=1e-12) and combined["val_tokens"] == 828
    # Example-weighted, as a plain run combines the same scores.
    plain = EvaluationReport(1, scores=[NodeScore(n, n, len(c), r | {"val_loss": v.mean_nll, "val_tokens": v.tokens} if v else r) for n, (r, c, v) in enumerate(CLEAR)])
    for key in ("test_loss", "test_perplexity", "rouge_l", "exact_match", "examples", "val_loss"):
        assert combined[key] == pytest.approx(plain.combined()[key], rel=1e-12), key
    # A category over the sites that sent it: "b" has 1 example at site 3, under the minimum of 2.
    assert combined["exact_match/a"] == pytest.approx((1 + 3 + 0) / (2 + 4 + 3))
    assert combined["exact_match/b"] == pytest.approx(1 / 2)
    assert combined["withheld_categories"] == 1 and combined["withheld_examples"] == 1


def numbers(value) -> list[float]:
    """Every number in a JSON-like value."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_the_servers_record_holds_no_sites_values_and_a_sum_below_min_sites_is_not_combined():
    config = federation_config("model", "run", "florist-secure", "federation.min_sites=2")
    stage = evaluation_stage(config, 1, max_examples=100)
    sums = site_sums()
    for node, site in enumerate(sums, start=1):
        stage.receive(node, reply_of(node, site.record()), message_of(node))
    record = round_record(1, None, {}, stage.finish([]), {})["federated_evaluation"]
    assert set(record) == {"combined", "sites_summed", "events"} and record["sites_summed"] == 3
    recorded = set(numbers(record))
    for site in sums:
        for key in ("test:nll", "test:tokens", "val:nll", "val:tokens", "rouge_l:sum"):
            assert site.record().get(key) not in recorded, key

    alone = evaluation_stage(config, 1, max_examples=100)
    alone.receive(1, reply_of(1, sums[0].record()), message_of(1))
    report = alone.finish([])
    assert report.combined() == {}
    assert [(e.status, e.reason) for e in report.events] == [("withheld", "1 sites' evaluation sums, below federation.min_sites = 2: not combined")]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"test_loss": 2.5}, "metric test_loss is not one of the sums florist-secure's evaluation sends"),
        ({"exact_match/a:correct": 7}, "metric exact_match/a:correct is above its bound"),
        ({"test:nll": -1.0}, "metric test:nll is outside its bounds"),
        ({"num-examples": 101}, "metric num-examples is above its bound"),
        ({"val:nll": 1.0}, "metric val:tokens is missing"),
    ],
)
def test_a_secure_reply_with_anything_but_bounded_sums_is_malformed(change, reason):
    with pytest.raises(Malformed, match=reason):
        EvaluationSums.read(reply_of(1, site_sums()[2].record() | change), max_examples=100)


@pytest.mark.parametrize("supernode", [False, True], ids=["florist-run", "supernode"])
def test_a_secure_site_refuses_to_score_the_cuts_a_server_chooses(tiny_model_dir, tmp_path, base_model, supernode):
    """A hostile server asks a florist-secure site for one validation loss per cut of a candidate of
    its choosing; the site answers with a one-line refusal, and no loss. A SuperNode takes the
    settings from the instruction (the server's, without automatic tau, which the configuration
    would refuse) and its data from its own node config."""
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist-secure", "aggregation.tau=1.0", "data.validation_fraction=0.3")
    pristine = {n: m.weight.detach().clone() for n, m in base_model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    probe = random_update(pristine, 4, 1.0, seed=3)
    message = instruction(config, base_model, 1, 21, [], {CANDIDATE: probe}, kind=MessageType.QUERY)
    message.content[CUTS] = ConfigRecord({"ranks": json.dumps([{name: rank for name in probe} for rank in (1, 2, 3, 4)])})
    node_config = {"data": str(held_out_file(tmp_path)), "model": str(tiny_model_dir)} if supernode else {}
    reply = score_round(None if supernode else config, message, context(21, partition=1, **node_config))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason == (
        'aggregation.method = "florist-secure": this site scores no server-chosen cuts '
        "(one validation loss per cut the server sends is a loss oracle on its data)"
    )


def test_privacy_min_category_count_is_validated_in_one_line():
    with pytest.raises(ValueError) as error:
        load_config(None, ["privacy.min_category_count=0"])
    assert "privacy.min_category_count" in str(error.value) and "\n" not in str(error.value)
    assert load_config(None, []).privacy.min_category_count == 20


def test_a_secure_runs_files_and_console_hold_the_combined_evaluation_and_no_sites_own(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """A whole `florist run` under florist-secure with federated evaluation: every site's sums, as
    its node built them, appear nowhere in metrics.jsonl, summary.json, the checkpoint or the
    server's console; the combined scores do."""
    from florist.federation import client_app
    from florist.federation.simulation import run_federation
    from florist.reporting.run_directory import read_rounds

    sent: list[dict] = []

    class Spied(EvaluationSums):
        def record(self) -> dict:
            sent.append(super().record())
            return sent[-1]

    monkeypatch.setattr(client_app, "EvaluationSums", Spied)
    config = federation_config(
        tiny_model_dir, tmp_path / "run", "florist-secure", 'federation.engine="inline"', "aggregation.tau=1.0", "federation.rounds=1",
        "evaluation.federated=true", "evaluation.server=false", "data.validation_fraction=0.3",
    )
    path = run_federation(config)
    rounds = read_rounds(path)
    assert len(sent) == 6  # 3 sites, before round 1 and after it
    for record in rounds:
        federated = record["federated_evaluation"]
        assert set(federated) == {"combined", "sites_summed", "events"} and federated["sites_summed"] == 3
        assert {"test_loss", "val_loss", "examples", "exact_match", "rouge_l"} <= set(federated["combined"])
    assert json.loads((path / "summary.json").read_text())["final"] == rounds[-1]["federated_evaluation"]["combined"]
    stored = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stored += [json.loads(file.read_text()) for file in path.rglob("*.json")]
    recorded = set(numbers(stored))
    console = capfd.readouterr().err
    for site in sent:
        for key in ("test:nll", "val:nll", "rouge_l:sum"):
            if not site[key]:
                continue  # a zero sum (the tiny model's ROUGE-L) says nothing of the site
            assert site[key] not in recorded, key
            assert f"{site[key]:.3f}" not in console and f"{site[key] / (site.get('test:tokens') or 1):.4f}" not in console
    assert "federated evaluation: {" in console
    withheld = rounds[-1]["federated_evaluation"]["combined"]["withheld_categories"]
    assert withheld > 0  # one held-out example per category at each site, under the default 20
    assert f"sites withheld the scores of {withheld} categories" in console
