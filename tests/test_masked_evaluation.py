"""Federated evaluation under florist-secure with privacy.secure_aggregation: the sites' evaluation
sums masked by the secure-sum protocol, on the real ServerApp loop and ClientApp in this process
(local_grid.py). The masked total against the clear sums' total, what the server receives, a site
dropping out after masking, a sum below federation.min_sites, the bytes, and the encoding's limits."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from transformers import AutoModelForCausalLM

from florist.data import EMBEDDED_CATEGORIES
from florist.federation import client_app, secure_site
from florist.federation.client_app import build_client_app, evaluate_round
from florist.federation.evaluation_sums import EVALUATION_SESSIONS, EvaluationSums, Ratio, layout_categories, masked_layout
from florist.federation.messages import METRICS, SECURE_SUM, SECURE_SUM_TYPE, Reply, update_key
from florist.federation.secure_site import answer_setup
from florist.federation.secure_sum import Layout, MaskedInput, ProtocolRefused, Quantizer, SecureSumNode, SecureSumServer
from florist.federation.secure_sum.protocol import COLLECT, Setup, stage_of
from florist.federation.server_app import serve
from florist.reporting.run_directory import read_rounds

from federations import federation_config
from local_grid import LocalGrid
from test_client_app import context, instruction, random_update
from test_secure_round import CapturingGrid

pytestmark = pytest.mark.usefixtures("server_task")

NODES = {101: 0, 202: 1, 303: 2}
CLIP_RANGE, BITS = 64.0, 24
QUANTIZER = Quantizer(CLIP_RANGE, BITS)
RUN = [
    "federation.rounds=1", "federation.round_retries=0", "federation.round_timeout=10", "evaluation.base=true", "evaluation.server=false",
    "evaluation.federated=true", "privacy.min_category_count=1", "data.validation_fraction=0.3",
    f"privacy.secure_clip_range={CLIP_RANGE}", f"privacy.secure_bits={BITS}",
]
"""One round, the base model and the trained one evaluated by the sites; every category a site holds is sent (a minimum of 1)."""
MASKED, CLEAR = "privacy.secure_aggregation=true", "privacy.secure_aggregation=false"
REPLY_ONLY = {"round", "partition-id", "chain-length"}


class Spied:
    """Each site's vector of evaluation sums as it keeps it to mask, per evaluation (patched, not changed)."""

    def __init__(self, monkeypatch):
        self.sums: list[dict[int, dict[str, torch.Tensor]]] = []
        answer = secure_site.answer_evaluation_setup

        def spying(context, setup, sums):
            if not self.sums or context.node_id in self.sums[-1]:
                self.sums.append({})
            self.sums[-1][context.node_id] = sums.tensors(layout_categories(setup.layout))
            return answer(context, setup, sums)

        monkeypatch.setattr(client_app, "answer_evaluation_setup", spying)


def run(tiny_model_dir, path, *extra, grid_class=LocalGrid, tamper=None):
    config = federation_config(tiny_model_dir, path, "florist-secure", *RUN, *extra)
    grid = grid_class(build_client_app(config), {node: {"partition-id": p} for node, p in NODES.items()})
    for node, how in (tamper or {}).items():
        grid.nodes[node].tamper = how
    return grid, read_rounds(serve(config, grid))


def clear_total(sites: list[dict[str, torch.Tensor]]) -> EvaluationSums:
    return EvaluationSums.of_total({key: sum(site[key] for site in sites) for key in sites[0]}, EMBEDDED_CATEGORIES)


def assert_within_bound(masked: dict, clear: dict, sums: EvaluationSums, sites: int) -> None:
    """Counts (tokens, examples, exact match, withheld) exact; each float sum within `sites`
    quantisation steps (Quantizer.bound), so a loss per token within that over its tokens."""
    assert set(masked) == set(clear)
    bound = QUANTIZER.bound(sites)
    for key, value in clear.items():
        if key.endswith(("_loss", "_perplexity")):
            split = key.split("_")[0]
            allowed = bound / sums.losses[split].count
            assert abs(masked[key] - value) <= (allowed if key.endswith("_loss") else value * 2 * allowed), key
        elif key == "rouge_l":
            assert abs(masked[key] - value) <= bound / sums.examples, key
        else:
            assert masked[key] == value, key


@pytest.fixture(scope="module")
def clear_run(tiny_model_dir, tmp_path_factory):
    """The same run with the evaluation sums in the clear: each site's sums as the server receives them."""
    grid, rounds = run(tiny_model_dir, tmp_path_factory.mktemp("clear") / "run", CLEAR, grid_class=CapturingGrid)
    base = {}
    for reply in grid.received:
        if reply.metadata.message_type == MessageType.EVALUATE and reply.metadata.src_node_id not in base:  # round 0 comes first
            base[reply.metadata.src_node_id] = EvaluationSums.read(Reply.read(reply), 1000)
    assert len(base) == 3
    return base, rounds


