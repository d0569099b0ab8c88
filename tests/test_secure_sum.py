"""The secure sum's protocol in process, without a model: the server's sum against the plain sum,
dropout, the threshold, what one masked upload reveals, and hostile messages refused one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message

from florist.federation.intake import guarded
from florist.federation.reports import Stage
from florist.federation.secure_sum import (
    EncryptedShares,
    Layout,
    MaskedInput,
    NodeSigning,
    ProtocolRefused,
    PublicKeys,
    Quantizer,
    SecureSumFailed,
    SecureSumNode,
    SecureSumServer,
    Setup,
    UnmaskRequest,
    UnmaskShares,
)
from florist.federation.secure_sum.protocol import ForwardedShares, KeyDirectory
from florist.federation.secure_sum.server import threshold_for
from florist.federation.secure_sum.signing import signed_message

QUANTIZER = Quantizer(clip_range=1.0, bits=20)


def inputs(count: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Per node (ids near 2**64, as Flower's are), tensors at scales from 1e-3 to ~0.5."""
    generator = torch.Generator().manual_seed(seed)
    nodes = [2**64 - 1 - 7 * index for index in range(count)]
    return {
        node: {
            "q.A": torch.randn(4, 6, generator=generator, dtype=torch.float64) * 10 ** -(1 + index % 3) / 2,
            "q.B": torch.randn(6, 4, generator=generator, dtype=torch.float64) * 10 ** -(index % 3) / 5,
            "n": torch.tensor([0.09 * (index + 1)], dtype=torch.float64),
        }
        for index, node in enumerate(nodes)
    }


class Run:
    """A server and its nodes, each message passed through its Flower record as on the wire."""

    def __init__(
        self, tensors: dict[int, dict[str, torch.Tensor]], fraction: float = 2 / 3, min_sites: int = 2, signing: dict[int, NodeSigning] = {}
    ):
        self.tensors = tensors
        self.nodes = {node: SecureSumNode(node, signing=signing[node]) if node in signing else SecureSumNode(node) for node in tensors}
        layout = Layout.of(next(iter(tensors.values())))
        self.server = SecureSumServer(1, list(tensors), threshold_for(len(tensors), fraction, min_sites), min_sites, QUANTIZER, layout)

    def through_setup(self) -> None:
        setup = Setup.read(self.server.setup.record())
        for node, site in self.nodes.items():
            self.server.receive_keys(node, PublicKeys.read(site.answer_setup(setup).record()))

    def through_share(self) -> dict[int, ForwardedShares]:
        self.through_setup()
        directory = KeyDirectory.read(self.server.directory().record())
        for node, site in self.nodes.items():
            self.server.receive_shares(node, EncryptedShares.read(site.answer_directory(directory).record()))
        return {node: ForwardedShares.read(message.record()) for node, message in self.server.forwarded().items()}

    def through_collect(self, dropping: set[int] = frozenset()) -> UnmaskRequest:
        forwarded = self.through_share()
        for node, site in self.nodes.items():
            upload = site.answer_collect(forwarded[node], self.tensors[node])
            if node not in dropping:
                self.server.receive_masked(node, MaskedInput.read(upload.record()))
        return UnmaskRequest.read(self.server.unmask_request().record())

    def summed(self, dropping: set[int] = frozenset(), silent: set[int] = frozenset()):
        request = self.through_collect(dropping)
        for node in request.survivors:
            if node not in silent:
                self.server.receive_unmask(node, UnmaskShares.read(self.nodes[node].answer_unmask(request).record()))
        return self.server.result()


def plain_sum(tensors, nodes):
    return {name: sum(tensors[node][name] for node in nodes) for name in tensors[nodes[0]]}


def assert_within_bound(secure, plain, count):
    for name in plain:
        error = (secure[name] - plain[name]).abs().max().item()
        assert error <= QUANTIZER.bound(count), (name, error, QUANTIZER.bound(count))


@pytest.mark.parametrize("count", range(3, 11))
def test_the_sum_is_the_plain_sum_within_the_quantisation_bound(count):
    tensors = inputs(count, seed=count)
    total, survivors = Run(tensors).summed()
    assert survivors == sorted(tensors)
    assert_within_bound(total, plain_sum(tensors, survivors), count)


def test_the_bound_is_tight_enough_to_tell_a_missing_input():
    """The check can fail: a sum without one node's input is far outside the bound."""
    tensors = inputs(4)
    total, survivors = Run(tensors).summed()
    without = plain_sum(tensors, survivors[1:])
    assert max((total[name] - without[name]).abs().max().item() for name in without) > 100 * QUANTIZER.bound(4)


