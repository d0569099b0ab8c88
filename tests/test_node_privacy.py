"""What a site demands of a run's privacy (node config require-secure-sum, max-epsilon, max-delta),
and the noise a site adds whatever the server asks: each shortfall refused in one line naming the
node-config key, by a SuperNode's ClientApp before it reads any file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import Message, RecordDict

from florist.aggregation import LoraFactors
from florist.config import load_config
from florist.federation.client_app import build_client_app
from florist.federation.identity import settings_fingerprint
from florist.federation.messages import IDENTITY, TRAINED, Instruction, instruction_content
from florist.federation.node_config import Refused
from florist.federation.node_policy import NodePolicy
from florist.federation.node_privacy import fewest_sites_multiplier
from florist.federation.sketch_round import SKETCH, SketchRound, site_upload
from florist.privacy import epsilon, noise_for_epsilon, planned_epsilon, planned_noise_multiplier

from deployment import federation_keys
from federations import federation_config
from test_node_policy import base_digest, config, decoys, opened, opened_under, refusal, server_message, site, supernode_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("server_task")

SECURE = ('aggregation.method="florist-secure"', "privacy.secure_aggregation=true")


def private(epsilon_: float, *extra: str) -> tuple[str, ...]:
    return (*SECURE, "privacy.dp=true", "privacy.clip_norm=1", f"privacy.target_epsilon={epsilon_:g}", *extra)


def run(tiny_model_dir, tmp_path, *overrides: str):
    return federation_config(tiny_model_dir, tmp_path / "run", "florist", *overrides)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ((), 'node config require-secure-sum=true: aggregation.method is "florist", whose server reads this site\'s update'),
        (('aggregation.method="florist-secure"',), "node config require-secure-sum=true: privacy.secure_aggregation is false: the server would read this site's sketches"),
    ],
)
def test_a_site_that_requires_the_secure_sum_refuses_a_run_whose_server_reads_its_update(site, tiny_model_dir, tmp_path, overrides, reason):
    policy = NodePolicy.from_node_config(site | {"require-secure-sum": True})
    with pytest.raises(Refused) as refused:
        policy.admit(run(tiny_model_dir, tmp_path, *overrides))
    assert str(refused.value) == reason
    assert policy.admit(run(tiny_model_dir, tmp_path, *SECURE)).partition == 1
    assert NodePolicy.from_node_config(site).admit(run(tiny_model_dir, tmp_path)).partition == 1  # no demand, no refusal


def sketch_round(rounds: int, sites: int, multiplier: float = 1.0) -> SketchRound:
    """A train instruction's sketch record as the site reads it."""
    record = SketchRound(seed=5, widths=(8,), sites=sites, noise_multiplier=multiplier, rounds=rounds).record()
    return SketchRound.read(Message(RecordDict({SKETCH: record}), dst_node_id=1, message_type="train"))


def test_a_site_with_an_epsilon_cap_refuses_a_round_of_a_run_that_plans_more_and_admits_one_at_it(site, tiny_model_dir, tmp_path):
    policy = NodePolicy.from_node_config(site | {"max-epsilon": 4.0})
    for target in (1, 4):
        config = run(tiny_model_dir, tmp_path, *private(target))
        policy.admit(config)
        policy.privacy.check_round(config, sketch_round(rounds=5, sites=4), 5)
    config = run(tiny_model_dir, tmp_path, *private(8))
    with pytest.raises(Refused, match=r"^node config max-epsilon=4: the run plans epsilon 8(\.\d+)? over its 5 rounds at privacy.delta 1e-05$"):
        policy.privacy.check_round(config, sketch_round(rounds=5, sites=4), 1)
    # A run that states sigma instead of epsilon is held to the epsilon the accountant gives that sigma,
    # over the rounds and the share of the clients each round's record states (4 of the 4 here).
    stating = lambda sigma: run(tiny_model_dir, tmp_path, *SECURE, "privacy.dp=true", "privacy.clip_norm=1", f"privacy.noise_multiplier={sigma}")
    assert planned_epsilon(stating(3).privacy, 5, 1.0) == pytest.approx(epsilon([(3.0, 1.0)] * 5, 1e-5))
    policy.privacy.check_round(stating(3), sketch_round(rounds=5, sites=4), 1)
    with pytest.raises(Refused, match=rf"^node config max-epsilon=4: the run plans epsilon {planned_epsilon(stating(3).privacy, 50, 1.0):.4g} over its 50 rounds"):
        policy.privacy.check_round(stating(3), sketch_round(rounds=50, sites=4), 1)
    with pytest.raises(Refused, match=r"^node config max-epsilon=4: round 6 is beyond the 5 rounds the run's epsilon covers$"):
        policy.privacy.check_round(stating(3), sketch_round(rounds=5, sites=4), 6)


