"""Held-out instruction loss: negative log-likelihood of the response tokens only, the prompt masked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from florist.data.prompts import Example, render_prompt, response_end
from florist.evaluation.batching import evaluating, length_sorted_batches, pad_id, padded

TokenPair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class LossResult:
    """Token-weighted over the whole set: every response token counts once, whichever example it is in."""

    mean_nll: float
    perplexity: float
    tokens: int

    @classmethod
    def of(cls, nlls: Sequence[tuple[float, int]], examples: int, max_length: int) -> LossResult:
        """From per-example (summed NLL, tokens)."""
        tokens = sum(count for _, count in nlls)
        if tokens == 0:
            raise ValueError(f"no response tokens to score: {examples} examples, max_length {max_length}")
        mean_nll = sum(total for total, _ in nlls) / tokens
        return cls(mean_nll=mean_nll, perplexity=math.exp(mean_nll), tokens=tokens)


def response_nlls(
    model: torch.nn.Module,
    pairs: Sequence[TokenPair],
    *,
    pad: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """For each (prompt ids, response ids): the summed NLL of the response given the prompt, and its token count.

    The sequence prompt + response is cut at `max_length` tokens, so a response past the cut counts only its
    first tokens (none when the prompt alone fills it). The first token of a sequence has no prediction.
    """
    sequences = [list(prompt) + list(response) for prompt, response in pairs]
    if max_length is not None:
        sequences = [sequence[:max_length] for sequence in sequences]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    with evaluating(model) as device:
        for batch in length_sorted_batches(
            [len(sequence) for sequence in sequences], batch_size, progress=progress, description="loss"
        ):
            input_ids, attention_mask = padded([sequences[i] for i in batch], pad, "right", device)
            # Position t predicts token t + 1: score the positions just before each response token, and
            # project only those onto the vocabulary (the projection is a large share of a small model's compute).
            predicts_response = torch.zeros_like(attention_mask, dtype=torch.bool)
            for row, index in enumerate(batch):
                first = max(len(pairs[index][0]), 1)
                predicts_response[row, first - 1 : len(sequences[index]) - 1] = True
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=predicts_response).logits
            targets = input_ids[:, 1:][predicts_response[:, :-1]]
            token_nll = F.cross_entropy(logits.float(), targets, reduction="none")
            counts = predicts_response.sum(dim=1).tolist()
            for row, (index, nll) in enumerate(zip(batch, token_nll.split(counts))):
                results[index] = (nll.sum().item(), counts[row])
    return results


def tokenize_examples(tokenizer, examples: Sequence[Example], template: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) as training sees them: the response ends with the template's stop text."""
    stop = response_end(template, tokenizer.eos_token)
    return [
        (
            tokenizer(render_prompt(example, template)).input_ids,
            tokenizer(example.response + stop, add_special_tokens=False).input_ids,
        )
        for example in examples
    ]


def instruction_loss(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    template: str,
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> LossResult:
    """Mean NLL per response token over `examples` and its perplexity, exp(mean NLL)."""
    nlls = response_nlls(
        model,
        tokenize_examples(tokenizer, examples, template),
        pad=pad_id(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    return LossResult.of(nlls, len(examples), max_length)
