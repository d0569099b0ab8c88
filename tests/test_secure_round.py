"""florist-secure rounds with privacy.secure_aggregation, on the real ServerApp loop and ClientApp in
this process (local_grid.py): the secure sum against the clear sum, sites dropping out mid-protocol,
a round below the threshold, what the server receives, the bytes recorded, the sites' training
totals in place of their own numbers, the node's protocol state through Flower's Context
serialisation, the switch's configuration, and one round on Flower's Ray simulation engine."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto

from florist.aggregation.sketch import WEIGHT, SketchSum
from florist.config import load_config
from florist.federation import secure_site, sketch_round
from florist.federation.client_app import build_client_app
from florist.federation.messages import ADAPTER, METRICS, SECURE_SUM, SECURE_SUM_TYPE
from florist.federation.secure_site import load_node, save_node
from florist.federation.secure_sum import Layout, MaskedInput, Quantizer, SecureSumServer
from florist.federation.secure_sum.protocol import COLLECT, UNMASK, stage_of
from florist.federation.server_app import serve
from florist.federation.sketch_round import CUT
from florist.federation.strategy import RoundFailed
from florist.federation.training_totals import CLEAR_METRICS, read_totals, summed_layout
from florist.reporting.run_directory import read_rounds

from deployment import federation_keys
from federations import federation_config
from test_secure_evaluation import numbers
from local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("server_task")

NODES = {101: 0, 202: 1, 303: 2}
CLIP_RANGE, BITS = 64.0, 24
"""The tiny federation's uploads stay below 40 in magnitude (example-weighted sketches of 4 to 21
examples): a range of 64 holds them, and at 24 bits a value is rounded to a step of 7.6e-6."""
QUANTIZER = Quantizer(CLIP_RANGE, BITS)
DP_CLIP_NORM = 1.8
"""Between the smallest (1.54) and the middle (2.07) of the three sites' update norms in round 1 (the test checks it)."""
SECURE = ["privacy.secure_aggregation=true", f"privacy.secure_clip_range={CLIP_RANGE}", f"privacy.secure_bits={BITS}"]
ONE_ROUND = ["federation.rounds=1", "federation.round_retries=0", "federation.round_timeout=10", "evaluation.base=false", "evaluation.server=false"]


class Recorded:
    """What the sites upload and what the server sums, as a run goes (both patched, not changed)."""

    def __init__(self, monkeypatch):
        self.uploads: dict[int, dict[str, torch.Tensor]] = {}
        """Per node, its clear upload: the sketches a secure site keeps to mask, or a clear site's reply."""
        self.sums: list[dict[str, torch.Tensor]] = []
        self.added: list[dict[str, torch.Tensor]] = []
        """Every upload the accumulator took: the sites' in the clear, or the one unmasked sum."""
        result, add, answer_setup = SketchSum.result, SketchSum.add, secure_site.answer_setup

        def recording_result(summed):
            self.sums.append({key: value.clone() for key, value in summed.sums.items()})
            return result(summed)

        def recording_add(summed, upload):
            self.added.append({key: value.double().clone() for key, value in upload.items()})
            return add(summed, upload)

        def recording_setup(context, record, upload):
            self.uploads[context.node_id] = {key: value.double().clone() for key, value in upload.items()}
            return answer_setup(context, record, upload)

        monkeypatch.setattr(SketchSum, "result", recording_result)
        monkeypatch.setattr(SketchSum, "add", recording_add)
        monkeypatch.setattr(secure_site, "answer_setup", recording_setup)
        monkeypatch.setattr("florist.federation.client_app.answer_setup", recording_setup)


class CapturingGrid(LocalGrid):
    """Every message the server sends and every reply it receives, as they cross the grid."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.received.extend(replies)
        return replies


def run(tiny_model_dir, path, *extra, grid_class=LocalGrid, tamper=None):
    config = federation_config(tiny_model_dir, path, "florist-secure", *ONE_ROUND, *extra)
    grid = grid_class(build_client_app(config), {node: {"partition-id": p} for node, p in NODES.items()})
    for node, how in (tamper or {}).items():
        grid.nodes[node].tamper = how
    return grid, read_rounds(serve(config, grid))[1]


def plain_sum(uploads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The sketches and weights summed; the sites' cut flags are counted beside the sum (weight_level.WeightLevel)."""
    return {key: sum(upload[key] for upload in uploads) for key in uploads[0] if key != CUT}


def largest_difference(a, b) -> float:
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def within_quantisation(secure: dict, clear: dict, sites: int) -> None:
    """Each summed value within `sites` quantisation steps (each site's stochastic rounding moves its
    value by less than one step, Quantizer.bound), plus the float32 rounding of the sum as the
    accumulator takes it (the sites' uploads are float32 too): 2**-23 of the value."""
    for key in clear:
        allowed = QUANTIZER.bound(sites) + clear[key].abs() * 2**-23
        assert ((secure[key].double() - clear[key].double()).abs() <= allowed).all(), key


@pytest.fixture(scope="module")
def clear_round(tiny_model_dir, tmp_path_factory) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """Each site's upload in the same round summed in the clear (privacy.secure_aggregation off), and the round's record."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        recorded = Recorded(monkeypatch)
        grid, record = run(tiny_model_dir, tmp_path_factory.mktemp("clear") / "run", grid_class=CapturingGrid)
    finally:
        monkeypatch.undo()
    uploads = {}
    for reply in grid.received:
        adapter = reply.content[ADAPTER]
        uploads[reply.metadata.src_node_id] = {key: torch.from_numpy(array.numpy()).double() for key, array in adapter.items()}
    assert len(recorded.sums) == 1 and len(uploads) == 3
    torch.testing.assert_close(plain_sum(list(uploads.values())), recorded.sums[0], rtol=0, atol=1e-12)
    return uploads, record


@pytest.fixture(scope="module")
def clear_uploads(clear_round) -> dict[int, dict[str, torch.Tensor]]:
    return clear_round[0]


def sketches_of(summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A secure site's upload as the clear round's: its weight one scalar again, its totals left out."""
    return read_totals(summed)[0]


def test_the_secure_round_sums_what_the_clear_round_sums_within_the_quantisation_bound(tiny_model_dir, tmp_path, monkeypatch, clear_uploads):
    recorded = Recorded(monkeypatch)
    _, record = run(tiny_model_dir, tmp_path / "run", *SECURE)
    assert record["secure"]["sites_summed"] == 3 and record["secure"]["keys_signed"] == 0 and len(record["clients"]) == 3
    # The sites sketched exactly what they upload in the clear round: the runs differ only in the summing.
    for node, upload in recorded.uploads.items():
        torch.testing.assert_close(sketches_of(upload), clear_uploads[node], rtol=0, atol=1e-12)
    [secure] = recorded.sums
    clear = plain_sum(list(clear_uploads.values()))
    within_quantisation(secure, clear, 3)
    # The bound is tight enough to tell: the sum without one site is far outside it.
    assert largest_difference(secure, plain_sum([clear_uploads[101], clear_uploads[202]])) > 1000 * QUANTIZER.bound(3)


def drops_its_masked_input(instruction: Message, reply: Message) -> Message | None:
    """Masks its sketches (the reply is made), then is gone before the server receives it."""
    if instruction.metadata.message_type == SECURE_SUM_TYPE and stage_of(instruction.content[SECURE_SUM]) == COLLECT:
        return None
    return reply


def fails_at_unmasking(instruction: Message, reply: Message) -> Message:
    if instruction.metadata.message_type == SECURE_SUM_TYPE and stage_of(instruction.content[SECURE_SUM]) == UNMASK:
        return Message(Error(code=1, reason="the site went away"), reply_to=instruction)
    return reply


@pytest.mark.parametrize(
    ("tamper", "summed"),
    [(drops_its_masked_input, [101, 202]), (fails_at_unmasking, [101, 202, 303])],
    ids=["dropped-after-masking", "silent-at-unmasking"],
)
def test_a_site_failing_after_masking_leaves_the_sum_correct_over_the_sites_whose_input_the_server_holds(
    tiny_model_dir, tmp_path, monkeypatch, clear_uploads, tamper, summed
):
    """Site 303 masks its sketches and then fails: before its masked input reaches the server (the
    others' shares of its mask key remove its pairwise masks; the sum is over 101 and 202), or at
    unmasking, its masked input already held (the others' shares of its seed remove its self mask;
    it stays in the sum)."""
    recorded = Recorded(monkeypatch)
    _, record = run(tiny_model_dir, tmp_path / "run", *SECURE, tamper={303: tamper})
    [secure] = recorded.sums
    within_quantisation(secure, plain_sum([clear_uploads[node] for node in summed]), len(summed))
    assert record["secure"]["sites_summed"] == len(summed)
    assert sorted(client["node"] for client in record["clients"]) == summed
    events = {(e["node"], e["status"]) for e in record["events"]}
    assert (303, "failed") in events
    if summed == [101, 202]:
        assert any(e["node"] == 303 and "not in the secure sum" in e["reason"] for e in record["events"])


def test_a_secure_sum_below_min_sites_is_not_aggregated_and_says_why(tiny_model_dir, tmp_path, monkeypatch):
    recorded = Recorded(monkeypatch)
    with pytest.raises(RoundFailed, match=r"^round 1: secure sum 1: 1 nodes answered its 'collect' stage, below the 2 it needs \(the threshold 2, federation.min_sites 2\); not aggregated$"):
        run(tiny_model_dir, tmp_path / "run", *SECURE, tamper={202: drops_its_masked_input, 303: drops_its_masked_input})
    assert recorded.sums == [] and recorded.added == []


def test_the_server_receives_no_sites_sketch_and_records_every_protocol_byte(tiny_model_dir, tmp_path, monkeypatch):
    """Every reply the server receives in a secure round: no clear upload, no float of a site's
    sketches, and each masked input uncorrelated with that site's (quantised) sketches. The round's
    recorded bytes are those of every protocol record both ways."""
    recorded = Recorded(monkeypatch)
    grid, record = run(tiny_model_dir, tmp_path / "run", *SECURE, grid_class=CapturingGrid)
    assert len(grid.received) == 4 * len(NODES)  # keys, shares, masked input, unmasking shares
    masked = {}
    for reply in grid.received:
        assert set(reply.content.keys()) <= {"identity", "metrics", SECURE_SUM}, reply.content.keys()
        secure = reply.content[SECURE_SUM]
        everything = b"".join(v if isinstance(v, bytes) else b"".join(x for x in v if isinstance(x, bytes)) if isinstance(v, list) else b"" for v in secure.values())
        for tensor in recorded.uploads[reply.metadata.src_node_id].values():
            if tensor.numel() >= 4:  # a scalar's 4 bytes (the weight, the cut flag 0.0) turn up by chance among ids and keys
                assert tensor.float().numpy().tobytes()[:16] not in everything
        if stage_of(secure) == COLLECT:
            masked[reply.metadata.src_node_id] = MaskedInput.read(secure).vector
    assert len(masked) == 3
    for node, vector in masked.items():
        upload = recorded.uploads[node]
        sketch_shapes = {key: tuple(value.shape) for key, value in upload.items() if key.endswith((":range", ":corange", ":dense"))}
        encoded = summed_layout(sketch_shapes).encode(upload, QUANTIZER, len(NODES)).astype(np.float64)
        correlation = np.corrcoef(vector.astype(np.float64), encoded)[0, 1]
        # Uniform masks: the correlation of independent vectors, within 5 standard errors of 0.
        assert abs(correlation) < 5 / np.sqrt(vector.size), (node, correlation)
        assert abs(np.corrcoef(encoded, encoded + 0.0)[0, 1]) > 0.99  # the measure sees a clear upload
    down = sum(message.content[SECURE_SUM].count_bytes() for message in grid.sent)
    up = sum(reply.content[SECURE_SUM].count_bytes() for reply in grid.received)
    assert record["communication"] == {"down_bytes": down, "up_bytes": up}
    assert down > 0 and up > 4 * Layout.of(recorded.uploads[101]).size * len(NODES)  # the masked inputs alone
    # Each site's entry holds what it sent and received over all four stages, not its keys alone.
    for client in record["clients"]:
        node = client["node"]
        assert client["bytes_up"] == sum(r.content[SECURE_SUM].count_bytes() for r in grid.received if r.metadata.src_node_id == node)
        assert client["bytes_down"] == sum(m.content[SECURE_SUM].count_bytes() for m in grid.sent if m.metadata.dst_node_id == node)
    assert sum(client["bytes_up"] for client in record["clients"]) == up


