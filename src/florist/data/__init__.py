"""Instruction data: the generated embedded tasks, loading, client partitioning, prompts and tokenisation."""

from florist.data.embedded import EMBEDDED_CATEGORIES, EMBEDDED_TEMPLATE, generate_embedded
from florist.data.loading import load_clients, load_examples
from florist.data.partition import SCHEMES, carve_validation, partition
from florist.data.prompts import TEMPLATES, Example, render_prompt, response_end
from florist.data.tokenize import IGNORE_INDEX, encode, pad_batch

__all__ = [
    "EMBEDDED_CATEGORIES",
    "EMBEDDED_TEMPLATE",
    "IGNORE_INDEX",
    "SCHEMES",
    "TEMPLATES",
    "Example",
    "carve_validation",
    "encode",
    "generate_embedded",
    "load_clients",
    "load_examples",
    "pad_batch",
    "partition",
    "render_prompt",
    "response_end",
]
