"""Turning examples into training features with the loss on response tokens only, and batching them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from florist.data.prompts import Example, render_prompt, response_end

IGNORE_INDEX = -100
"""The label the causal-LM loss skips (transformers' convention)."""


def encode(
    tokenizer: PreTrainedTokenizerBase, example: Example, template: str, max_length: int
) -> dict[str, list[int]]:
    """input_ids = prompt + response + end marker; labels = the same with every prompt position set to -100.

    Over `max_length`, the response is cut from the right; if the prompt alone is too long, it is cut from the left
    (its end, which cues the response, stays) so at least one response token still has a prompt token before it.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a response token), got {max_length}")
    end = response_end(template, tokenizer.eos_token)
    if not end:
        raise ValueError(f"the tokenizer has no eos_token, which the {template!r} template uses to end a response")
    # Tokenised apart so the prompt/response boundary is exact; the prompt gets the tokenizer's BOS, if any.
    prompt = tokenizer(render_prompt(example, template)).input_ids
    response = tokenizer(example.response + end, add_special_tokens=False).input_ids
    kept_response = response[: max(max_length - len(prompt), 1)]
    kept_prompt = prompt[len(prompt) - min(len(prompt), max_length - len(kept_response)) :]
    return {
        "input_ids": kept_prompt + kept_response,
        "labels": [IGNORE_INDEX] * len(kept_prompt) + kept_response,
    }


def pad_batch(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors input_ids, attention_mask and labels (padding is masked out of the loss)."""
    if not features:
        raise ValueError("cannot pad an empty batch")
    input_ids = [torch.tensor(feature["input_ids"], dtype=torch.long) for feature in features]
    labels = [torch.tensor(feature["labels"], dtype=torch.long) for feature in features]
    return {
        "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True, padding_value=0),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }
