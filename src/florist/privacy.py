"""Client-level differential privacy's bookkeeping: the noise each site adds, and the (epsilon, delta)
a run has spent, from Google's `dp-accounting` (its RDP accountant).

The mechanism (DP-FedAvg, McMahan et al. 2018, on florist-secure's sketches): each site clips its
whole update to Frobenius norm C, sketches it at weight 1 (a site's example count is not its weight
under DP: a weight of n_k would make its sensitivity n_k C), and adds Gaussian noise of standard
deviation sigma * S / sqrt(K) to every sketch entry, S = sqrt(2) C the sketches' sensitivity
(aggregation/sketch.py) and K the number of sites the round sampled. The SUM of K sites' noise has
standard deviation sigma * S, the Gaussian mechanism with noise multiplier sigma; no single site's
noise suffices, so no one (the server included) sees an un-noised sum.

Assumptions, stated where they are used:
- every site that is summed is honest in adding its share: t honest sites of K give sigma sqrt(t/K);
- sites that drop out take their share with them: the round's multiplier is sigma sqrt(summed / K),
  and that is what the accountant is told (`effective_multiplier`); federation.min_sites bounds it;
- the round's sample is modelled as Poisson sampling at rate q = sampled / num_clients (florist
  samples a fixed number without replacement: the usual approximation of DP-FedAvg's analyses);
- the server divides the sum by the number of sites summed, which it knows anyway (it sampled them).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dp_accounting
from dp_accounting import rdp

if TYPE_CHECKING:
    from florist.config import PrivacyConfig

# dp-accounting logs a warning per Renyi order whose series it drops; the epsilon accounts for that.
logging.getLogger("absl").setLevel(logging.ERROR)


def round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    """One round's mechanism: the Gaussian on the sum, Poisson-subsampled below a rate of 1."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def epsilon(rounds: list[tuple[float, float]], delta: float) -> float:
    """The epsilon at `delta` of composing rounds of (noise multiplier, sampling rate)."""
    accountant = rdp.RdpAccountant()
    for noise_multiplier, sampling_rate in rounds:
        accountant.compose(round_event(noise_multiplier, sampling_rate))
    return accountant.get_epsilon(delta)


def noise_for_epsilon(target_epsilon: float, delta: float, rounds: int, sampling_rate: float) -> float:
    """The smallest noise multiplier whose `rounds` rounds spend at most `target_epsilon` at `delta`."""
    return dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda sigma: dp_accounting.SelfComposedDpEvent(round_event(sigma, sampling_rate), rounds),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
    )


def planned_noise_multiplier(privacy: PrivacyConfig, rounds: int, sampling_rate: float) -> float:
    """sigma of every round of a private run: privacy.noise_multiplier, or the smallest that spends
    privacy.target_epsilon over `rounds` rounds at `sampling_rate`. The server asks for it and each
    site recomputes it, so that a server cannot ask for less noise than the run's settings state."""
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    return noise_for_epsilon(privacy.target_epsilon, privacy.delta, rounds, sampling_rate)


def planned_epsilon(privacy: PrivacyConfig, rounds: int, sampling_rate: float) -> float:
    """The epsilon a private run spends over `rounds` rounds at privacy.delta if every sampled site is summed."""
    return epsilon([(planned_noise_multiplier(privacy, rounds, sampling_rate), sampling_rate)] * rounds, privacy.delta)


def site_noise_std(noise_multiplier: float, sensitivity: float, sites: int) -> float:
    """Each of `sites` sites' noise standard deviation, so that their sum's is noise_multiplier * sensitivity."""
    return noise_multiplier * sensitivity / math.sqrt(sites)


def effective_multiplier(noise_multiplier: float, summed: int, sampled: int) -> float:
    """The multiplier the sum carries when only `summed` of the `sampled` sites' noise is in it."""
    return noise_multiplier * math.sqrt(summed / sampled)


def noise_to_signal(noise_multiplier: float, entries: int, summed: int) -> float:
    """The expected Frobenius norm of the noise in the mean of `summed` sites' sketches (`entries`
    values in all, each summed with noise of std noise_multiplier * S), over S, the largest norm that
    mean can have (every site's clipped update at norm C and all alike): the round's noise-to-signal
    ratio at its most favourable. Above 1 the noise outweighs any mean update; it falls as 1 / summed
    and grows as the square root of the sketch's size, which is why DP needs many sites."""
    return noise_multiplier * math.sqrt(entries) / summed


@dataclass
class PrivacyLedger:
    """The run's spending: per round its multiplier, sampling rate and epsilon alone, and the run's so far."""

    delta: float
    rounds: list[tuple[float, float]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    def spend(self, noise_multiplier: float, sampling_rate: float) -> dict:
        self.rounds.append((noise_multiplier, sampling_rate))
        record = {
            "noise_multiplier": noise_multiplier,
            "sampling_rate": sampling_rate,
            "round_epsilon": epsilon([(noise_multiplier, sampling_rate)], self.delta),
            "run_epsilon": epsilon(self.rounds, self.delta),
            "delta": self.delta,
        }
        self.records.append(record)
        return record