@pytest.mark.parametrize(
    ("overrides", "node_config", "reason"),
    [
        (SECURE, {}, "node config max-epsilon=4: the run has no differential privacy (privacy.dp = false)"),
        (private(1)[:1] + private(1)[2:], {}, "node config max-epsilon=4: privacy.secure_aggregation is false, so the server reads this site's sketches with its share of the noise alone, not the sum's"),
        (private(1, "privacy.delta=1e-3"), {}, "node config max-delta=1e-05: the run states privacy.delta 0.001"),
        (private(1, "privacy.delta=1e-3"), {"max-delta": 1e-4}, "node config max-delta=0.0001: the run states privacy.delta 0.001"),
    ],
)
def test_an_epsilon_cap_needs_dp_summed_securely_at_a_delta_within_its_own(site, tiny_model_dir, tmp_path, overrides, node_config, reason):
    with pytest.raises(Refused) as refused:
        NodePolicy.from_node_config(site | {"max-epsilon": 4.0} | node_config).admit(run(tiny_model_dir, tmp_path, *overrides))
    assert str(refused.value) == reason


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"require-secure-sum": "yes"}, "node config require-secure-sum='yes' must be true or false (TOML: unquoted)"),
        ({"max-epsilon": 0}, "node config max-epsilon=0 must be a finite number > 0"),
        ({"max-epsilon": 4, "max-delta": 1.5}, "node config max-delta=1.5 must be below 1"),
        ({"max-delta": 1e-6}, "node config max-delta without max-epsilon: a delta bounds nothing without its epsilon"),
    ],
)
def test_a_bad_privacy_demand_is_refused_in_one_line_naming_the_key(site, entry, reason):
    with pytest.raises(Refused) as refused:
        NodePolicy.from_node_config(site | entry)
    assert str(refused.value) == reason


def test_a_bad_signing_key_file_is_refused_with_the_node_config_not_at_the_first_secure_sum(site, tmp_path):
    keys, peers = federation_keys(tmp_path, 2)
    assert NodePolicy.from_node_config(site | {"secure-sum-key": str(keys[0]), "secure-sum-peers": str(peers)}).partition == 1
    with pytest.raises(Refused, match="^node config secure-sum-key: cannot read the file"):
        NodePolicy.from_node_config(site | {"secure-sum-key": str(tmp_path / "gone"), "secure-sum-peers": str(peers)})


def test_a_supernode_that_requires_the_secure_sum_refuses_a_plain_server_before_reading_a_file(
    site, decoys, config, base_digest, tiny_model_dir, tmp_path, opened
):
    reason = refusal(build_client_app()(server_message(config.shared_settings(), base_digest), supernode_context(site | {"require-secure-sum": True}, decoys)))
    assert reason == 'node config require-secure-sum=true: aggregation.method is "florist", whose server reads this site\'s update'
    assert opened_under(opened, tmp_path) == [] and opened_under(opened, tiny_model_dir) == []
    # The same node, without the demand, trains for that server: the refusal was the demand's.
    reply = build_client_app()(server_message(config.shared_settings(), base_digest), supernode_context(site, decoys))
    assert reply.content[IDENTITY]["status"] == TRAINED


def test_a_supernode_with_an_epsilon_cap_trains_no_round_beyond_the_ones_its_epsilon_covers(site, decoys, base_digest, tiny_model_dir, tmp_path, opened):
    config = run(tiny_model_dir, tmp_path, *private(4))
    settings = config.shared_settings()
    beyond = Message(instruction_content(Instruction(6, [], settings_fingerprint(settings), base_digest, settings)), dst_node_id=21, message_type="train")
    beyond.content[SKETCH] = sketch_round(rounds=5, sites=4).record()
    reason = refusal(build_client_app()(beyond, supernode_context(site | {"max-epsilon": 4.0}, decoys)))
    assert reason == "node config max-epsilon=4: round 6 is beyond the 5 rounds the run's epsilon covers"
    assert opened_under(opened, tmp_path) == []  # refused before the node read its data


# -- the noise a site adds ---------------------------------------------------------------------------


def factors() -> dict[str, LoraFactors]:
    generator = torch.Generator().manual_seed(0)
    return {"q": LoraFactors(A=torch.randn(4, 32, generator=generator), B=torch.randn(24, 4, generator=generator), scale=1.0)}