@pytest.mark.parametrize("dropped", [1, 2])
def test_nodes_dropping_after_masking_leave_the_sum_over_the_survivors(dropped):
    tensors = inputs(7, seed=dropped)
    dropping = set(sorted(tensors)[:dropped])
    run = Run(tensors)
    total, survivors = run.summed(dropping=dropping)
    assert survivors == sorted(set(tensors) - dropping)
    assert run.server.request.dropped == sorted(dropping)
    assert_within_bound(total, plain_sum(tensors, survivors), len(survivors))


def test_a_survivor_silent_at_unmasking_is_still_in_the_sum():
    tensors = inputs(6)
    silent = {sorted(tensors)[0]}
    total, survivors = Run(tensors).summed(silent=silent)
    assert survivors == sorted(tensors)
    assert_within_bound(total, plain_sum(tensors, survivors), 6)


def test_fewer_shares_than_the_threshold_cannot_unmask():
    tensors = inputs(6)
    run = Run(tensors)
    threshold = run.server.setup.threshold
    assert threshold == 4
    request = run.through_collect()
    for node in request.survivors[: threshold - 1]:
        run.server.receive_unmask(node, run.nodes[node].answer_unmask(request))
    with pytest.raises(SecureSumFailed, match="3 nodes sent unmasking shares, below the threshold 4"):
        run.server.result()
    # Nor do threshold - 1 of a node's shares give its seed (Shamir: any fewer points fit every secret).
    seed = run.nodes[request.survivors[0]].seed
    shares = [run.server.unmask_shares[node][request.survivors[0]] for node in run.server.unmask_shares]
    try:
        assert combine_shares(shares) != seed
    except ValueError:
        pass  # the wrong polynomial's padding does not even unpad
    assert combine_shares(create_shares(seed, 4, 6)[:4]) == seed


def test_a_round_below_min_sites_or_the_threshold_is_not_aggregated():
    tensors = inputs(5)
    run = Run(tensors, min_sites=5)
    with pytest.raises(SecureSumFailed, match=r"4 nodes answered its 'collect' stage, below the 5 it needs .*federation.min_sites 5"):
        run.through_collect(dropping={sorted(tensors)[0]})


def test_a_masked_upload_is_uncorrelated_with_its_input():
    """Over many sums, one node's masked upload against its input: correlation near 0 (the
    unmasked quantised input, the control, correlates fully)."""
    draws, generator = 150, np.random.default_rng(5)
    xs, masked, quantised = [], [], []
    for _ in range(draws):
        tensors = inputs(3, seed=int(generator.integers(1 << 30)))
        node = sorted(tensors)[0]
        run = Run(tensors)
        forwarded = run.through_share()
        upload = run.nodes[node].answer_collect(forwarded[node], tensors[node])
        x = Layout.of(tensors[node]).flatten(tensors[node])
        xs.append(x), masked.append(upload.vector.astype(np.float64)), quantised.append(QUANTIZER.encode(x).astype(np.float64))
    xs, masked, quantised = np.concatenate(xs), np.concatenate(masked), np.concatenate(quantised)
    assert abs(np.corrcoef(xs, masked)[0, 1]) < 4 / np.sqrt(xs.size)
    assert np.corrcoef(xs, quantised)[0, 1] > 0.99
    # and uniform over the modulus: its mean is half of 2**32
    assert abs(masked.mean() / 2**32 - 0.5) < 4 * np.sqrt(1 / 12 / masked.size)


# -- hostile messages: each refused at the reply boundary, in one line, and the sum goes on ------


def refusals(stage: Stage) -> list[str]:
    return [event.reason for event in stage.events if event.status == "rejected"]


