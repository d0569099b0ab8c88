"""florist-secure on the federation, the server's side: how it checks a sketch reply and adds it to the
round's sum, and what it checks of the sum (a site's side, the round's sketch record and what a site
uploads for it: federation/sketch_round.py).

The upload is a plain dict of tensors that the server only ADDS (aggregation/sketch.py): each
site weighs its own sketches by its examples (by 1 under differential privacy, florist/privacy.py)
and sends its weight beside them, and the server divides the summed sketches by the summed weight.
The secure-summation protocol (federation/secure_sum: pairwise masks, Shamir shares) masks exactly
these tensors: nothing below reads one site's values except the per-reply boundary checks
(shapes, finiteness). Without privacy.secure_aggregation the server receives each upload in the
clear and only sums them; with it, a site's train reply holds its public keys for the round's
secure sum (`SecureSumTrainRound`, federation/secure_site.py), and the server receives only
masked uploads and, from the protocol (federation/secure_round.py), their sum. Then a site's
examples and training metrics are summed too, not sent (federation/training_totals.py): the round
records their totals, and per site neither those numbers nor a weight.

The weight cap (validation.max_weight_share) is applied by the sites themselves, at a level the
server sends (federation/weight_level.py): each weighs its sketches by min(examples, level) and adds 1 to a
summed count of the sites cut. The server sees only the sums (the weight and the count), from which
it sets the next round's level; it never needs one site's examples.

What the per-reply norm screen (federation/influence.py) cannot do here: it judges one site's
update, which the server must not read. What protects the sum instead:
- client-side clipping (privacy.clip_norm), which honest sites apply before sketching;
- federation.min_sites, the fewest sites any sum is built from (the round's quorum);
- `SumNormCheck`: the reconstructed update's norm against the previous rounds' median, the only
  screen the server can run on what it sees. A malicious site can still send a large upload
  (verifiable bounds on a masked upload are open).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from florist.aggregation import Aggregate, AggregationError
from florist.aggregation.sketch import WEIGHT, SecureFLoRIST, automatic_widths, sketch_entries, sketch_key, sketch_shapes, widest_within
from florist.config import RunConfig
from florist.federation import payload
from florist.federation.messages import ADAPTER, SECURE_SUM, Reply
from florist.federation.reports import RoundReport, SummedClientReport
from florist.federation.secure_sum import PublicKeys, Quantizer, SecureSumServer
from florist.federation.secure_sum.server import threshold_for
from florist.federation.sketch_round import CUT, SKETCH, SKETCH_DTYPES, SketchRound
from florist.federation.train_round import RoundFailed, TrainRound
from florist.federation.training_totals import read_totals, summed_layout
from florist.federation.validation import MiB, REPORTED_METRICS, ClientUpdate, Limits, Rejected
from florist.federation.weight_level import WeightLevel
from florist.privacy import PrivacyLedger, effective_multiplier, noise_to_signal, planned_noise_multiplier



def checked_examples(reply: Reply, limits: Limits) -> int:
    """A train reply's example count, within the limits, once its reported metrics are numbers."""
    examples = reply.integer("num-examples")
    if not limits.min_examples <= examples <= limits.max_examples:
        raise Rejected(f"num-examples {examples!r} is outside [{limits.min_examples}, {limits.max_examples}]")
    for key in REPORTED_METRICS:
        reply.number(key)
    return examples


