"""MMLU scored by log-likelihood of the answer letters, the way lm-evaluation-harness scores multiple choice.

No sampling, no string matching: each option's score is log p(" A" | prompt) (and so on), the prediction is the
best-scoring letter. Beside the accuracy come the predicted-letter distribution and the always-A/B/C/D baselines,
because a small model that answers one letter everywhere scores that letter's share of the gold answers.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from florist.data.prompts import TEMPLATES, Example, render_prompt
from florist.evaluation.batching import evaluating, length_sorted_batches, pad_id, padded
from florist.evaluation.loss import response_nlls
from florist.sources import looks_like_path

LETTERS = ("A", "B", "C", "D")
# "harness" is lm-evaluation-harness's zero-shot MMLU prompt; the others wrap the question in an
# instruction template and end the way the subset's answers begin ("The answer is: C. ...").
PROMPT_STYLES = ("harness", *TEMPLATES)
INSTRUCTION = "Please answer the following multiple-choice question honestly."
INSTRUCTION_ANSWER_CUE = "The answer is:"
# The 1,444-question subset's records ("Qusetion" is the subset's own spelling).
_SUBSET_INPUT = re.compile(
    r"^Qu(?:estion|setion): (?P<question>.*) Options: A\. (?P<A>.*), B\. (?P<B>.*), C\. (?P<C>.*), D\. (?P<D>.*)$",
    re.DOTALL,
)
_SUBSET_OUTPUT = re.compile(r"^The answer is: (?P<letter>[ABCD])\. (?P<text>.*)$", re.DOTALL)


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; `answer` indexes `choices`."""

    question: str
    choices: tuple[str, str, str, str]
    answer: int
    subject: str


@dataclass(frozen=True)
class MMLUResult:
    accuracy: float
    macro_accuracy: float  # mean of the per-subject accuracies
    per_subject: dict[str, float]
    predicted_letters: dict[str, int]
    always_letter: dict[str, float]  # accuracy of answering that letter to every question
    questions: int

    def as_metrics(self) -> dict[str, float | int | dict[str, int]]:
        """Flat, JSON-serialisable metrics."""
        return {
            "mmlu_accuracy": self.accuracy,
            "mmlu_macro": self.macro_accuracy,
            "mmlu_questions": self.questions,
            "mmlu_pred_dist": dict(self.predicted_letters),
            **{f"mmlu_always_{letter}": value for letter, value in self.always_letter.items()},
            **{f"mmlu/{subject}": value for subject, value in self.per_subject.items()},
        }


def _subset_question(record: object, where: str) -> Question:
    if not isinstance(record, dict) or not {"input", "output", "class"} <= record.keys():
        raise ValueError(f"{where}: expected an object with keys input, output, class")
    parsed = _SUBSET_INPUT.match(str(record["input"]))
    if parsed is None:
        raise ValueError(f"{where}: key 'input' is not 'Question: ... Options: A. ..., B. ..., C. ..., D. ...'")
    gold = _SUBSET_OUTPUT.match(str(record["output"]))
    if gold is None:
        raise ValueError(f"{where}: key 'output' is not 'The answer is: <A-D>. ...'")
    return Question(
        question=parsed["question"],
        choices=tuple(parsed[letter] for letter in LETTERS),
        answer=LETTERS.index(gold["letter"]),
        subject=str(record["class"]),
    )


def load_mmlu_file(path: str | Path) -> list[Question]:
    """Questions from a JSON list of {instruction, input, output, class} records (the 1,444-question subset)."""
    try:
        records = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of questions")
    return [_subset_question(record, f"{path}[{index}]") for index, record in enumerate(records)]


def load_mmlu_hub(dataset: str = "cais/mmlu", subject: str = "all", split: str = "test") -> list[Question]:
    """Questions from a Hugging Face dataset with `cais/mmlu`'s columns (needs the hub)."""
    from datasets import load_dataset

    return [
        Question(question=row["question"], choices=tuple(row["choices"]), answer=row["answer"], subject=row["subject"])
        for row in load_dataset(dataset, subject, split=split)
    ]


def load_mmlu(source: str | Path) -> list[Question]:
    """Questions from a local file, or from the hub when `source` is a hub id; a missing local path is an error."""
    path = Path(source)
    if path.is_file():
        return load_mmlu_file(path)
    if path.exists() or isinstance(source, Path) or looks_like_path(source):
        raise ValueError(f"{source}: {'not a file' if path.exists() else 'no such file'}; expected an MMLU JSON file")
    return load_mmlu_hub(source)