def test_hostile_replies_are_refused_one_by_one_and_the_sum_goes_on():
    tensors = inputs(5)
    run = Run(tensors)
    nodes = sorted(tensors)
    stage = Stage(round=1)
    setup = run.server.setup
    keys = {node: run.nodes[node].answer_setup(setup) for node in nodes}
    for node in nodes:
        guarded(stage, node, lambda node=node: run.server.receive_keys(node, keys[node]) or [])
    guarded(stage, nodes[0], lambda: run.server.receive_keys(nodes[0], keys[nodes[0]]) or [])  # replayed
    guarded(stage, 12345, lambda: run.server.receive_keys(12345, keys[nodes[0]]) or [])  # never asked
    directory = run.server.directory()
    shares = {node: run.nodes[node].answer_directory(directory) for node in nodes}
    stranger = EncryptedShares(1, dict(shares[nodes[1]].ciphertexts) | {999: b"x"})
    guarded(stage, nodes[1], lambda: run.server.receive_shares(nodes[1], stranger) or [])  # shares for an unknown node
    guarded(stage, nodes[2], lambda: run.server.receive_masked(nodes[2], MaskedInput(1, np.zeros(3, np.uint32))) or [])  # a stage ahead
    for node in nodes:
        guarded(stage, node, lambda node=node: run.server.receive_shares(node, shares[node]) or [])
    forwarded = run.server.forwarded()
    uploads = {node: run.nodes[node].answer_collect(forwarded[node], tensors[node]) for node in nodes}
    short = MaskedInput(1, uploads[nodes[3]].vector[:-1])
    guarded(stage, nodes[3], lambda: run.server.receive_masked(nodes[3], short) or [])  # wrong size
    guarded(stage, nodes[4], lambda: run.server.receive_masked(nodes[4], MaskedInput(2, uploads[nodes[4]].vector)) or [])  # another sum
    for node in nodes:
        guarded(stage, node, lambda node=node: run.server.receive_masked(node, uploads[node]) or [])
    request = run.server.unmask_request()
    answers = {node: run.nodes[node].answer_unmask(request) for node in nodes}
    partial = UnmaskShares(1, dict(list(answers[nodes[0]].shares.items())[:-1]))
    guarded(stage, nodes[0], lambda: run.server.receive_unmask(nodes[0], partial) or [])
    for node in nodes:
        guarded(stage, node, lambda node=node: run.server.receive_unmask(node, answers[node]) or [])
    total, survivors = run.server.result()
    assert survivors == nodes
    assert_within_bound(total, plain_sum(tensors, nodes), 5)
    assert refusals(stage) == [
        f"node {nodes[0]} already answered the secure sum's 'setup' stage",
        "node 12345 was not asked at the secure sum's 'setup' stage",
        f"node {nodes[1]} sent shares for nodes outside the directory [999]",
        "a 'collect' reply while the secure sum is at 'share'",
        f"node {nodes[3]} sent a masked input of {short.vector.size} values, not {short.vector.size + 1}",
        "a secure-sum reply for sum 2, not 1",
        f"node {nodes[0]} sent shares for nodes {sorted(partial.shares)}, not the 5 nodes asked",
    ]
    assert all("\n" not in reason for reason in refusals(stage))


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"secure-stage": "collect", "session": 1}, "the secure-sum message lacks 'vector'"),
        ({"secure-stage": "collect", "session": 1, "vector": b"abc"}, "a masked input of 3 bytes is not a whole number of uint32 values"),
        ({"secure-stage": "collect", "session": "1", "vector": b""}, "the secure-sum message's 'session' is a str, not a int"),
        ({"secure-stage": "setup", "session": 1, "vector": b""}, "a 'setup' message where the secure sum expects 'collect'"),
        ({"secure-stage": "wat", "session": 1}, "unknown secure-sum stage 'wat'"),
    ],
)
def test_unreadable_messages_are_refused_in_one_line(record, reason):
    from flwr.app import ConfigRecord

    with pytest.raises(ProtocolRefused) as refused:
        MaskedInput.read(ConfigRecord(record))
    assert str(refused.value) == reason


def test_shares_naming_a_node_twice_or_an_id_outside_64_bits_are_refused():
    from flwr.app import ConfigRecord

    with pytest.raises(ProtocolRefused, match="names a node twice"):
        UnmaskShares.read(ConfigRecord({"secure-stage": "unmask", "session": 1, "nodes": ["3", "3"], "shares": [b"a", b"b"]}))
    with pytest.raises(ProtocolRefused, match="not an unsigned 64-bit integer"):
        UnmaskShares.read(ConfigRecord({"secure-stage": "unmask", "session": 1, "nodes": [str(2**64)], "shares": [b"a"]}))


# -- what a node refuses to a hostile server -----------------------------------------------------


def test_a_node_refuses_a_request_for_both_the_seed_and_the_mask_key_of_one_node():
    tensors = inputs(4)
    run = Run(tensors)
    run.through_collect()
    node, other = sorted(tensors)[:2]
    both = UnmaskRequest(1, sorted(tensors), [other])
    with pytest.raises(ProtocolRefused, match="both survivors and dropped"):
        run.nodes[node].answer_unmask(both)
    hiding = UnmaskRequest(1, [n for n in sorted(tensors) if n != other], [])
    with pytest.raises(ProtocolRefused, match="not the nodes this one masked with"):
        run.nodes[node].answer_unmask(hiding)