def test_the_masked_evaluation_totals_the_clear_sums_and_the_server_receives_no_sites_sums(tiny_model_dir, tmp_path, monkeypatch, clear_run):
    spied = Spied(monkeypatch)
    grid, rounds = run(tiny_model_dir, tmp_path / "run", MASKED, grid_class=CapturingGrid)
    clear_sites, clear_rounds = clear_run
    assert len(spied.sums) == 2 and all(set(sums) == set(NODES) for sums in spied.sums)  # before round 1 and after it
    # The base model's evaluation: each site built the vector of the sums it sends in the clear run.
    for node, sums in clear_sites.items():
        expected = sums.in_layout(EMBEDDED_CATEGORIES).tensors(EMBEDDED_CATEGORIES)
        torch.testing.assert_close(spied.sums[0][node], expected, rtol=0, atol=1e-9)
    base = rounds[0]["federated_evaluation"]
    assert base["sites_summed"] == 3
    assert_within_bound(base["combined"], clear_rounds[0]["federated_evaluation"]["combined"], clear_total(list(spied.sums[0].values())), 3)
    assert base["combined"]["exact_match"] >= 0 and base["combined"]["test_tokens"] > 0 and "val_loss" in base["combined"]
    # After round 1, over what the sites built then.
    final = rounds[1]["federated_evaluation"]
    total = clear_total(list(spied.sums[1].values()))
    assert_within_bound(final["combined"], total.combined(), total, 3)

    # What the server received: no site's sums in the clear, and each masked vector holds none of its counts.
    evaluation_sums = 0
    for reply in grid.received:
        assert set(reply.content.keys()) <= {"identity", "metrics", SECURE_SUM}, reply.content.keys()
        if reply.metadata.message_type == MessageType.EVALUATE:
            assert set(reply.content[METRICS].keys()) == REPLY_ONLY
        record = reply.content.get(SECURE_SUM)
        if record is not None and record["session"] >= EVALUATION_SESSIONS and stage_of(record) == COLLECT:
            evaluation_sums += 1
            sums = spied.sums[record["session"] - EVALUATION_SESSIONS][reply.metadata.src_node_id]
            counts = {int(sums[name].item()) for name in masked_layout(EMBEDDED_CATEGORIES).counts}
            assert not set(MaskedInput.read(record).vector.tolist()) & counts
    assert evaluation_sums == 6

    # The base evaluation's bytes (round 0 has nothing else): every protocol record both ways.
    sent, replies = (before_training(messages) for messages in (grid.sent, grid.received))
    down = sum(message.content[SECURE_SUM].count_bytes() for message in sent)
    up = sum(reply.content[SECURE_SUM].count_bytes() for reply in replies)
    assert len(sent) == len(replies) == 4 * len(NODES) and rounds[0]["communication"] == {"down_bytes": down, "up_bytes": up}


def before_training(messages: list[Message]) -> list[Message]:
    return messages[: next(i for i, m in enumerate(messages) if m.metadata.message_type == MessageType.TRAIN)]


def drops_its_masked_sums(instruction: Message, reply: Message) -> Message | None:
    """Masks its evaluation sums (the reply is made), then is gone before the server receives them."""
    record = instruction.content.get(SECURE_SUM)
    if instruction.metadata.message_type == SECURE_SUM_TYPE and stage_of(record) == COLLECT and record["session"] >= EVALUATION_SESSIONS:
        return None
    return reply


def test_a_site_dropping_after_masking_leaves_the_evaluation_total_over_the_others(tiny_model_dir, tmp_path, monkeypatch):
    spied = Spied(monkeypatch)
    _, rounds = run(tiny_model_dir, tmp_path / "run", MASKED, tamper={303: drops_its_masked_sums})
    for record, sums in zip(rounds, spied.sums, strict=True):
        evaluation = record["federated_evaluation"]
        assert evaluation["sites_summed"] == 2
        survivors = clear_total([sums[101], sums[202]])
        assert_within_bound(evaluation["combined"], survivors.combined(), survivors, 2)
        assert evaluation["combined"]["examples"] != clear_total(list(sums.values())).examples  # the drop is visible in the counts
        assert any(e["node"] == 303 and "not in the secure sum" in e["reason"] for e in evaluation["events"])
    assert rounds[1]["secure"]["sites_summed"] == 3  # the training sum is its own


