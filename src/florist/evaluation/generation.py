"""Greedy generation and the text metrics scored on it: ROUGE-L F1 and exact match."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from florist.data.prompts import Example
from florist.evaluation.batching import evaluating, length_sorted_batches, pad_id, padded

CHATML_END = "<|im_end|>"
_TRAILING_PUNCTUATION = ".,;:!?\"'"


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and, where the vocabulary has it, ChatML's end of turn: either ends a response."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chatml_end = tokenizer.convert_tokens_to_ids(CHATML_END)
    if chatml_end is not None and chatml_end != tokenizer.unk_token_id and chatml_end not in stops:
        stops.append(chatml_end)
    if not stops:
        raise ValueError("the tokenizer has neither an EOS token nor <|im_end|>: generation could not stop")
    return stops


def greedy_config(max_new_tokens: int, stops: Sequence[int], pad: int) -> GenerationConfig:
    """Greedy decoding that ends a row at any stop token, and the batch once every row has ended."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=list(stops), pad_token_id=pad
    )


def answer_text(tokenizer, new_tokens: Sequence[int], stops: Sequence[int]) -> str:
    """The generated tokens up to the first stop token, as text."""
    ends = [position for position, token in enumerate(new_tokens) if token in stops]
    response = new_tokens[: ends[0]] if ends else new_tokens
    return tokenizer.decode(response, skip_special_tokens=True).strip()


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    max_prompt_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy continuation of each prompt, up to `max_new_tokens`, cut at the first stop token.

    Prompts longer than `max_prompt_tokens` keep their last tokens, as training truncates them,
    so the response marker at the end survives.
    """
    prompt_ids = [tokenizer(prompt).input_ids for prompt in prompts]
    if max_prompt_tokens:
        prompt_ids = [ids[-max_prompt_tokens:] for ids in prompt_ids]
    return generate_from_ids(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )


def generate_from_ids(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """`generate` for prompts tokenised already."""
    stops = stop_token_ids(tokenizer)
    pad = pad_id(tokenizer)
    config = greedy_config(max_new_tokens, stops, pad)
    texts = [""] * len(prompt_ids)
    with evaluating(model) as device:
        for batch in length_sorted_batches(
            [len(ids) for ids in prompt_ids], batch_size, progress=progress, description="generate"
        ):
            # Left padding: every row's next token then comes from its own last prompt token.
            input_ids, attention_mask = padded([prompt_ids[i] for i in batch], pad, "left", device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for index, new_tokens in zip(batch, output[:, input_ids.shape[1] :].tolist()):
                texts[index] = answer_text(tokenizer, new_tokens, stops)
    return texts


def _words(text: str) -> list[str]:
    return text.lower().split()


def _lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    # One row of the dynamic-programming table at a time: row[j] = LCS of the prefix read so far and second[:j].
    row = [0] * (len(second) + 1)
    for word in first:
        diagonal = 0
        for j, other in enumerate(second, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if word == other else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased whitespace tokens; 0 when either side is empty (as rouge-score does)."""
    predicted, expected = _words(prediction), _words(reference)
    common = _lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    """Lowercase, single spaces, no surrounding whitespace or trailing punctuation."""
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def text_metrics(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Mean ROUGE-L F1 and exact match against the examples' responses, and exact match per category."""
    if not examples:
        raise ValueError("no examples to score")
    matches_by_category: dict[str, list[bool]] = defaultdict(list)
    rouge = 0.0
    for prediction, example in zip(predictions, examples, strict=True):
        rouge += rouge_l(prediction, example.response)
        matches_by_category[example.category].append(exact_match(prediction, example.response))
    matches = [match for category in matches_by_category.values() for match in category]
    return {
        "rouge_l": rouge / len(examples),
        "exact_match": sum(matches) / len(matches),
        **{
            f"exact_match/{category}": sum(marks) / len(marks)
            for category, marks in sorted(matches_by_category.items())
            if category
        },
    }
