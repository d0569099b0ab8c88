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
server's count; and a new run (a new run id) starts a new budget, so a site that must cap its
spending over runs keeps its own count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from florist.config import RunConfig
from florist.federation import node_config as read
from florist.federation.node_config import Refused
from florist.federation.sketch_round import SketchRound
from florist.privacy import planned_epsilon

DEFAULT_MAX_DELTA = 1e-5


@dataclass(frozen=True)
class PrivacyDemands:
    secure_sum: bool = False
    max_epsilon: float | None = None
    max_delta: float = DEFAULT_MAX_DELTA

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
        the clients the server states in the round's sketch record, or a round beyond those rounds."""
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
