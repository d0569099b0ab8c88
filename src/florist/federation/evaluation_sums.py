"""Federated evaluation under florist-secure: each site replies with sums only, and the server
combines nothing but their totals.

A site's reply carries, beside the metrics about the reply itself (round, partition-id,
chain-length), these numbers, every one of which the server only ADDS over the sites:

- `num-examples`: the held-out examples it scored;
- `<split>:nll` and `<split>:tokens` (split `test`, held-out; `val`, validation): the summed
  negative log-likelihood of the split's response tokens (its mean loss times its tokens) and
  their count;
- `rouge_l:sum`: ROUGE-L F1 summed over the held-out examples (its count is `num-examples`);
- `exact_match:correct` and `exact_match:count`, and `exact_match/<category>:correct` and
  `:count` for each category of at least the node's minimum count (`NodePolicy.category_minimum`:
  privacy.min_category_count, or the node's own min-category-examples if higher);
- `withheld:categories` and `withheld:examples`: how many categories it withheld under that
  minimum, and their examples, so that a withheld score is reported as such.

The server divides sums by sums: loss = sum(nll) / sum(tokens), exact match = sum(correct) /
sum(count), ROUGE-L = sum(rouge_l:sum) / sum(num-examples); and only once at least
federation.min_sites sites are in the sum, as for the training sums.

Masking (privacy.secure_aggregation): the sums travel as one vector per site, masked by the
secure-sum protocol (federation/secure_sum), so that the server reads only their total. Every site
must send the same entries (`masked_layout`, carried in the protocol's setup): the run's categories
are fixed in advance (`run_categories`: privacy.masked_categories, else the embedded task's, else Dolly's eight), and a site sends 0
and 0 for a category it withholds, lacks or that is not among them, counting those it holds in
`withheld:*`; every split's loss is an entry, 0 and 0 where the site has none. The counts are summed
exactly (unquantised integers); each float sum (nll, ROUGE-L) is split into its whole part, a
count, and its fraction in [0, 1), quantised, so that the total of K sites is within K quantisation
steps (secure_sum/quantization.py's `Quantizer.bound`) whatever its size. Without the protocol the
server receives each site's sums in the clear; it still reads nothing but the sums, and records none
of one site's values.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from florist.config import RunConfig
from florist.data import EMBEDDED_CATEGORIES, Example
from florist.evaluation import LossResult
from florist.federation.messages import Malformed, Reply
from florist.federation.secure_sum import Layout, ProtocolRefused
from florist.federation.secure_sum.quantization import exact_names, exact_parts, joined

SPLITS = ("test", "val")
"""The splits whose loss is combined over their tokens: `test`, held-out; `val`, validation."""
ABOUT_THE_REPLY = ("round", "partition-id", "num-examples", "chain-length")
"""Metrics every evaluation reply carries about itself, not scores (`num-examples` is a sum too)."""
EXACT_MATCH = "exact_match"
MAX_LOSS = 700.0
"""The largest loss a node may report: exp(700) = 1e304 is still a float, so the combined
perplexity is. A site's summed nll is at most this times its tokens."""
DOLLY_CATEGORIES = (
    "brainstorming", "classification", "closed_qa", "creative_writing", "general_qa", "information_extraction", "open_qa", "summarization",
)
"""databricks-dolly-15k's categories, the paper's data."""
EVALUATION_SESSIONS = 2**40
"""The first secure-sum session of an evaluation's sums (the round's evaluation is this plus the round;
a train sum's session is its round): no two sums of a run share a session, so a site's keys, signed
for one sum, are never accepted in another."""


def run_categories(config: RunConfig) -> tuple[str, ...]:
    """The categories whose exact match the masked evaluation sums carry: privacy.masked_categories,
    else fixed by the run's data."""
    if config.privacy.masked_categories:
        return tuple(config.privacy.masked_categories)
    data = config.data
    return EMBEDDED_CATEGORIES if "embedded" in (data.source, data.test_source) else DOLLY_CATEGORIES


def masked_layout(categories: Sequence[str]) -> Layout:
    """The entries every site's masked evaluation sums hold, each a scalar, for the run's `categories`."""
    floats = [f"{split}:nll" for split in SPLITS] + ["rouge_l:sum"]
    counts = ["num-examples", "withheld:categories", "withheld:examples"] + [f"{split}:tokens" for split in SPLITS]
    counts += [f"{key}:{part}" for key in [EXACT_MATCH, *(f"{EXACT_MATCH}/{c}" for c in categories)] for part in ("correct", "count")]
    counts += [exact_names(name)[0] for name in floats]
    names = counts + [exact_names(name)[1] for name in floats]
    return Layout(tuple((name, ()) for name in sorted(names)), tuple(sorted(counts)))


