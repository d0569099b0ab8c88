"""Deterministic evaluation of a causal LM: held-out loss, greedy-generation text metrics, MMLU by log-likelihood."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist.data.prompts import Example
from florist.evaluation.generation import exact_match, generate, normalize_answer, rouge_l, text_metrics
from florist.evaluation.heldout import HeldOut, HeldOutScores, score_held_out
from florist.evaluation.loss import LossResult, instruction_loss, response_nlls
from florist.evaluation.mmlu import (
    PROMPT_STYLES,
    MMLUResult,
    Question,
    continuation_log_likelihoods,
    evaluate_mmlu,
    load_mmlu,
    load_mmlu_file,
    load_mmlu_hub,
    mmlu_prompt,
)

METRICS = ("loss", "rouge", "exact_match", "mmlu")


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    *,
    examples: Sequence[Example] | HeldOut | None = None,
    mmlu: Sequence[Question] | None = None,
    template: str = "alpaca",
    mmlu_style: str = "harness",
    max_new_tokens: int = 128,
    max_length: int = 512,
    batch_size: int = 8,
    mmlu_limit: int | None = None,
    metrics: Sequence[str] = METRICS,
    progress: bool = False,
) -> dict[str, float | int | dict[str, int]]:
    """The requested metrics as one flat JSON-serialisable dict, for a run directory's metrics file.

    "loss", "rouge" and "exact_match" are computed on `examples` (prompted with `template`; a `HeldOut` is
    tokenised already), "mmlu" on `mmlu`; a requested metric whose data is not given is left out, so the
    default asks for whatever the data allows.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not examples and not mmlu:
        raise ValueError("nothing to evaluate: give examples, MMLU questions or both")
    results: dict[str, float | int | dict[str, int]] = {}
    wants_loss, wants_answers = "loss" in metrics, bool({"rouge", "exact_match"} & set(metrics))
    if examples and (wants_loss or wants_answers):
        held_out = examples if isinstance(examples, HeldOut) else HeldOut.tokenize(tokenizer, examples, template)
        scores = score_held_out(
            model,
            tokenizer,
            held_out,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            loss=wants_loss,
            answers=wants_answers,
            progress=progress,
        )
        if wants_loss:
            loss = LossResult.of(scores.nlls, len(held_out), max_length)
            results.update(test_loss=loss.mean_nll, test_perplexity=loss.perplexity, test_tokens=loss.tokens)
        if wants_answers:
            scored = text_metrics(scores.answers, held_out.examples)
            if "rouge" in metrics:
                results["rouge_l"] = scored["rouge_l"]
            if "exact_match" in metrics:
                results.update({key: value for key, value in scored.items() if key.startswith("exact_match")})
    if mmlu and "mmlu" in metrics:
        results.update(
            evaluate_mmlu(
                model,
                tokenizer,
                mmlu,
                style=mmlu_style,
                batch_size=batch_size,
                limit=mmlu_limit,
                progress=progress,
            ).as_metrics()
        )
    return results


__all__ = [
    "METRICS",
    "PROMPT_STYLES",
    "HeldOut",
    "HeldOutScores",
    "LossResult",
    "MMLUResult",
    "Question",
    "continuation_log_likelihoods",
    "evaluate",
    "evaluate_mmlu",
    "exact_match",
    "generate",
    "instruction_loss",
    "load_mmlu",
    "load_mmlu_file",
    "load_mmlu_hub",
    "mmlu_prompt",
    "normalize_answer",
    "response_nlls",
    "rouge_l",
    "score_held_out",
    "text_metrics",
]
