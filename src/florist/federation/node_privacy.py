"""What a site demands of a run's privacy before it trains for it, from its own node config.

`privacy.*` are shared settings: the server chooses them, and without a demand of its own a site
trains for a server that reads its update in the clear. Two node-config keys let it refuse that:

- `require-secure-sum = true`: only runs whose server reads nothing but sums (aggregation.method
  "florist-secure" with privacy.secure_aggregation), and, where the node config names its
  secure-sum signing keys (federation/node_signing.py), whose every peer's keys are signed.
- `max-epsilon = E` (and `max-delta`, default 1e-5): only runs with client-level differential
  privacy, summed by the secure sum (a site adds only its share of the noise, so its epsilon is the
  sum's only where the server reads nothing but the sum), at a delta of at most max-delta; and in
  each round, only if the run's planned spending is at most E by the same accountant as the
  server's (florist/privacy.py), over the rounds the round's sketch record states (federation.rounds
  is not a shared setting), and only up to that round.

Each private site also adds at least the noise the run's settings need, whatever the server asks
(federation/sketch_round.py). What a site cannot check: the accountant's sampling rate is the
round's sampled sites over federation.num_clients as the server states them; the rounds are the
server's count; and a new run (a new run id) starts a new budget. A third key counts for the site
itself instead:

- `privacy-ledger = FILE` (with max-epsilon): the site's own record of every private upload it has
  made, over all runs, in a JSON file it names (`SiteLedger`). Before it adds its noise it composes
  every recorded upload and this one at a sampling rate of 1 (no amplification: the sampling is
  the server's) and at the fewest sites a sum may hold (the secure sum's threshold: sites that drop
  out take their noise with them), and refuses the round if that epsilon at max-delta is above
  max-epsilon; else it records the upload, atomically, before it is made. A retried round is a new
  release and is counted again.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from florist.config import RunConfig
from florist.federation import node_config as read
from florist.federation.node_config import Refused
from florist.federation.secure_sum.server import threshold_for
from florist.federation.sketch_round import SketchRound
from florist.files import write_atomically
from florist.privacy import effective_multiplier, epsilon, planned_epsilon

DEFAULT_MAX_DELTA = 1e-5


@dataclass(frozen=True)
class SiteLedger:
    """A site's private uploads over all runs, one JSON list in the file `path`: per upload its run id,
    round, the noise multiplier the sum carries at the fewest sites it may hold, and when. The file
    is the site's; a refusal about it names the node-config key, never the path (it goes to the server)."""

    path: Path

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SiteLedger | None:
        if "privacy-ledger" not in node_config:
            return None
        if "max-epsilon" not in node_config:
            raise Refused("node config privacy-ledger without max-epsilon: a ledger bounds nothing without its epsilon")
        path = Path(read.text(node_config, "privacy-ledger")).expanduser()
        if path.is_dir() or not path.parent.is_dir():
            raise Refused("node config privacy-ledger: not a file in an existing directory")
        ledger = cls(path)
        ledger.uploads()  # a file the site cannot read is refused with the node config, not mid-run
        return ledger

    def uploads(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise Refused(f"node config privacy-ledger: the file is not a ledger florist wrote ({type(error).__name__}); it is left as it is") from None
        if not isinstance(entries, list) or not all(_is_upload(entry) for entry in entries):
            raise Refused("node config privacy-ledger: the file is not a ledger florist wrote (not a list of uploads); it is left as it is")
        return entries

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Held while an upload is checked and recorded: two runs' messages on one site are two processes."""
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def record(self, uploads: list[dict], run: int, server_round: int, noise_multiplier: float) -> None:
        """`uploads` (the file's, as read under the lock) and this one, written whole."""
        entry = {"run": run, "round": server_round, "noise_multiplier": noise_multiplier, "unix_time": time.time()}
        write_atomically(self.path, json.dumps([*uploads, entry], indent=1) + "\n")


def _is_upload(entry: object) -> bool:
    if not isinstance(entry, dict) or not {"run", "round", "noise_multiplier"} <= entry.keys():
        return False
    multiplier = entry["noise_multiplier"]
    return isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool) and math.isfinite(multiplier) and multiplier > 0


def fewest_sites_multiplier(config: RunConfig, sketch: SketchRound) -> float:
    """The noise multiplier of a round's sum when it holds the fewest sites the secure sum unmasks,
    each adding its share sigma S / sqrt(K): sigma sqrt(threshold / K)."""
    fewest = threshold_for(sketch.sites, config.privacy.secure_threshold, config.federation.min_sites)
    return effective_multiplier(sketch.noise_multiplier, fewest, sketch.sites)