def test_an_evaluation_sum_below_min_sites_is_not_combined_and_says_why(tiny_model_dir, tmp_path):
    _, rounds = run(tiny_model_dir, tmp_path / "run", MASKED, tamper={202: drops_its_masked_sums, 303: drops_its_masked_sums})
    for record in rounds:
        evaluation = record["federated_evaluation"]
        assert evaluation["combined"] == {} and evaluation["sites_summed"] == 0
        reasons = [e["reason"] for e in evaluation["events"] if e["node"] == 0]
        assert reasons == [
            f"evaluation secure sum {EVALUATION_SESSIONS + record['round']}: 1 nodes answered its 'collect' stage, below the 2 it needs "
            "(the threshold 2, federation.min_sites 2); not aggregated",
            "0 sites' evaluation sums, below federation.min_sites = 2: not combined",
        ]


def masked_sum(sites: dict[int, dict[str, torch.Tensor]], layout: Layout, session: int = EVALUATION_SESSIONS + 1):
    """The secure sum of the sites' tensors, every node in memory."""
    server = SecureSumServer(session, list(sites), 2, 2, QUANTIZER, layout)
    nodes = {n: SecureSumNode(n) for n in sites}
    for n, node in nodes.items():
        server.receive_keys(n, node.answer_setup(Setup.read(server.setup.record())))
    directory = server.directory()
    for n, node in nodes.items():
        server.receive_shares(n, node.answer_directory(directory))
    forwarded = server.forwarded()
    for n, node in nodes.items():
        server.receive_masked(n, node.answer_collect(forwarded[n], sites[n]))
    request = server.unmask_request()
    for n, node in nodes.items():
        server.receive_unmask(n, node.answer_unmask(request))
    return server.result()[0]


def test_large_sums_are_summed_exactly_in_their_counts_and_within_the_bound_in_their_floats():
    """Token counts and nll sums far beyond privacy.secure_clip_range (64 here): the counts exact, the
    nll within the K quantisation steps the protocol states, whatever its size."""
    categories = ("a", "b")
    sites = [
        EvaluationSums(900, {"test": Ratio(3_123_456.789, 1_000_003), "val": Ratio(12.5, 7)}, 301.25, {"exact_match": Ratio(450, 900), "exact_match/a": Ratio(17, 40)}, 1, 3),
        EvaluationSums(2, {"test": Ratio(0.001, 1)}, 0.5, {"exact_match": Ratio(1, 2)}, 2, 2),
        EvaluationSums(77, {"test": Ratio(99_999.999, 40_000)}, 70.0, {"exact_match": Ratio(7, 77), "exact_match/b": Ratio(5, 30)}),
    ]
    layout = masked_layout(categories)
    total = EvaluationSums.of_total(masked_sum({n: s.tensors(categories) for n, s in enumerate(sites, 1)}, layout), categories)
    clear = sites[0] + sites[1] + sites[2]
    assert (total.examples, total.withheld_categories, total.withheld_examples) == (clear.examples, 3, 5)
    assert total.exact_match == {key: clear.exact_match.get(key, Ratio(0, 0)) for key in total.exact_match}
    for split in ("test", "val"):
        assert total.losses[split].count == clear.losses[split].count
        assert abs(total.losses[split].total - clear.losses[split].total) <= QUANTIZER.bound(3)
    assert abs(total.rouge_l - clear.rouge_l) <= QUANTIZER.bound(3)
    # The bound tells: one site's fraction missing is far outside it.
    assert abs(total.losses["test"].total - (clear.losses["test"].total - 0.789)) > 100 * QUANTIZER.bound(3)


def test_a_value_the_encoding_cannot_hold_is_refused_in_one_line():
    categories = ("a",)
    layout = masked_layout(categories)
    too_many = EvaluationSums(1, {"test": Ratio(1.0, 2**31)}).tensors(categories)
    with pytest.raises(ValueError, match=r"^count test:tokens is not an integer in \[0, 1431655765\], which a secure sum of 3 inputs holds exactly$"):
        layout.encode(too_many, QUANTIZER, 3)
    with pytest.raises(ValueError, match=r"^sum exact_match/b:correct is outside the layout of categories \['a'\] \(EvaluationSums.in_layout\)$"):
        EvaluationSums(4, exact_match={"exact_match/b": Ratio(1, 4)}).tensors(categories)
    # A category outside the run's is withheld, not sent.
    assert EvaluationSums(4, exact_match={"exact_match/b": Ratio(1, 4)}).in_layout(categories).withheld_examples == 4


