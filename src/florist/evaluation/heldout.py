"""Held-out instruction examples, tokenised once and scored in one forward pass per batch.

The response loss needs the model's output over prompt + response; greedy generation needs the
keys and values of the prompt. One teacher-forced pass over prompt + response gives both: its
cache, cut back to the prompt, seeds the generation, so the prompt is computed once instead of
twice (it is most of an example's tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from florist.data.prompts import Example
from florist.evaluation.batching import evaluating, length_sorted_batches, pad_id, padded
from florist.evaluation.generation import answer_text, generate_from_ids, greedy_config, stop_token_ids
from florist.evaluation.loss import response_nlls, tokenize_examples


@dataclass(frozen=True)
class HeldOut:
    """Examples with their (prompt ids, response ids + stop) pairs, as the loss scores them."""

    examples: tuple[Example, ...]
    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    @classmethod
    def tokenize(cls, tokenizer, examples: Sequence[Example], template: str) -> HeldOut:
        pairs = tokenize_examples(tokenizer, examples, template)
        return cls(tuple(examples), tuple((tuple(prompt), tuple(response)) for prompt, response in pairs))

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class HeldOutScores:
    nlls: list[tuple[float, int]]
    """Per example: summed NLL of its response tokens and their count (empty when the loss was not asked)."""
    answers: list[str]
    """Per example: the greedy answer, cut at the first stop token (empty when answers were not asked)."""


def score_held_out(
    model: torch.nn.Module,
    tokenizer,
    held_out: HeldOut,
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    loss: bool = True,
    answers: bool = True,
    progress: bool = False,
) -> HeldOutScores:
    """The response losses and greedy answers `response_nlls` and `generate_from_ids` give apart.

    Loss sequences are cut at `max_length` tokens, generation keeps the last `max_length -
    max_new_tokens` prompt tokens; an example that either cut touches is scored by those two
    functions, every other one by the shared pass.
    """
    prompt_budget = max(1, max_length - max_new_tokens)
    shared = [
        index
        for index, (prompt, response) in enumerate(held_out.pairs)
        if loss and answers and 0 < len(prompt) <= prompt_budget and len(prompt) + len(response) <= max_length
    ]
    apart = sorted(set(range(len(held_out))) - set(shared))
    nlls: list[tuple[float, int]] = [(0.0, 0)] * len(held_out) if loss else []
    texts: list[str] = [""] * len(held_out) if answers else []
    if apart and loss:
        scored = response_nlls(
            model, [held_out.pairs[i] for i in apart], pad=pad_id(tokenizer), batch_size=batch_size,
            max_length=max_length, progress=progress,
        )
        for index, result in zip(apart, scored):
            nlls[index] = result
    if apart and answers:
        generated = generate_from_ids(
            model, tokenizer, [held_out.pairs[i][0][-prompt_budget:] for i in apart],
            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
        )
        for index, text in zip(apart, generated):
            texts[index] = text
    if shared:
        for index, nll, text in _loss_and_answer(model, tokenizer, held_out, shared, max_new_tokens, batch_size, progress):
            nlls[index], texts[index] = nll, text
    return HeldOutScores(nlls, texts)


def _loss_and_answer(model, tokenizer, held_out: HeldOut, indices: list[int], max_new_tokens: int, batch_size: int, progress: bool):
    """(index, (summed NLL, tokens), answer) for each example in `indices`, one teacher-forced pass per batch."""
    pad, stops = pad_id(tokenizer), stop_token_ids(tokenizer)
    config = greedy_config(max_new_tokens, stops, pad)
    with evaluating(model) as device:
        for batch in length_sorted_batches(
            [len(held_out.pairs[i][0]) for i in indices], batch_size, progress=progress, description="loss + generate"
        ):
            items = [indices[position] for position in batch]
            prompts = [held_out.pairs[i][0] for i in items]
            responses = [held_out.pairs[i][1] for i in items]
            # Prompts padded on the left (generation continues every row from the same column),
            # responses on the right; positions count real tokens only, as generate counts them.
            prompt_ids, prompt_mask = padded(prompts, pad, "left", device)
            response_ids, response_mask = padded(responses, pad, "right", device)
            input_ids = torch.cat([prompt_ids, response_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
            position_ids = (attention_mask.cumsum(dim=1) - 1).masked_fill(attention_mask == 0, 0)
            width = prompt_ids.shape[1]
            predicts_response = torch.zeros_like(attention_mask, dtype=torch.bool)
            for row, response in enumerate(responses):
                predicts_response[row, width - 1 : width - 1 + len(response)] = True
            output = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=predicts_response, use_cache=True,
            )
            targets = input_ids[:, 1:][predicts_response[:, :-1]]
            token_nll = F.cross_entropy(output.logits.float(), targets, reduction="none")
            counts = [len(response) for response in responses]
            # Keep the prompt but its last token: generate computes that one again and predicts from it.
            cache = output.past_key_values
            cache.crop(-(input_ids.shape[1] - (width - 1)))
            generated = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache, generation_config=config
            )
            for index, nll, new_tokens in zip(items, token_nll.split(counts), generated[:, width:].tolist()):
                yield index, (nll.sum().item(), len(nll)), answer_text(tokenizer, new_tokens, stops)