@pytest.mark.parametrize("stated", ["privacy.target_epsilon=1", "privacy.noise_multiplier=2"])
def test_a_site_adds_at_least_the_noise_the_runs_own_settings_need_whatever_the_server_asks(stated):
    """A hostile server states epsilon 1 in the shared settings, which every site agreed to, and asks
    the sites for a tenth of the noise that needs: each site recomputes sigma and refuses."""
    config = load_config(None, [*SECURE, "privacy.dp=true", "privacy.clip_norm=1", stated, "federation.num_clients=6", "federation.ranks=[4]"])
    needed = noise_for_epsilon(1, 1e-5, 7, 0.5) if "epsilon" in stated else 2.0  # 7 rounds of 3 of the 6 clients
    with pytest.raises(Refused, match=rf"^the server asks for noise multiplier {needed / 10:g}, below the {needed:.6g} that privacy\."):
        site_upload(config, sketch_round(rounds=7, sites=3, multiplier=needed / 10), factors(), 10)
    upload, metrics = site_upload(config, sketch_round(rounds=7, sites=3, multiplier=needed), factors(), 10)
    assert set(upload) >= {"q:range", "q:corange"} and metrics["dp-clip-factor"] <= 1


@pytest.mark.parametrize(("rounds", "sites"), [(0, 3), (2.5, 3), (None, 3), (3, 0)])
def test_a_sketch_record_without_positive_rounds_and_sites_is_refused(rounds, sites):
    record = SketchRound(seed=5, widths=(8,), sites=3, rounds=3).record()
    record["sites"] = sites
    if rounds is None:
        del record["rounds"]
    else:
        record["rounds"] = rounds
    with pytest.raises(Refused, match="^the server's sketch record states .* rounds and .* sites, not positive integers$"):
        SketchRound.read(Message(RecordDict({SKETCH: record}), dst_node_id=1, message_type="train"))


# -- the site's own ledger -----------------------------------------------------------------------------


def ledger_site(site: dict, ledger, max_epsilon: float) -> NodePolicy:
    return NodePolicy.from_node_config(site | {"max-epsilon": max_epsilon, "privacy-ledger": str(ledger)})


def test_a_sites_ledger_counts_its_uploads_over_runs_at_no_amplification_and_refuses_the_one_beyond_its_epsilon(site, tiny_model_dir, tmp_path):
    """Runs of 5 rounds that each plan epsilon 4 over 2 of the 4 clients a round (sampling amplifies
    the server's count): the site composes its own uploads at a sampling rate of 1 and at the
    fewest sites a sum may hold, across runs, and refuses the 8th upload where its cap allows 7."""
    config = run(tiny_model_dir, tmp_path, *private(4))
    record = sketch_round(rounds=5, sites=2, multiplier=noise_for_epsilon(4, 1e-5, 5, 0.5))
    per_upload = fewest_sites_multiplier(config, record)
    assert per_upload == pytest.approx(record.noise_multiplier)  # 2 sites: the threshold is both
    cap = epsilon([(per_upload, 1.0)] * 7, 1e-5)
    assert cap > epsilon([(per_upload, 1.0)] * 5, 1e-5) > planned_epsilon(config.privacy, 5, 0.5)  # no amplification: more than the plan
    ledger = tmp_path / "ledger.json"
    accepted = []
    with pytest.raises(Refused) as refused:
        for run_id in (11, 12):
            for server_round in range(1, 6):
                policy = ledger_site(site, ledger, cap)  # a new ClientApp process for each message
                policy.admit(config)
                policy.privacy.check_round(config, record, server_round)
                policy.privacy.spend(config, record, run_id, server_round)
                accepted.append((run_id, server_round))
    assert accepted == [(11, r) for r in range(1, 6)] + [(12, 1), (12, 2)]
    spent = epsilon([(per_upload, 1.0)] * 8, 1e-5)
    assert str(refused.value) == (
        f"node config privacy-ledger: this round would bring this site's epsilon to {spent:.4g} over the 8 private uploads "
        f"in its ledger (at a sampling rate of 1), above max-epsilon={cap:g} at max-delta=1e-05"
    )
    entries = json.loads(ledger.read_text())
    assert [(e["run"], e["round"]) for e in entries] == accepted
    assert all(e["noise_multiplier"] == pytest.approx(per_upload) for e in entries)


