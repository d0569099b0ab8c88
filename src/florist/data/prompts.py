"""Instruction examples and the prompt templates that turn them into text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction-following example (Dolly/Alpaca fields; `context` is Alpaca's `input`)."""

    instruction: str
    response: str
    context: str = ""
    category: str = ""


ALPACA_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# ChatML as SmolLM2-Instruct was tuned on, without its default system prompt.
CHATML = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
CHATML_WITH_CONTEXT = "<|im_start|>user\n{instruction}\n\n{context}<|im_end|>\n<|im_start|>assistant\n"

TEMPLATES = ("alpaca", "chatml")


def render_prompt(example: Example, template: str) -> str:
    """The text the model sees before the response."""
    if template == "alpaca":
        pattern = ALPACA_WITH_CONTEXT if example.context else ALPACA
    elif template == "chatml":
        pattern = CHATML_WITH_CONTEXT if example.context else CHATML
    else:
        raise ValueError(f"unknown prompt template {template!r}; choose from {', '.join(TEMPLATES)}")
    return pattern.format(instruction=example.instruction, context=example.context)


def response_end(template: str, eos_token: str) -> str:
    """What follows the response in training text, so the model learns to stop."""
    return "<|im_end|>" if template == "chatml" else eos_token