def test_a_site_refuses_a_layout_or_session_that_is_not_the_evaluation_sums():
    layout = masked_layout(("a",))
    assert layout_categories(layout) == ("a",)
    wider = Layout(layout.shapes + (("exact_match/b:count", ()),), layout.counts)
    with pytest.raises(ProtocolRefused, match="^the secure-sum layout is not the evaluation sums' layout$"):
        layout_categories(wider)
    # A training sum's setup whose session is an evaluation's: a site's keys never serve two kinds of sum.
    upload = {"x": torch.zeros(2, dtype=torch.float64)}
    setup = Setup(EVALUATION_SESSIONS + 3, [5, 6, 7], 2, CLIP_RANGE, BITS, Layout.of(upload))
    with pytest.raises(ProtocolRefused, match=rf"^a setup for secure sum {EVALUATION_SESSIONS + 3}, which is not a session of this kind of sum$"):
        answer_setup(Context(1, 5, {}, RecordDict(), {}), setup.record(), upload)
    assert setup.record()["layout"] == json.dumps([["x", [2]]])  # a training layout has no counts
    assert json.loads(Setup(1, [5], 1, 1.0, 8, layout).record()["layout"])[0][2:] == ["count"]
    assert Setup.read(Setup(1, [5], 1, 1.0, 8, layout).record()).layout == layout
    record = Setup(1, [5], 1, 1.0, 8, layout).record()
    record["layout"] = json.dumps([["x", [], "float"]])
    with pytest.raises(ProtocolRefused, match=r"^the secure-sum layout cannot be read \(an entry's kind is not 'count'\)$"):
        Setup.read(record)


EVALUATION_LAYOUT = masked_layout(EMBEDDED_CATEGORIES)


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (None, "privacy.secure_aggregation: the evaluate instruction carries no secure-sum setup"),
        (Setup(1, [21, 22, 23], 2, CLIP_RANGE, BITS, EVALUATION_LAYOUT), "a setup for secure sum 1, which is not a session of this kind of sum"),
        (
            Setup(EVALUATION_SESSIONS + 1, [21, 22, 23], 2, CLIP_RANGE, BITS, Layout(EVALUATION_LAYOUT.shapes[1:], EVALUATION_LAYOUT.counts)),
            "the secure-sum layout is not the evaluation sums' layout",
        ),
    ],
    ids=["no-setup", "a-training-session", "another-layout"],
)
def test_a_site_refuses_an_evaluate_instruction_without_the_sums_setup_in_one_line(tiny_model_dir, tmp_path, setup, reason):
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist-secure", MASKED)
    pristine = {n: m.weight.detach().clone() for n, m in base_model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    update = random_update(pristine, 3, 1.5, seed=1)
    message = instruction(config, base_model, 1, 21, [update], {update_key(1): update}, kind=MessageType.EVALUATE)
    if setup is not None:
        message.content[SECURE_SUM] = setup.record()
    state = context(21, partition=1)
    reply = evaluate_round(config, message, state)
    assert reply.has_error() and reply.error.reason == reason
    assert not state.state.keys()  # refused before any key was made or kept


def test_flowers_ray_simulation_engine_masks_the_evaluation_sums_and_totals_the_clear_ones(tiny_model_dir, tmp_path, clear_run):
    """federation.engine = "ray" (each node's Context state kept by Flower's simulation engine between
    the evaluation's setup, share, collect and unmask): the base model's masked total is the clear
    sites' total within the quantisation bound (the same sites evaluate the same base on either engine)."""
    from florist.federation.simulation import run_federation

    # Ray starts its workers within the first stage: a round timeout above its start-up at load.
    ray = ['federation.engine="ray"', "federation.workers=2", "federation.round_timeout=300"]
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist-secure", *RUN, MASKED, *ray)
    rounds = read_rounds(run_federation(config))
    base = rounds[0]["federated_evaluation"]
    clear_sites, clear_rounds = clear_run
    # The four stages ran: keys, shares and masked vectors up, against the clear sums alone.
    assert rounds[0]["communication"]["up_bytes"] > 2 * clear_rounds[0]["communication"]["up_bytes"]
    total = clear_total([sums.in_layout(EMBEDDED_CATEGORIES).tensors(EMBEDDED_CATEGORIES) for sums in clear_sites.values()])
    assert base["sites_summed"] == 3
    assert_within_bound(base["combined"], clear_rounds[0]["federated_evaluation"]["combined"], total, 3)


def test_a_runs_own_categories_set_the_layout_and_bad_names_are_refused_in_one_line():
    from florist.config import load_config
    from florist.federation.evaluation_sums import DOLLY_CATEGORIES, run_categories

    mine = load_config(None, ['privacy.masked_categories=["support", "billing"]'])
    assert run_categories(mine) == ("billing", "support")  # sorted: the order layout_categories reads back
    assert layout_categories(masked_layout(run_categories(mine))) == ("billing", "support")
    assert run_categories(load_config(None, ['data.source="dolly"', 'data.test_source="dolly"'])) == DOLLY_CATEGORIES
    for names, message in (
        ('["a/b"]', r"privacy.masked_categories: 'a/b' is not a category name \(empty, or holding '/' or ':'\)"),
        ('[" "]', r"privacy.masked_categories: ' ' is not a category name"),
        ('["a", "a"]', r"privacy.masked_categories names a category twice: \['a', 'a'\]"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            load_config(None, [f"privacy.masked_categories={names}"])
        assert "\n" not in str(error.value)