def test_the_ledger_counts_a_round_at_the_fewest_sites_its_sum_may_hold(site, tiny_model_dir, tmp_path):
    """10 sites a round, a threshold of 6 (privacy.secure_threshold 0.6): sites that drop out take
    their noise with them, so a site counts sigma sqrt(6 / 10), not the sigma of all 10."""
    config = run(tiny_model_dir, tmp_path, *private(4, "privacy.secure_threshold=0.6", "federation.num_clients=10", "federation.ranks=[4]"))
    record = sketch_round(rounds=5, sites=10, multiplier=2.0)
    assert fewest_sites_multiplier(config, record) == pytest.approx(2.0 * (6 / 10) ** 0.5)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[{]", "node config privacy-ledger: the file is not a ledger florist wrote (JSONDecodeError); it is left as it is"),
        ('{"uploads": []}', "node config privacy-ledger: the file is not a ledger florist wrote (not a list of uploads); it is left as it is"),
        ('[{"run": 1, "round": 1, "noise_multiplier": -1}]', "node config privacy-ledger: the file is not a ledger florist wrote (not a list of uploads); it is left as it is"),
        ('[{"run": 1, "round": 1}]', "node config privacy-ledger: the file is not a ledger florist wrote (not a list of uploads); it is left as it is"),
    ],
)
def test_a_tampered_ledger_is_refused_in_one_line_and_left_as_it_is(site, tmp_path, content, reason):
    ledger = tmp_path / "ledger.json"
    ledger.write_text(content)
    with pytest.raises(Refused) as refused:
        ledger_site(site, ledger, 4.0)
    assert str(refused.value) == reason
    assert ledger.read_text() == content


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"privacy-ledger": "ledger.json"}, "node config privacy-ledger without max-epsilon: a ledger bounds nothing without its epsilon"),
        ({"max-epsilon": 4, "privacy-ledger": "."}, "node config privacy-ledger: not a file in an existing directory"),
        ({"max-epsilon": 4, "privacy-ledger": "no-such-directory/ledger.json"}, "node config privacy-ledger: not a file in an existing directory"),
    ],
)
def test_a_bad_ledger_setting_is_refused_in_one_line_naming_the_key(site, entry, reason, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Refused) as refused:
        NodePolicy.from_node_config(site | entry)
    assert str(refused.value) == reason


def test_sites_with_ledgers_record_each_private_upload_of_a_run_and_refuse_the_next_run_their_epsilon_cannot_cover(tiny_model_dir, tmp_path, capsys):
    """A private secure-sum federation of three sites, each with a ledger and max-epsilon: the run's
    two rounds are recorded in every ledger, with the run's id; a second run, whose first upload
    would take a site past its cap, is refused by every site before it trains, and fails below its
    quorum with their one-line reason, leaving the ledgers as they were."""
    from florist.federation.server_app import serve
    from florist.reporting.run_directory import read_rounds

    from local_grid import LocalGrid

    settings = ["federation.rounds=2", "federation.round_retries=0", "federation.round_timeout=10", "evaluation.base=false", "evaluation.server=false"]
    config = federation_config(tiny_model_dir, tmp_path / "first", "florist-secure", *settings, *private(8)[1:])
    record = SketchRound.of(1, {"x": 8}, 3, planned_noise_multiplier(config.privacy, 2, 1.0), math.inf, 2)
    per_upload = fewest_sites_multiplier(config, record)
    cap = epsilon([(per_upload, 1.0)] * 2, 1e-5)  # room for the first run's 2 uploads, not one more
    assert cap >= planned_epsilon(config.privacy, 2, 1.0)  # the run's own plan is within it
    ledgers = {node: tmp_path / f"ledger-{node}.json" for node in (101, 202, 303)}
    nodes = {node: {"partition-id": k, "max-epsilon": cap, "privacy-ledger": str(ledgers[node])} for k, node in enumerate(ledgers)}
    serve(config, LocalGrid(build_client_app(config), nodes))
    for ledger in ledgers.values():
        entries = json.loads(ledger.read_text())
        assert [entry["round"] for entry in entries] == [1, 2] and len({entry["run"] for entry in entries}) == 1
        assert all(entry["noise_multiplier"] == pytest.approx(per_upload) for entry in entries)
    before = {node: ledger.read_text() for node, ledger in ledgers.items()}
    capsys.readouterr()
    second = federation_config(tiny_model_dir, tmp_path / "second", "florist-secure", *settings, *private(8)[1:])
    with pytest.raises(Exception, match="below the quorum"):
        serve(second, LocalGrid(build_client_app(second), nodes))
    assert {node: ledger.read_text() for node, ledger in ledgers.items()} == before
    assert [record["round"] for record in read_rounds(tmp_path / "second")] == [0]  # round 1 was not aggregated
    printed = capsys.readouterr().err
    spent = epsilon([(per_upload, 1.0)] * 3, 1e-5)
    for node in ledgers:
        assert f"round 1: node {node} failed: node config privacy-ledger: this round would bring this site's epsilon to {spent:.4g} over the 3" in printed