def test_a_secure_sum_round_shows_the_server_only_the_totals_of_the_sites_training(tiny_model_dir, tmp_path, monkeypatch, capfd, clear_round):
    """Every train reply the server receives carries in the clear only training_totals.CLEAR_METRICS;
    metrics.jsonl, summary.json and the server's console hold no site's examples, train loss, train
    tokens or weight, but the round's totals, equal to the same round's summed in the clear: examples
    and tokens exactly, the weighted train loss within the quantisation bound."""
    Recorded(monkeypatch)
    capfd.readouterr()
    grid, record = run(tiny_model_dir, tmp_path / "run", *SECURE, grid_class=CapturingGrid)
    console = capfd.readouterr().err
    _, clear = clear_round
    sites = clear["clients"]  # each site's own numbers: the sites train alike in both runs (the first test)
    assert len(sites) == 3 and len({site["train_loss"] for site in sites}) == 3
    examples, tokens = sum(site["examples"] for site in sites), sum(site["train_tokens"] for site in sites)
    # The loss times weight and the weight each carry a quantised fraction: within 3 steps each.
    bound = QUANTIZER.bound(3) * (1 + clear["train_loss"]) / examples
    assert record["totals"] == {"examples": examples, "train_tokens": tokens, "train_loss": pytest.approx(clear["train_loss"], abs=bound)}
    assert record["train_loss"] == record["totals"]["train_loss"] and "sites_clipped" not in record["totals"]

    trained = [reply.content[METRICS] for reply in grid.received if METRICS in reply.content]
    assert len(trained) == 3
    for metrics in trained:
        assert set(metrics.keys()) == set(CLEAR_METRICS), sorted(metrics.keys())
    assert all(set(client) == {"partition", "node", "rank", "bytes_down", "bytes_up"} for client in record["clients"])

    stored = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stored.append(json.loads((tmp_path / "run" / "summary.json").read_text()))
    recorded_numbers = set(numbers(stored))
    for site in sites:
        # (A site's examples and weight, 4 to 21, are numbers that turn up in any record: no record has their keys, above.)
        assert site["train_loss"] not in recorded_numbers and site["train_tokens"] not in recorded_numbers
        assert not re.search(rf"\b{site['examples']} examples", console)
        if f"{site['train_loss']:.3f}" != f"{clear['train_loss']:.3f}":  # one site's is the mean's, at the console's 3 places
            assert f"{site['train_loss']:.3f}" not in console
        assert f"{site['train_tokens']} train tokens" not in console
    assert f"secure sum of 3 sites: {examples} examples, {tokens} train tokens, weighted train loss {clear['train_loss']:.3f}" in console


def test_under_dp_the_server_reads_how_many_sites_were_clipped_and_no_sites_clip_factor(tiny_model_dir, tmp_path, monkeypatch):
    """privacy.dp with the secure sum: each site's clip factor stays with it; the round records the
    number of sites whose update was clipped (here 2 of 3, at a clip norm between the sites' norms)."""
    factors: dict[int, float] = {}
    clip = sketch_round.clip_to_norm

    def recording_clip(modules, clip_norm):
        clipped, factor = clip(modules, clip_norm)
        factors[len(factors)] = factor
        return clipped, factor

    monkeypatch.setattr(sketch_round, "clip_to_norm", recording_clip)
    grid, record = run(
        tiny_model_dir, tmp_path / "run", *SECURE, "privacy.dp=true", f"privacy.clip_norm={DP_CLIP_NORM}", "privacy.noise_multiplier=1.0",
        grid_class=CapturingGrid,
    )
    assert sorted(factor < 1 for factor in factors.values()) == [False, True, True]
    assert record["totals"]["sites_clipped"] == 2
    assert "server_epsilon" not in record["secure"]["privacy"]  # the server reads only the sum
    for reply in grid.received:
        assert "dp-clip-factor" not in reply.content.get(METRICS, {})