def mmlu_prompt(question: Question, style: str = "harness") -> str:
    """The text after which the answer letter is scored; it ends with a colon, the letter follows as " A"."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))
    if style == "harness":
        subject = question.subject.replace("_", " ")
        return (
            f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{question.question.strip()}\n{options}\nAnswer:"
        )
    if style in TEMPLATES:
        example = Example(instruction=INSTRUCTION, response="", context=f"{question.question.strip()}\n{options}")
        return render_prompt(example, style) + INSTRUCTION_ANSWER_CUE
    raise ValueError(f"unknown MMLU prompt style {style!r}; choose from {', '.join(PROMPT_STYLES)}")


def continuation_log_likelihoods(
    model: torch.nn.Module,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """log p(continuation | context) for every pair: a (len(contexts), len(continuations)) tensor.

    When every continuation is one token (" A".." D" in most tokenizers) one forward pass per context scores all
    of them; otherwise each context + continuation is scored separately, summing the continuation's token
    log-probabilities.
    """
    context_ids = [tokenizer(context).input_ids for context in contexts]
    continuation_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in continuations]
    if any(not ids for ids in continuation_ids):
        raise ValueError(f"a continuation encodes to no tokens: {list(continuations)!r}")
    if all(len(ids) == 1 for ids in continuation_ids):
        return _next_token_log_likelihoods(
            model, context_ids, [ids[0] for ids in continuation_ids], pad_id(tokenizer), batch_size, progress
        )
    pairs = [(context, continuation) for context in context_ids for continuation in continuation_ids]
    nlls = response_nlls(model, pairs, pad=pad_id(tokenizer), batch_size=batch_size, progress=progress)
    return -torch.tensor([total for total, _ in nlls], dtype=torch.float64).view(len(contexts), -1)


def _next_token_log_likelihoods(
    model: torch.nn.Module,
    context_ids: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    pad: int,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    scores = torch.empty((len(context_ids), len(token_ids)), dtype=torch.float64)
    with evaluating(model) as device:
        for batch in length_sorted_batches(
            [len(ids) for ids in context_ids], batch_size, progress=progress, description="mmlu"
        ):
            # Right padding: a causal model's logits at the last real token do not see the padding after it.
            input_ids, attention_mask = padded([context_ids[i] for i in batch], pad, "right", device)
            last = attention_mask.sum(dim=1, keepdim=True) - 1
            # The vocabulary projection only where a row ends: it is a large share of a small model's compute.
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=last).logits
            log_probs = torch.log_softmax(logits[:, 0].float(), dim=-1)
            scores[batch] = log_probs[:, list(token_ids)].double().cpu()
    return scores


def _spread(questions: Sequence[Question], limit: int) -> list[Question]:
    # Evenly spaced rather than the first `limit`: the files are sorted by subject.
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    count = min(limit, len(questions))
    return [questions[index * len(questions) // count] for index in range(count)]


def score_predictions(questions: Sequence[Question], predictions: Sequence[int]) -> MMLUResult:
    """Accuracy (overall and per subject), letter distribution and always-one-letter baselines."""
    correct_by_subject: dict[str, list[bool]] = defaultdict(list)
    for question, predicted in zip(questions, predictions, strict=True):
        correct_by_subject[question.subject].append(predicted == question.answer)
    per_subject = {subject: sum(marks) / len(marks) for subject, marks in sorted(correct_by_subject.items())}
    predicted = Counter(predictions)
    gold = Counter(question.answer for question in questions)
    return MMLUResult(
        accuracy=sum(sum(marks) for marks in correct_by_subject.values()) / len(questions),
        macro_accuracy=sum(per_subject.values()) / len(per_subject),
        per_subject=per_subject,
        predicted_letters={letter: predicted[index] for index, letter in enumerate(LETTERS)},
        always_letter={letter: gold[index] / len(questions) for index, letter in enumerate(LETTERS)},
        questions=len(questions),
    )


def evaluate_mmlu(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    *,
    style: str = "harness",
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = False,
) -> MMLUResult:
    """Zero-shot MMLU: the prediction is the letter whose " X" continuation is most likely after the prompt."""
    if not questions:
        raise ValueError("no MMLU questions to evaluate")
    chosen = list(questions) if limit is None else _spread(questions, limit)
    scores = continuation_log_likelihoods(
        model,
        tokenizer,
        [mmlu_prompt(question, style) for question in chosen],
        [f" {letter}" for letter in LETTERS],
        batch_size=batch_size,
        progress=progress,
    )
    return score_predictions(chosen, scores.argmax(dim=1).tolist())