def check_sketch_reply(message: Message, reply: Reply, limits: Limits, sketch: SketchRound) -> tuple[ClientUpdate, dict[str, torch.Tensor]]:
    """A sketch reply's update report and its upload, or `Rejected` with the first reason: the same
    per-reply boundary as a factor reply's (examples, metrics, size, every array's header before it
    is read, finite values), with the shapes of the round's sketches."""
    examples = checked_examples(reply, limits)
    record = message.content.get(ADAPTER)
    if not isinstance(record, ArrayRecord):
        raise Rejected(f"malformed reply: the sketch upload is {type(record).__name__}, not an ArrayRecord")
    expected = expected_shapes(limits.shapes, sketch.module_widths(limits.shapes))
    size = record.count_bytes()
    cap = sum(4 * math.prod(shape) + 256 for shape in expected.values())
    if size > cap:
        raise Rejected(f"sketch upload is {size / MiB:.3f} MiB, above the {cap / MiB:.3f} MiB its shapes take")
    if set(record) != set(expected):
        odd = sorted(set(record) ^ set(expected))[0]
        raise Rejected(f"sketch upload {'lacks' if odd in expected else 'has an unexpected'} array {odd}")
    upload = {}
    for key, array in record.items():
        try:
            shape, dtype = payload.declared(array)
        except ValueError as error:
            raise Rejected(f"array {key}: {error}") from None
        if (shape, dtype) != (expected[key], SKETCH_DTYPES.get(key, np.dtype("<f4"))):
            raise Rejected(f"array {key} is {shape} {dtype}, expected {expected[key]} {SKETCH_DTYPES.get(key, np.dtype('<f4'))}")
        upload[key] = torch.from_numpy(array.numpy())
        if not torch.isfinite(upload[key]).all():
            raise Rejected(f"array {key} holds NaN or Inf values")
    if not upload[WEIGHT].item() > 0:
        raise Rejected(f"sketch weight {upload[WEIGHT].item()!r} is not positive")
    if upload[CUT].item() not in (0.0, 1.0):
        raise Rejected(f"sketch cut {upload[CUT].item()!r} is neither 0 nor 1")
    update = ClientUpdate({}, {}, examples, reply.partition, reply.integer("rank", 1, limits.max_rank), reply.metrics, size)
    return update, upload


def check_keys_reply(message: Message, reply: Reply, limits: Limits) -> tuple[ClientUpdate, PublicKeys]:
    """With the secure sum: a train reply's update report and the site's public keys for the round's
    sum. The report holds no examples or train metrics: they come summed, with its masked sketches
    at the collect stage (federation/training_totals.py)."""
    record = message.content.get(SECURE_SUM)
    if not isinstance(record, ConfigRecord):
        raise Rejected(f"malformed reply: the secure-sum keys are {type(record).__name__}, not a ConfigRecord")
    keys = PublicKeys.read(record)
    update = ClientUpdate({}, {}, None, reply.partition, reply.integer("rank", 1, limits.max_rank), {}, record.count_bytes())
    return update, keys