def test_the_nodes_protocol_state_survives_flowers_context_serialisation(tmp_path):
    """A SuperNode's Context state is serialised between messages (and to the site worker and back):
    a sum whose nodes reload their state from a serialised Context at every stage, signing with the
    node keys their node configs name, is the plain sum."""
    tensors = {n: {"x": torch.randn(3, 5, dtype=torch.float64) * 0.1, WEIGHT: torch.tensor(1.0 + n % 5, dtype=torch.float64)} for n in (11, 22, 33)}
    layout = Layout.of(tensors[11])
    server = SecureSumServer(4, list(tensors), 2, 2, QUANTIZER, layout)
    keys, peers = federation_keys(tmp_path, len(tensors))
    signed = {n: {"secure-sum-key": str(key), "secure-sum-peers": str(peers)} for n, key in zip(tensors, keys)}
    contexts = {n: Context(1, n, signed[n], RecordDict(), {}) for n in tensors}

    def step(node: int, answer):
        context = context_from_proto(context_to_proto(contexts[node]))
        state = load_node(context)
        assert state.signing is not None
        reply = answer(state)
        save_node(context.state, state)
        contexts[node] = context
        return reply

    for n in tensors:
        server.receive_keys(n, step(n, lambda s: s.answer_setup(server.setup)))
        assert server.keys[n] and server.signatures[n]
    directory = server.directory()
    for n in tensors:
        server.receive_shares(n, step(n, lambda s: s.answer_directory(directory)))
    forwarded = server.forwarded()
    for n in (11, 22):  # 33 drops after its shares went out
        server.receive_masked(n, step(n, lambda s: s.answer_collect(forwarded[n], tensors[n])))
    request = server.unmask_request()
    for n in request.survivors:
        server.receive_unmask(n, step(n, lambda s: s.answer_unmask(request)))
    total, survivors = server.result()
    assert survivors == [11, 22]
    within_quantisation(total, plain_sum([tensors[11], tensors[22]]), 2)
    assert load_node(contexts[11]).expects == ""  # the sum is done: a replayed request is refused
    assert load_node(Context(1, 7, {}, RecordDict(), {})).signing is None  # a fresh, unsigned node


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.secure_aggregation=true"], 'privacy.secure_aggregation needs aggregation.method = "florist-secure", whose uploads are sums; not \'florist\''),
        (["aggregation.method=\"florist-secure\"", "privacy.secure_aggregation=true", "privacy.secure_bits=31", "federation.num_clients=3", "federation.ranks=[4]"],
         "privacy.secure_bits 31: a secure sum of 3 sites (federation.sample_size) overflows 32 bits; at most 2 sites fit, use fewer bits"),
        (["aggregation.method=\"florist-secure\"", "privacy.secure_aggregation=true", "privacy.secure_bits=31", "federation.num_clients=3",
          "federation.clients_per_round=2", "federation.ranks=[4]", "evaluation.federated=true"],
         "privacy.secure_bits 31: a secure sum of 3 sites (federation.num_clients) overflows 32 bits; at most 2 sites fit, use fewer bits"),
        (["privacy.secure_threshold=0.5"], "privacy.secure_threshold: Input should be greater than 0.5 (got 0.5)"),
        (["privacy.secure_clip_range=inf"], "privacy.secure_clip_range: Input should be a finite number (got inf)"),
    ],
)
def test_secure_aggregation_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_flowers_ray_simulation_engine_runs_the_secure_sums_stages(tiny_model_dir, tmp_path, clear_round):
    """federation.engine = "ray" (Flower's simulation engine, each node's Context state kept by it
    between messages) through setup, share, collect and unmask: the round sums all three sites, and
    its totals are the clear round's (the same sites train alike on either engine)."""
    from florist.federation.simulation import run_federation

    # Ray starts its workers within the first stage: a round timeout above its start-up at load.
    ray = ['federation.engine="ray"', "federation.workers=2", "federation.round_timeout=300"]
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist-secure", *ONE_ROUND, *SECURE, *ray)
    record = read_rounds(run_federation(config))[1]
    _, clear = clear_round
    assert record["secure"]["sites_summed"] == 3 and len(record["clients"]) == 3
    assert record["totals"]["examples"] == sum(site["examples"] for site in clear["clients"])
    assert record["totals"]["train_tokens"] == sum(site["train_tokens"] for site in clear["clients"])
    assert record["totals"]["train_loss"] == pytest.approx(clear["train_loss"], rel=1e-4)
    assert record["ranks"] == clear["ranks"]