def test_a_node_refuses_a_low_threshold_a_replayed_stage_and_an_old_setup():
    tensors = inputs(4)
    nodes = sorted(tensors)
    layout = Layout.of(tensors[nodes[0]])
    site = SecureSumNode(nodes[0])
    with pytest.raises(ProtocolRefused, match="a threshold of 2 for 4 nodes is not above half of them"):
        site.answer_setup(Setup(1, nodes, 2, 1.0, 20, layout))
    with pytest.raises(ProtocolRefused, match="overflows the modulus"):
        site.answer_setup(Setup(1, nodes, 3, 1.0, 31, layout))
    run = Run(tensors)
    forwarded = run.through_share()
    run.nodes[nodes[0]].answer_collect(forwarded[nodes[0]], tensors[nodes[0]])
    with pytest.raises(ProtocolRefused, match="a 'collect' message where node .* expects 'unmask'"):
        run.nodes[nodes[0]].answer_collect(forwarded[nodes[0]], tensors[nodes[0]])
    with pytest.raises(ProtocolRefused, match="a setup for secure sum 1, which is not after 1"):
        run.nodes[nodes[0]].answer_setup(run.server.setup)


def test_a_node_refuses_shares_forwarded_from_another_source():
    tensors = inputs(4)
    run = Run(tensors)
    forwarded = run.through_share()
    node, a, b = sorted(tensors)[:3]
    swapped = dict(forwarded[node].ciphertexts)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    with pytest.raises(ProtocolRefused, match="cannot be decrypted"):
        run.nodes[node].answer_collect(ForwardedShares(1, swapped), tensors[node])


def test_an_input_outside_the_range_is_refused_not_clipped():
    with pytest.raises(ValueError, match=r"magnitude 1.5 is outside the secure sum's range of ±1 \(privacy.secure_clip_range\)"):
        QUANTIZER.encode(np.array([0.2, -1.5]))


def test_an_unmask_request_without_dropped_nodes_is_counted_and_read_back():
    """Flower's byte count fails on an empty list: the record leaves it out, and reads it back empty."""
    request = UnmaskRequest(3, [1, 2**64 - 1], [])
    record = request.record()
    assert record.count_bytes() > 0
    assert UnmaskRequest.read(record) == request


# -- signed public keys: a server that swaps a site's keys is refused by its peers ---------------


def signing_keys(nodes, untrusted: set[int] = frozenset()) -> dict[int, NodeSigning]:
    """Per node a P-384 node key (as SuperNodes authenticate with), each trusting the keys of every
    node but the `untrusted` ones (which still trust their own)."""
    private = {node: ec.generate_private_key(ec.SECP384R1()) for node in nodes}
    trusted = [private[node].public_key() for node in nodes if node not in untrusted]
    return {node: NodeSigning.of(private[node], trusted + ([private[node].public_key()] if node in untrusted else [])) for node in nodes}


def test_a_signed_sum_is_the_plain_sum_and_every_directory_entry_is_signed():
    tensors = inputs(5, seed=3)
    run = Run(tensors, signing=signing_keys(tensors))
    total, survivors = run.summed()
    assert survivors == sorted(tensors)
    assert_within_bound(total, plain_sum(tensors, survivors), 5)
    assert set(run.server.signatures) == set(tensors)


def swapped_directory(run: Run, victim: int, sign_with: ec.EllipticCurvePrivateKey | None = None, keep_signature: bool = True) -> KeyDirectory:
    """The directory a hostile server sends: `victim`'s two keys replaced by key pairs of its own
    (whose private halves it holds), with `victim`'s own signature kept, its own, or none."""
    directory = run.server.directory()
    _, mask_public = generate_key_pairs()
    _, share_public = generate_key_pairs()
    forged = (public_key_to_bytes(mask_public), public_key_to_bytes(share_public))
    keys = dict(directory.keys) | {victim: forged}
    signatures = dict(directory.signatures)
    if sign_with is not None:
        signatures[victim] = (public_key_to_bytes(sign_with.public_key()), sign_message(sign_with, signed_message(directory.session, victim, *forged)))
    elif not keep_signature:
        signatures.pop(victim, None)
    return KeyDirectory.read(KeyDirectory(directory.session, keys, signatures).record())


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("victim's signature kept", "node {victim}'s signature does not match its public keys in the directory (replaced on the way?)"),
        ("signed by the server", "node {victim}'s public keys are signed by a key outside secure-sum-peers"),
        ("signature left out", "node {victim}'s public keys are unsigned, and this node accepts only keys signed by secure-sum-peers"),
    ],
)
def test_every_peer_refuses_a_directory_in_which_the_server_swapped_one_sites_keys(how, reason):
    tensors = inputs(4)
    nodes = sorted(tensors)
    victim = nodes[1]
    run = Run(tensors, signing=signing_keys(nodes))
    run.through_setup()
    server_key = ec.generate_private_key(ec.SECP384R1())
    directory = swapped_directory(run, victim, server_key if how == "signed by the server" else None, how == "victim's signature kept")
    for node in nodes:
        if node == victim:
            continue  # the victim itself refuses already: its own keys are not in the directory
        with pytest.raises(ProtocolRefused) as refused:
            run.nodes[node].answer_directory(directory)
        assert str(refused.value) == f"secure sum 1: {reason.format(victim=victim)}"
        assert run.nodes[node].expects == "share" and not run.nodes[node].seed  # nothing shared, nothing masked