def expected_shapes(shapes: Mapping[str, tuple[int, int]], module_widths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    expected: dict[str, tuple[int, ...]] = {WEIGHT: (), CUT: ()}
    for name, shape in shapes.items():
        expected |= {sketch_key(name, part): part_shape for part, part_shape in sketch_shapes(shape, module_widths[name]).items()}
    return expected


class SecureTrainRound(TrainRound):
    """A round whose replies go straight into the sum: no per-reply norm screen or clip (each would
    judge one site's update; the sites cut their own weights), and no reply kept apart."""

    cut: float = 0.0
    """The summed cuts of the sketches added: how many sites cut their weight to the level."""

    def admit(self, node: int, update: ClientUpdate, upload: Mapping[str, torch.Tensor], norms: Mapping[str, float] = {}) -> None:
        self.partitions[update.partition] = node
        self.accepted[node] = update
        try:
            self.accumulator.add({key: value for key, value in upload.items() if key != CUT})
        except AggregationError as error:
            self.drop(node, str(error))
            return
        self.cut += float(upload[CUT].item())
        self.clips[node], self.weights[node] = {}, float(upload[WEIGHT].item())

    def close(self) -> dict[int, ClientUpdate]:
        if not self.has_quorum():
            raise RoundFailed(f"round {self.report.round}: {len(self.accepted)} sketches summed, below the quorum of {self.report.quorum}")
        return dict(sorted(self.accepted.items(), key=lambda item: item[1].partition))


class SecureSumTrainRound(SecureTrainRound):
    """A round whose sites answer the train instruction with their public keys (the secure sum's
    setup stage); their sketches reach the accumulator only as the protocol's unmasked sum (`add_sum`),
    with their training's totals, which the round records in place of each site's numbers."""

    def __init__(self, report: RoundReport, accumulator, server: SecureSumServer, dp: bool):
        super().__init__(report, accumulator, None, None, {}, False)
        self.server, self.dp = server, dp

    def admit(self, node: int, update: ClientUpdate, keys: PublicKeys, norms: Mapping[str, float] = {}) -> None:
        self.server.receive_keys(node, keys)
        self.report.bytes_up[node] = self.report.bytes_up.get(node, 0) + update.bytes_up
        self.partitions[update.partition] = node
        self.accepted[node] = update

    def sum_failed(self, reason: str) -> None:
        raise RoundFailed(f"round {self.report.round}: {reason}")

    def add_sum(self, total: Mapping[str, torch.Tensor], survivors: list[int]) -> None:
        """The survivors' summed sketches join the accumulator, at the float32 resolution of the sites'
        uploads; a site that took part but is not among the survivors leaves the round."""
        for node in [node for node in self.accepted if node not in survivors]:
            update = self.accepted.pop(node)
            del self.partitions[update.partition]
            self.report.event(node, "failed", "its masked sketches are not in the secure sum (it dropped out before unmasking)", update.partition)
        self.cut = float(total[CUT].item())  # how many sites cut their weight: a count, summed exactly
        summed, totals = read_totals(total)
        if not self.dp:
            del totals["sites_clipped"]
        self.report.totals = totals
        self.accumulator.add({key: value if key == WEIGHT else value.float() for key, value in summed.items() if key != CUT})

    def record_clients(self, updates: Mapping[int, ClientUpdate]) -> None:
        """Each summed site's acceptance and report: who it is and what it sent, no training numbers
        and no weight (the server never reads one site's)."""
        for node, update in updates.items():
            self.report.event(node, "accepted", partition=update.partition)
            self.report.clients.append(SummedClientReport(update.partition, node, update.rank, self.report.bytes_down.get(node, 0), self.report.bytes_up.get(node, 0)))


class SumNormCheck:
    """The one screen left in secure mode: a round whose aggregated update's norm is more than `factor`
    times the median of the previous rounds' is not aggregated (after `warmup` rounds)."""

    def __init__(self, factor: float | None, warmup: int = 2):
        self.factor, self.warmup, self.norms = factor, warmup, []

    def check(self, server_round: int, norm: float) -> None:
        if self.factor is not None and len(self.norms) >= self.warmup:
            median = statistics.median(self.norms)
            if norm > self.factor * median:
                raise RoundFailed(
                    f"round {server_round}: the summed update's norm {norm:.4g} is more than validation.norm_factor "
                    f"{self.factor:g} times the median {median:.4g} of the previous rounds'; not aggregated"
                )
        self.norms.append(norm)


def upload_caps(shapes: Mapping[str, tuple[int, int]], config: RunConfig) -> dict[str, int]:
    """Each module's widest sketch width whose upload is at most aggregation.sketch_upload times a
    mean client's share of it, r (m + n) values at the mean of federation.ranks; min(m, n) without
    the setting. A multiple that leaves a module no width (l = 1 uploads more) is refused in one line."""
    multiple = config.aggregation.sketch_upload
    if multiple is None:
        return {name: min(shape) for name, shape in shapes.items()}
    mean_rank = statistics.mean(config.federation.ranks)
    caps = {name: widest_within((m, n), multiple * mean_rank * (m + n)) for name, (m, n) in shapes.items()}
    for name, cap in caps.items():
        if cap == 0:
            narrowest = sketch_entries({name: shapes[name]}, {name: 1}) / (mean_rank * sum(shapes[name]))
            raise ValueError(
                f"aggregation.sketch_upload={multiple:g} leaves module {name} no sketch: its narrowest (l = 1) uploads "
                f"{narrowest:.3g}x a mean client's adapter (ranks {config.federation.ranks})"
            )
    return caps


def round_widths(
    shapes: Mapping[str, tuple[int, int]], config: RunConfig, kept: Mapping[str, int] | None, caps: Mapping[str, int]
) -> dict[str, int]:
    """Each module's sketch width: aggregation.sketch_width for all (at most min(m, n)), else twice
    the rank that module kept last round (`kept`), at least MIN_SKETCH_WIDTH (round 1, `kept` None:
    the largest client rank, at least MIN_SKETCH_WIDTH; the stacked rank, where round 1 is exact, is
    larger); either at most the module's cap (`upload_caps`)."""
    fixed = config.aggregation.sketch_width
    if fixed is not None:
        wanted = {name: min(fixed, *shape) for name, shape in shapes.items()}
    else:
        wanted = automatic_widths(shapes, kept, max(config.federation.ranks))
    return {name: min(width, caps[name]) for name, width in wanted.items()}


class SecureRounds:
    """The server's side of florist-secure over the run: each round's sketch and sum, its checks and its privacy spending."""

    def __init__(self, config: RunConfig, aggregator: SecureFLoRIST, shapes: Mapping[str, tuple[int, int]]):
        self.config, self.aggregator, self.shapes = config, aggregator, dict(shapes)
        privacy = config.privacy
        self.sampling_rate = config.federation.sample_size / config.federation.num_clients
        self.noise_multiplier = planned_noise_multiplier(privacy, config.federation.rounds, self.sampling_rate) if privacy.dp else 0.0
        self.ledger = PrivacyLedger(privacy.delta) if privacy.dp else None
        self.upload_ledger = PrivacyLedger(privacy.delta) if privacy.dp and not privacy.secure_aggregation else None
        """Without the secure sum the server reads each site's upload, which carries 1/sqrt(K) of the
        noise: its own epsilon, composed beside the sum's (`spend`)."""
        self.norm_check = SumNormCheck(config.validation.norm_factor)
        self.weight_level = None if privacy.dp else WeightLevel(config.validation.max_weight_share)
        self.kept_ranks: dict[str, int] | None = None
        """Each module's rank kept last round: its next sketch's width (`widths`)."""
        self.sketch: SketchRound | None = None
        self.protocol = privacy.secure_aggregation
        """The sketches are summed by the secure-sum protocol (federation/secure_round.py), not in the clear."""
        self.round: SecureTrainRound | None = None
        self.caps = upload_caps(self.shapes, config)
        """Each module's widest width within aggregation.sketch_upload (min(m, n) without one)."""

    def widths(self) -> dict[str, int]:
        """Each module's sketch width this round (`round_widths`)."""
        return round_widths(self.shapes, self.config, self.kept_ranks, self.caps)

    def train_round(self, server_round: int, report: RoundReport) -> SecureTrainRound:
        seed = (self.config.training.seed * 1_000_003 + server_round) % 2**63
        sites = len(report.sampled)
        level = self.weight_level.for_round(sites) if self.weight_level is not None else math.inf
        self.sketch = SketchRound.of(seed, self.widths(), sites, self.noise_multiplier, level, self.config.federation.rounds)
        total = self.aggregator.sum_of_sketches(seed, self.shapes)
        if not self.protocol:
            self.round = SecureTrainRound(report, total, None, None, {}, False)
            return self.round
        privacy, min_sites = self.config.privacy, self.config.federation.min_sites
        sampled = list(report.sampled)
        layout = summed_layout(expected_shapes(self.shapes, self.sketch.module_widths(self.shapes)))
        threshold = threshold_for(len(sampled), privacy.secure_threshold, min_sites)
        server = SecureSumServer(server_round, sampled, threshold, min_sites, Quantizer(privacy.secure_clip_range, privacy.secure_bits), layout)
        self.round = SecureSumTrainRound(report, total, server, privacy.dp)
        return self.round

    def instruct(self, content) -> int:
        """Put the round's sketch (and with the secure sum, its setup) in a train instruction; the
        protocol bytes it adds."""
        content[SKETCH] = self.sketch.record()
        if not self.protocol:
            return 0
        record = self.round.server.setup.record()
        content[SECURE_SUM] = record
        return record.count_bytes()

    def check_reply(self, message: Message, reply: Reply, limits: Limits):
        """A train reply's update report and what joins the sum: the sketch upload, or the site's keys."""
        if self.protocol:
            return check_keys_reply(message, reply, limits)
        return check_sketch_reply(message, reply, limits, self.sketch)

    def finish(self, report: RoundReport, aggregate: Aggregate, summed: int) -> None:
        """Check the sum's norm, spend the round's privacy, set the next round's weight level and size its sketch."""
        norm = math.sqrt(sum(float(m.singular_values.double().square().sum()) for m in aggregate.modules.values()))
        self.norm_check.check(report.round, norm)
        widths = self.sketch.widths  # each module's from the ranks the round's record holds (`restore`)
        report.secure = {"sketch_width": max(widths), "sketch_width_mean": sum(widths) / len(widths), "sites_sampled": self.sketch.sites, "sites_summed": summed, "update_norm": norm}
        if self.protocol:  # how many sites' secure-sum keys came signed with a node key (node_signing.py)
            report.secure["keys_signed"] = len(self.round.server.signatures)
        if self.weight_level is not None:
            level, weight = self.sketch.weight_level, float(self.round.accumulator.sums[WEIGHT].item())
            report.secure |= {"weight_level": level if math.isfinite(level) else None, "summed_weight": weight, "sites_cut": self.round.cut}
            self.weight_level.observe(self.sketch.sites, level, weight, self.round.cut)
        if self.ledger is not None:
            multiplier = effective_multiplier(self.noise_multiplier, summed, self.sketch.sites)
            report.secure["privacy"] = self.spend(summed, self.sketch.sites)
            entries = sketch_entries(self.shapes, self.sketch.module_widths(self.shapes))
            report.secure["noise_to_signal"] = noise_to_signal(multiplier, entries, summed)
        self.kept_ranks = {name: module.rank for name, module in aggregate.modules.items()}

    def spend(self, summed: int, sampled: int) -> dict:
        """The round's privacy record: the epsilon of the sum, at the multiplier its `summed` sites'
        noise gives it, and without the secure sum `server_epsilon`, the run's against the server,
        which reads each upload: one site's noise, sigma / sqrt(`sampled`)."""
        record = self.ledger.spend(effective_multiplier(self.noise_multiplier, summed, sampled), self.sampling_rate)
        if self.upload_ledger is None:
            return record
        one_site = self.upload_ledger.spend(effective_multiplier(self.noise_multiplier, 1, sampled), self.sampling_rate)
        return record | {"server_epsilon": one_site["run_epsilon"]}

    def restore(self, metrics: list[dict]) -> None:
        """A resumed run's privacy spent, weight level, norms and kept ranks, replayed from its stored
        rounds' records. The privacy ledger the replay gives must be the one each record holds
        (ValueError, one line naming the round and the key): an edited ledger (a smaller epsilon,
        another noise multiplier, sampling rate or delta, more sites summed than the round lists) is
        refused. The records carry no key: a checkpoint rewritten consistently throughout by someone
        who can write the run directory is not detected."""
        for record in metrics:
            secure = record.get("secure")
            if not secure:
                continue
            try:
                self._replay(record["round"], secure, len(record.get("clients", [])))
                if record.get("ranks"):  # each module's next width (`widths`)
                    self.kept_ranks = {name: int(record["ranks"][name]) for name in self.shapes}
            except (KeyError, TypeError) as error:
                raise ValueError(f"checkpoint/state.json round {record.get('round')}: malformed secure record ({type(error).__name__}: {error})") from None
            self.norm_check.norms.append(secure["update_norm"])

    def _replay(self, server_round: int, secure: dict, clients: int) -> None:
        def refuse(key: str, stored, replayed) -> ValueError:
            return ValueError(
                f"checkpoint/state.json round {server_round}: secure.{key} is {stored!r}, but the run's settings and records give {replayed!r} "
                "(an edited privacy ledger, or a setting the noise depends on changed: federation.rounds under privacy.target_epsilon)"
            )

        sites, summed = secure["sites_sampled"], secure["sites_summed"]
        if summed != clients or not 0 < summed <= sites:
            raise refuse("sites_summed", summed, clients)
        if self.weight_level is not None:  # the next level from the sums at the level sent (validation.* may change on resume)
            level = math.inf if secure["weight_level"] is None else float(secure["weight_level"])
            self.weight_level.observe(sites, level, float(secure["summed_weight"]), float(secure["sites_cut"]))
        if self.ledger is not None:
            stored = secure.get("privacy")
            replayed = self.spend(summed, sites)
            for key, value in replayed.items():
                if stored is None or stored.get(key) != value:
                    raise refuse(f"privacy.{key}", None if stored is None else stored.get(key), value)


def privacy_summary(rounds: list[dict]) -> dict | None:
    """The run's (epsilon, delta) for summary.json: the last round's running total."""
    spent = [r["secure"]["privacy"] for r in rounds if "privacy" in r.get("secure", {})]
    if not spent:
        return None
    summary = {"epsilon": spent[-1]["run_epsilon"], "delta": spent[-1]["delta"], "rounds": len(spent)}
    return summary | ({"server_epsilon": spent[-1]["server_epsilon"]} if "server_epsilon" in spent[-1] else {})