def layout_categories(layout: Layout) -> tuple[str, ...]:
    """The categories a setup's layout carries; `ProtocolRefused` unless it is `masked_layout`'s for them."""
    prefix, suffix = f"{EXACT_MATCH}/", ":count"
    categories = tuple(sorted(name[len(prefix) : -len(suffix)] for name, _ in layout.shapes if name.startswith(prefix) and name.endswith(suffix)))
    if layout != masked_layout(categories):
        raise ProtocolRefused("the secure-sum layout is not the evaluation sums' layout")
    return categories


@dataclass(frozen=True)
class Ratio:
    """A score as a sum over the sites: its numerator and its count."""

    total: float
    count: int

    def __add__(self, other: Ratio) -> Ratio:
        return Ratio(self.total + other.total, self.count + other.count)


@dataclass(frozen=True)
class EvaluationSums:
    """One site's evaluation as sums, or the sum of several sites'."""

    examples: int = 0
    losses: dict[str, Ratio] = field(default_factory=dict)
    """split -> (summed nll, tokens)."""
    rouge_l: float = 0.0
    """ROUGE-L F1 summed over the examples."""
    exact_match: dict[str, Ratio] = field(default_factory=dict)
    """"exact_match" and "exact_match/<category>" -> (correct, count)."""
    withheld_categories: int = 0
    withheld_examples: int = 0

    @classmethod
    def of_site(
        cls, results: Mapping[str, float], validation: LossResult | None, held_out: Sequence[Example], category_minimum: int
    ) -> EvaluationSums:
        """A site's sums from its `results` (`evaluation.evaluate` on `held_out`, {} without a
        held-out split) and its `validation` loss; the scores of categories of fewer than
        `category_minimum` examples withheld."""
        losses = {}
        if "test_loss" in results:
            losses["test"] = Ratio(results["test_loss"] * results["test_tokens"], int(results["test_tokens"]))
        if validation is not None:
            losses["val"] = Ratio(validation.mean_nll * validation.tokens, validation.tokens)
        counts = Counter(example.category for example in held_out if example.category)
        exact_match: dict[str, Ratio] = {}
        withheld: Counter[str] = Counter()
        if EXACT_MATCH in results:
            exact_match[EXACT_MATCH] = _correct(results[EXACT_MATCH], len(held_out))
            for category, count in counts.items():
                if count >= category_minimum:
                    exact_match[f"{EXACT_MATCH}/{category}"] = _correct(results[f"{EXACT_MATCH}/{category}"], count)
                else:
                    withheld[category] = count
        return cls(
            examples=len(held_out),
            losses=losses,
            rouge_l=results.get("rouge_l", 0.0) * len(held_out),
            exact_match=exact_match,
            withheld_categories=len(withheld),
            withheld_examples=sum(withheld.values()),
        )

    def in_layout(self, categories: Sequence[str]) -> EvaluationSums:
        """These sums as the masked layout holds them: a category outside `categories` withheld."""
        outside = {key: score for key, score in self.exact_match.items() if key != EXACT_MATCH and key.split("/", 1)[1] not in categories}
        return EvaluationSums(
            examples=self.examples, losses=self.losses, rouge_l=self.rouge_l,
            exact_match={key: score for key, score in self.exact_match.items() if key not in outside},
            withheld_categories=self.withheld_categories + len(outside),
            withheld_examples=self.withheld_examples + sum(score.count for score in outside.values()),
        )

    def tensors(self, categories: Sequence[str]) -> dict[str, torch.Tensor]:
        """The sums as `masked_layout(categories)`'s entries (call `in_layout` first): 0 where the site has none."""
        values: dict[str, float] = dict.fromkeys((name for name, _ in masked_layout(categories).shapes), 0.0)
        floats = {f"{split}:nll": loss.total for split, loss in self.losses.items()} | {"rouge_l:sum": self.rouge_l}
        for name, total in floats.items():
            values |= exact_parts(name, total)
        for name, value in self.record().items():
            if name not in floats:
                if name not in values:
                    raise ValueError(f"sum {name} is outside the layout of categories {list(categories)} (EvaluationSums.in_layout)")
                values[name] = value
        return {name: torch.tensor(float(value), dtype=torch.float64) for name, value in values.items()}

    @classmethod
    def of_total(cls, total: Mapping[str, torch.Tensor], categories: Sequence[str]) -> EvaluationSums:
        """The sums from the masked layout's total over the sites."""
        value = {name: float(tensor.item()) for name, tensor in total.items()}

        def count(name: str) -> int:
            return round(value[name])

        keys = [EXACT_MATCH, *(f"{EXACT_MATCH}/{c}" for c in categories)]
        return cls(
            examples=count("num-examples"),
            losses={split: Ratio(joined(value, f"{split}:nll"), count(f"{split}:tokens")) for split in SPLITS},
            rouge_l=joined(value, "rouge_l:sum"),
            exact_match={key: Ratio(count(f"{key}:correct"), count(f"{key}:count")) for key in keys},
            withheld_categories=count("withheld:categories"),
            withheld_examples=count("withheld:examples"),
        )

    def record(self) -> dict[str, int | float]:
        """The sums as the reply's metrics (the module's docstring names them)."""
        metrics: dict[str, int | float] = {"num-examples": self.examples, "rouge_l:sum": self.rouge_l}
        for split, loss in self.losses.items():
            metrics |= {f"{split}:nll": loss.total, f"{split}:tokens": loss.count}
        for key, score in self.exact_match.items():
            metrics |= {f"{key}:correct": int(score.total), f"{key}:count": score.count}
        return metrics | {"withheld:categories": self.withheld_categories, "withheld:examples": self.withheld_examples}

    @classmethod
    def read(cls, reply: Reply, max_examples: int) -> EvaluationSums:
        """A site's sums, or `Malformed` naming the first entry that is not one of them or not
        within its bounds. The reasons quote no value: an honest site's values are always within."""
        examples = _count(reply, "num-examples", max_examples)
        losses, exact_match = {}, {}
        for key in reply.metrics:
            name, _, part = key.rpartition(":")
            if key in ABOUT_THE_REPLY or key in ("rouge_l:sum", "withheld:categories", "withheld:examples"):
                continue
            if name in SPLITS and part in ("nll", "tokens"):
                if name not in losses:
                    tokens = _count(reply, f"{name}:tokens")
                    losses[name] = Ratio(_sum(reply, f"{name}:nll", MAX_LOSS * tokens), tokens)
            elif (name == EXACT_MATCH or name.startswith(f"{EXACT_MATCH}/")) and part in ("correct", "count"):
                if name not in exact_match:
                    count = _count(reply, f"{name}:count", examples)
                    exact_match[name] = Ratio(_count(reply, f"{name}:correct", count), count)
            else:
                raise Malformed(f"metric {key} is not one of the sums florist-secure's evaluation sends")
        return cls(
            examples=examples,
            losses=losses,
            rouge_l=_sum(reply, "rouge_l:sum", examples),
            exact_match=exact_match,
            withheld_categories=_count(reply, "withheld:categories"),
            withheld_examples=_count(reply, "withheld:examples", examples),
        )

    def __add__(self, other: EvaluationSums) -> EvaluationSums:
        return EvaluationSums(
            examples=self.examples + other.examples,
            losses=_added(self.losses, other.losses),
            rouge_l=self.rouge_l + other.rouge_l,
            exact_match=_added(self.exact_match, other.exact_match),
            withheld_categories=self.withheld_categories + other.withheld_categories,
            withheld_examples=self.withheld_examples + other.withheld_examples,
        )

    def combined(self) -> dict[str, float]:
        """The sums' scores, named as a plain run's combined ones (EvaluationReport.combined):
        each split's loss per token, its tokens and perplexity; ROUGE-L and exact match per example,
        a category's over the sites that sent it; and what was withheld."""
        combined: dict[str, float] = {}
        for split, loss in self.losses.items():
            if loss.count:
                mean = loss.total / loss.count
                combined |= {f"{split}_loss": mean, f"{split}_tokens": loss.count, f"{split}_perplexity": math.exp(mean)}
        if self.examples:
            combined |= {"examples": self.examples, "rouge_l": self.rouge_l / self.examples}
            combined |= {key: score.total / score.count for key, score in self.exact_match.items() if score.count}
        combined |= {"withheld_categories": self.withheld_categories, "withheld_examples": self.withheld_examples}
        return dict(sorted(combined.items()))


def _correct(mean: float, count: int) -> Ratio:
    """The correct answers behind a mean over `count` examples (exact: a count over a small integer)."""
    return Ratio(round(mean * count), count)


def _added(ours: Mapping[str, Ratio], theirs: Mapping[str, Ratio]) -> dict[str, Ratio]:
    return {key: ours.get(key, Ratio(0, 0)) + theirs.get(key, Ratio(0, 0)) for key in sorted(ours.keys() | theirs.keys())}


def _count(reply: Reply, key: str, high: int | None = None) -> int:
    value = reply.integer(key)
    if high is not None and value > high:
        raise Malformed(f"metric {key} is above its bound")
    return value


def _sum(reply: Reply, key: str, high: float) -> float:
    value = reply.number(key)
    if not 0 <= value <= high:
        raise Malformed(f"metric {key} is outside its bounds")
    return value