def test_without_signatures_the_same_swap_goes_through():
    """The attack the signatures stop is real: unsigned nodes take the swapped directory and would
    encrypt their shares to, and mask with, keys the server holds."""
    tensors = inputs(4)
    nodes = sorted(tensors)
    run = Run(tensors)
    run.through_setup()
    directory = swapped_directory(run, nodes[1], keep_signature=False)
    for node in nodes:
        if node != nodes[1]:
            assert set(run.nodes[node].answer_directory(directory).ciphertexts) == set(nodes) - {node}


def test_a_site_signing_with_a_key_its_peers_do_not_trust_is_refused_by_them():
    tensors = inputs(4)
    nodes = sorted(tensors)
    stranger = nodes[2]
    run = Run(tensors, signing=signing_keys(nodes, untrusted={stranger}))
    run.through_setup()
    directory = run.server.directory()
    for node in nodes:
        if node == stranger:
            continue
        with pytest.raises(ProtocolRefused, match=f"^secure sum 1: node {stranger}'s public keys are signed by a key outside secure-sum-peers$"):
            run.nodes[node].answer_directory(directory)
    # The stranger trusts everyone's key: it takes part; the round is refused by the others.
    assert run.nodes[stranger].answer_directory(directory).ciphertexts


def test_an_unsigned_site_among_signing_ones_is_refused_by_them_and_takes_the_signed_directory_itself():
    tensors = inputs(4)
    nodes = sorted(tensors)
    unsigned = nodes[0]
    signing = signing_keys(nodes)
    del signing[unsigned]
    run = Run(tensors, signing=signing)
    run.through_setup()
    directory = run.server.directory()
    assert set(directory.signatures) == set(nodes) - {unsigned}
    for node in nodes[1:]:
        with pytest.raises(ProtocolRefused, match=f"node {unsigned}'s public keys are unsigned"):
            run.nodes[node].answer_directory(directory)
    # A node without signing material checks no signature (the inline engine's trust in its server).
    assert run.nodes[unsigned].answer_directory(directory).ciphertexts


def test_the_server_refuses_a_reply_whose_signature_is_not_over_its_keys_or_reuses_a_signer():
    tensors = inputs(4)
    nodes = sorted(tensors)
    signing = signing_keys(nodes)
    run = Run(tensors, signing=signing)
    setup = run.server.setup
    keys = {node: run.nodes[node].answer_setup(setup) for node in nodes}
    first, second = keys[nodes[0]], keys[nodes[1]]
    # nodes[0]'s signed keys claimed by nodes[1]: the signature names nodes[0].
    with pytest.raises(ProtocolRefused, match=f"^node {nodes[1]}'s signature does not match its public keys$"):
        run.server.receive_keys(nodes[1], PublicKeys(1, first.mask_key, first.share_key, first.signer, first.signature))
    run.server.receive_keys(nodes[0], first)
    resigned = signing[nodes[0]].sign(1, nodes[1], second.mask_key, second.share_key)
    with pytest.raises(ProtocolRefused, match=f"^node {nodes[1]} signed with a key another node already signed with$"):
        run.server.receive_keys(nodes[1], PublicKeys(1, second.mask_key, second.share_key, first.signer, resigned))
    with pytest.raises(ProtocolRefused, match="the secure-sum message lacks 'signer'"):
        PublicKeys.read(ConfigRecord({"secure-stage": "setup", "session": 1, "mask-key": b"a", "share-key": b"b", "signature": b"c"}))
    assert "signer" not in PublicKeys(1, b"a", b"b").record()  # unsigned keys travel as before
