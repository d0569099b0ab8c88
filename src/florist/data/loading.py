"""Instruction examples from local JSON/JSONL files, per-client directories, or Hugging Face datasets.

Records use Dolly field names (instruction, context, response, category) or Alpaca ones (instruction, input,
output); the format is read off each record. A directory holds one file per split (`test.json`) and one per
client (`client_0.json`, ...), so a published non-IID split is used exactly as given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import datasets

from florist.data.prompts import Example
from florist.sources import looks_like_path

FILE_SUFFIXES = (".json", ".jsonl")
# Answer field -> the context field that goes with it: Dolly, then Alpaca.
ANSWER_TO_CONTEXT = {"response": "context", "output": "input"}
CLIENT_FILE = re.compile(r"client_(\d+)\.jsonl?")


def load_examples(source: str | Path, split: str = "train", **dataset_options: object) -> list[Example]:
    """The examples of a local file, of one split of a local directory, or of a Hugging Face dataset.

    A directory's split is its `<split>.json` (or `.jsonl`); "train" falls back to all its client files in order.
    Only a hub id (see florist.sources) goes to `datasets.load_dataset(source, split=split, **dataset_options)`.
    """
    path = Path(source)
    if path.is_file():
        _reject_options(path, dataset_options)
        if split != "train":
            raise ValueError(f"{path} is a single file: its only split is 'train', not {split!r}")
        return _read_file(path)
    if path.is_dir():
        _reject_options(path, dataset_options)
        return _read_directory_split(path, split)
    if isinstance(source, Path) or looks_like_path(source):
        raise ValueError(f"no such file or directory: {source}")
    dataset = datasets.load_dataset(str(source), split=split, **dataset_options)
    return _to_examples(dataset, f"{source} [{split}]")


def load_clients(directory: str | Path) -> list[list[Example]]:
    """Each client's examples from `client_0.json`, `client_1.json`, ... in a directory, in client order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"not a directory: {directory}")
    files = {int(match[1]): path for path in directory.iterdir() if (match := CLIENT_FILE.fullmatch(path.name))}
    if not files:
        raise ValueError(f"{directory} has no client files (client_0.json, client_1.json, ...)")
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing:
        raise ValueError(f"{directory} has client files up to client_{max(files)} but lacks client_{missing[0]}")
    return [_read_file(files[index]) for index in sorted(files)]


def _reject_options(path: Path, dataset_options: Mapping[str, object]) -> None:
    if dataset_options:
        raise ValueError(f"{path} is local: options {', '.join(dataset_options)} apply to Hugging Face datasets only")


def _read_directory_split(directory: Path, split: str) -> list[Example]:
    for suffix in FILE_SUFFIXES:
        if (directory / f"{split}{suffix}").is_file():
            return _read_file(directory / f"{split}{suffix}")
    if split == "train" and any(CLIENT_FILE.fullmatch(path.name) for path in directory.iterdir()):
        return [example for client in load_clients(directory) for example in client]
    present = sorted(path.stem for path in directory.iterdir() if path.suffix in FILE_SUFFIXES)
    listing = ", ".join(present) or "no data files"
    raise ValueError(f"{directory} has no split {split!r} ({split}.json); it has: {listing}")


def _read_file(path: Path) -> list[Example]:
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .json (a list of objects) or .jsonl")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got a {type(records).__name__}")
    return _to_examples(records, str(path))


def _to_examples(records: Iterable[object], origin: str) -> list[Example]:
    examples = [_to_example(record, origin, index) for index, record in enumerate(records)]
    if not examples:
        raise ValueError(f"{origin}: no examples")
    return examples


def _to_example(record: object, origin: str, index: int) -> Example:
    where = f"{origin}: record {index}"
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is a {type(record).__name__}, not an object")
    answer_key = next((key for key in ANSWER_TO_CONTEXT if key in record), None)
    if answer_key is None:
        raise ValueError(f"{where} is missing key 'response' (Dolly) or 'output' (Alpaca)")
    return Example(
        instruction=_text(record, "instruction", where, required=True),
        response=_text(record, answer_key, where, required=True),
        # Context and category are optional: Alpaca has no category, WizardLM no input.
        context=_text(record, ANSWER_TO_CONTEXT[answer_key], where, required=False),
        category=_text(record, "category", where, required=False),
    )


def _text(record: Mapping, key: str, where: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where} is missing key {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value