@dataclass(frozen=True)
class PrivacyDemands:
    secure_sum: bool = False
    max_epsilon: float | None = None
    max_delta: float = DEFAULT_MAX_DELTA
    ledger: SiteLedger | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> PrivacyDemands:
        if "max-delta" in node_config and "max-epsilon" not in node_config:
            raise Refused("node config max-delta without max-epsilon: a delta bounds nothing without its epsilon")
        max_delta = read.number(node_config, "max-delta") if "max-delta" in node_config else DEFAULT_MAX_DELTA
        if not max_delta < 1:
            raise Refused(f"node config max-delta={node_config['max-delta']!r} must be below 1")
        return cls(
            secure_sum=read.boolean(node_config, "require-secure-sum"),
            max_epsilon=read.number(node_config, "max-epsilon") if "max-epsilon" in node_config else None,
            max_delta=max_delta,
            ledger=SiteLedger.from_node_config(node_config),
        )

    def check(self, config: RunConfig) -> None:
        """Refuse a run whose privacy settings fall short of these demands, in one line naming the key."""
        aggregation, privacy = config.aggregation, config.privacy
        if self.secure_sum and not (aggregation.secure and privacy.secure_aggregation):
            why = (
                f'aggregation.method is "{aggregation.method}", whose server reads this site\'s update'
                if not aggregation.secure
                else "privacy.secure_aggregation is false: the server would read this site's sketches"
            )
            raise Refused(f"node config require-secure-sum=true: {why}")
        if self.max_epsilon is None:
            return
        if not privacy.dp:
            raise Refused(f"node config max-epsilon={self.max_epsilon:g}: the run has no differential privacy (privacy.dp = false)")
        if not privacy.secure_aggregation:
            # Each site adds 1/sqrt(K) of the noise: its epsilon is the sum's only where no one reads less than the sum.
            raise Refused(
                f"node config max-epsilon={self.max_epsilon:g}: privacy.secure_aggregation is false, so the server reads "
                "this site's sketches with its share of the noise alone, not the sum's"
            )
        if privacy.delta > self.max_delta:
            raise Refused(f"node config max-delta={self.max_delta:g}: the run states privacy.delta {privacy.delta:g}")

    def check_round(self, config: RunConfig, sketch: SketchRound, server_round: int) -> None:
        """Refuse a private round whose run plans more than max-epsilon, by the rounds and the share of
        the clients the server states in the round's sketch record, or a round beyond those rounds;
        with a ledger, also one whose upload would bring the site's own count above it."""
        if self.max_epsilon is None:
            return
        if server_round > sketch.rounds:
            raise Refused(f"node config max-epsilon={self.max_epsilon:g}: round {server_round} is beyond the {sketch.rounds} rounds the run's epsilon covers")
        spent = planned_epsilon(config.privacy, sketch.rounds, sketch.sampling_rate(config))
        if spent > self.max_epsilon * (1 + 1e-9):
            raise Refused(
                f"node config max-epsilon={self.max_epsilon:g}: the run plans epsilon {spent:.4g} over its "
                f"{sketch.rounds} rounds at privacy.delta {config.privacy.delta:g}"
            )
        if self.ledger is not None:
            self._check_ledger(config, sketch)

    def _check_ledger(self, config: RunConfig, sketch: SketchRound) -> tuple[list[dict], float]:
        """The ledger's uploads and this round's multiplier at the fewest sites, if their epsilon at
        a sampling rate of 1 is within max-epsilon; else refused."""
        uploads = self.ledger.uploads()
        multiplier = fewest_sites_multiplier(config, sketch)
        spent = epsilon([(entry["noise_multiplier"], 1.0) for entry in uploads] + [(multiplier, 1.0)], self.max_delta)
        if spent > self.max_epsilon * (1 + 1e-9):
            raise Refused(
                f"node config privacy-ledger: this round would bring this site's epsilon to {spent:.4g} over the {len(uploads) + 1} private "
                f"uploads in its ledger (at a sampling rate of 1), above max-epsilon={self.max_epsilon:g} at max-delta={self.max_delta:g}"
            )
        return uploads, multiplier

    def spend(self, config: RunConfig, sketch: SketchRound, run: int, server_round: int) -> None:
        """Record this round's private upload in the site's ledger, checked again under its lock, before it is made."""
        if self.ledger is None:
            return
        with self.ledger.locked():
            uploads, multiplier = self._check_ledger(config, sketch)
            self.ledger.record(uploads, run, server_round, multiplier)
