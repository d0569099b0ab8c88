"""Evaluation through its real code paths, with tiny models whose right answers are known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput
from transformers.modeling_utils import slice_logits_to_keep

from florist.data.prompts import Example
from florist.evaluation import (
    HeldOut,
    Question,
    continuation_log_likelihoods,
    evaluate,
    evaluate_mmlu,
    exact_match,
    generate,
    instruction_loss,
    load_mmlu_file,
    response_nlls,
    rouge_l,
    score_held_out,
    text_metrics,
)
from florist.evaluation.generation import _lcs_length
from florist.evaluation.mmlu import score_predictions

MMLU_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu" / "mmlu_1444.json"
# Each marker word names the gold letter, so a model that reads it can answer every question.
MARKERS = {"north": "A", "east": "B", "south": "C", "west": "D"}
WORDS = ["A", "B", "C", "D", ":", "Answer", *MARKERS, "go", "stay", "turn", "q", "x", "y", "z", "which", "way"]
# <|im_end|> is an ordinary token here, as in base models' vocabularies: decoding keeps it unless cut.
SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocabulary = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[EOS]",
    )


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def bigram_llama(tokenizer, next_token: dict[str, str], default: str | None = None) -> LlamaForCausalLM:
    """A real Llama whose layers add nothing, so its logits depend on the current token only (a bigram table)."""
    model = tiny_llama(len(tokenizer))
    assert len(tokenizer) <= model.config.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(tokenizer), model.config.hidden_size))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        table = torch.zeros_like(model.lm_head.weight)
        if default is not None:
            table[tokenizer.convert_tokens_to_ids(default), :] = 10.0
        for current, following in next_token.items():
            column = tokenizer.convert_tokens_to_ids(current)
            table[:, column] = 0.0
            table[tokenizer.convert_tokens_to_ids(following), column] = 10.0
        model.lm_head.weight.copy_(table)
    return model


class AnswerKeyModel(torch.nn.Module):
    """Right after a ":" it predicts the letter of the last marker word before it; everywhere else, "A"."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the evaluators a device to read
        self.vocab_size = len(tokenizer)
        self.colon = tokenizer.convert_tokens_to_ids(":")
        self.letter_of = {
            tokenizer.convert_tokens_to_ids(marker): tokenizer.convert_tokens_to_ids(letter)
            for marker, letter in MARKERS.items()
        }
        self.default = tokenizer.convert_tokens_to_ids("A")

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_) -> CausalLMOutput:
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row, tokens in enumerate(input_ids.tolist()):
            letter = None
            for position, token in enumerate(tokens):
                letter = self.letter_of.get(token, letter)
                favoured = letter if token == self.colon and letter is not None else self.default
                logits[row, position, favoured] = 10.0
        return CausalLMOutput(logits=slice_logits_to_keep(logits, logits_to_keep))


def marked_questions() -> list[Question]:
    """Questions of different lengths (so batches are padded) whose gold letters vary."""
    golds = "BDCABCDBB"
    letters = "ABCD"
    markers = {letter: marker for marker, letter in MARKERS.items()}
    return [
        Question(
            question=" ".join(["which way"] * (1 + index % 4) + [markers[gold]]),
            choices=("x", "y z", "q", "go"),
            answer=letters.index(gold),
            subject=f"subject_{index // 3}",
        )
        for index, gold in enumerate(golds)
    ]


# ---------------------------------------------------------------- MMLU


@pytest.mark.parametrize("style", ["harness", "alpaca", "chatml"])
def test_a_model_that_reads_the_answer_scores_every_question(tokenizer, style):
    questions = marked_questions()
    result = evaluate_mmlu(AnswerKeyModel(tokenizer), tokenizer, questions, style=style, batch_size=4)
    assert result.accuracy == 1.0
    assert result.macro_accuracy == 1.0
    assert result.per_subject == {"subject_0": 1.0, "subject_1": 1.0, "subject_2": 1.0}
    gold_counts = {letter: sum(q.answer == index for q in questions) for index, letter in enumerate("ABCD")}
    assert result.predicted_letters == gold_counts


def test_a_model_that_always_answers_b_scores_the_always_b_baseline(tokenizer):
    questions = marked_questions()
    model = bigram_llama(tokenizer, {}, default="B")
    result = evaluate_mmlu(model, tokenizer, questions, batch_size=4)
    assert result.predicted_letters == {"A": 0, "B": len(questions), "C": 0, "D": 0}
    assert result.accuracy == result.always_letter["B"]
    assert result.always_letter == {
        letter: sum(q.answer == index for q in questions) / len(questions) for index, letter in enumerate("ABCD")
    }


def test_limit_spreads_the_questions_over_the_set(tokenizer):
    questions = marked_questions()
    result = evaluate_mmlu(AnswerKeyModel(tokenizer), tokenizer, questions, limit=3)
    assert result.questions == 3
    assert set(result.per_subject) == {questions[index].subject for index in (0, 3, 6)}


def test_next_token_scores_match_the_summed_continuation_path(tokenizer):
    # " A" is one token (the batched next-token path); " A :" is two (the per-continuation NLL path).
    model = tiny_llama(len(tokenizer), seed=1)
    contexts = ["which way : north", "go", "x y z Answer :"]
    single = continuation_log_likelihoods(model, tokenizer, contexts, [" A", " B"], batch_size=2)
    double = continuation_log_likelihoods(model, tokenizer, contexts, [" A :", " B"], batch_size=2)
    after_a = continuation_log_likelihoods(model, tokenizer, [c + " A" for c in contexts], [" :", " x"])
    torch.testing.assert_close(double[:, 0], single[:, 0] + after_a[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(double[:, 1], single[:, 1], atol=1e-5, rtol=1e-5)


def test_scores_do_not_depend_on_the_batch_they_are_padded_in(tokenizer):
    model = tiny_llama(len(tokenizer), seed=2)
    contexts = [" ".join(["which way"] * n) + " Answer :" for n in range(1, 7)]
    alone = continuation_log_likelihoods(model, tokenizer, contexts, [" A", " B", " C", " D"], batch_size=1)
    together = continuation_log_likelihoods(model, tokenizer, contexts, [" A", " B", " C", " D"], batch_size=6)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_the_subset_file_parses_and_its_baselines_are_the_published_ones():
    questions = load_mmlu_file(MMLU_SUBSET)
    assert len(questions) == 1444
    assert len({question.subject for question in questions}) == 57
    baselines = score_predictions(questions, [0] * len(questions)).always_letter
    assert {letter: round(100 * share, 1) for letter, share in baselines.items()} == {
        "A": 22.4,
        "B": 25.7,
        "C": 25.0,
        "D": 26.9,
    }


def test_a_malformed_subset_record_names_the_file_index_and_key(tmp_path):
    good = {
        "instruction": "Please answer.",
        "input": "Qusetion: Two plus two? Options: A. 3, B. 4, C. 5, D. 22",
        "output": "The answer is: B. 4",
        "class": "arithmetic",
    }
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps([good, {**good, "output": "B"}]))
    with pytest.raises(ValueError, match=r"mmlu\.json\[1\]: key 'output'"):
        load_mmlu_file(path)
    path.write_text(json.dumps([good]))
    assert load_mmlu_file(path) == [Question("Two plus two?", ("3", "4", "5", "22"), 1, "arithmetic")]


# ---------------------------------------------------------------- ROUGE-L and exact match


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("The CAT sat", "the cat  sat", 1.0),
        ("a b c", "x y z", 0.0),
        ("the cat sat on the mat", "the cat lay on a mat", 2 / 3),  # LCS "the cat on mat": P = R = 4/6
        ("a b c", "a x c y z", 0.5),  # LCS 2: P = 2/3, R = 2/5
        ("a b", "b a", 0.5),  # order matters: LCS 1
        ("", "a b", 0.0),
        ("a b", "", 0.0),
        ("", "", 0.0),
    ],
)
def test_rouge_l_against_hand_computed_cases(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def brute_force_lcs(first: list[str], second: list[str]) -> int:
    if not first or not second:
        return 0
    if first[0] == second[0]:
        return 1 + brute_force_lcs(first[1:], second[1:])
    return max(brute_force_lcs(first[1:], second), brute_force_lcs(first, second[1:]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("abc"), max_size=7), st.lists(st.sampled_from("abc"), max_size=7))
def test_lcs_matches_the_recursive_definition(first, second):
    assert _lcs_length(first, second) == brute_force_lcs(first, second)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("  The   Answer.  ", "the answer", True),
        ("Paris!", "paris", True),
        ("u.s.a", "U.S.A.", True),
        ("paris", "paris, france", False),
        ("a,b", "ab", False),
        ("", "", True),
    ],
)
def test_exact_match_normalises_whitespace_case_and_trailing_punctuation(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


def test_text_metrics_report_exact_match_per_category():
    examples = [
        Example("q", "Paris", category="capital"),
        Example("q", "Rome", category="capital"),
        Example("q", "blue sky", category="colour"),
    ]
    scored = text_metrics(["paris.", "Madrid", "blue"], examples)
    assert scored["exact_match"] == pytest.approx(1 / 3)
    assert scored["exact_match/capital"] == 0.5
    assert scored["exact_match/colour"] == 0.0
    # ROUGE-L keeps punctuation on its whitespace tokens: "paris." is not "paris".
    assert scored["rouge_l"] == pytest.approx((0.0 + 0.0 + 2 / 3) / 3)


# ---------------------------------------------------------------- loss


def test_uniform_logits_give_log_vocabulary_per_response_token(tokenizer):
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    examples = [Example("which way", "x y"), Example("go", "z", context="north south east")]
    result = instruction_loss(model, tokenizer, examples, template="alpaca", batch_size=2)
    assert result.tokens == 3 + 2  # each response and its [EOS]
    assert result.mean_nll == pytest.approx(math.log(len(tokenizer)), rel=1e-6)
    assert result.perplexity == pytest.approx(len(tokenizer), rel=1e-5)


def test_prompt_tokens_are_not_scored(tokenizer):
    # The model is sure the next token is "x": free on an all-"x" response, costly on any other token.
    model = bigram_llama(tokenizer, {}, default="x")
    ids = tokenizer.convert_tokens_to_ids
    prompt, response = ids(["y", "z", "q", "go"]), ids(["x", "x", "x"])
    [(total, count)] = response_nlls(model, [(prompt, response)])
    assert count == 3
    assert total < 1e-3
    [(cut_total, cut_count)] = response_nlls(model, [(prompt, ids(["y", "x", "x"]))], max_length=5)
    assert cut_count == 1
    assert cut_total > 5.0  # the one kept token, "y", which the model did not expect
    assert response_nlls(model, [(prompt, response)], max_length=4) == [(0.0, 0)]


def test_response_losses_do_not_depend_on_batching(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    ids = tokenizer.convert_tokens_to_ids
    pairs = [(ids(["go"] * n), ids(["x", "y", "z"][: 1 + n % 3])) for n in range(1, 7)]
    alone = response_nlls(model, pairs, batch_size=1)
    together = response_nlls(model, pairs, batch_size=4)
    assert [count for _, count in together] == [count for _, count in alone]
    for (total, _), (expected, _) in zip(together, alone):
        assert total == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- generation


def test_generation_is_greedy_and_stops_at_eos_or_im_end(tokenizer):
    chain = {"go": "x", "x": "y", "y": "[EOS]", "[EOS]": "z", "turn": "q", "q": "<|im_end|>", "<|im_end|>": "y"}
    model = bigram_llama(tokenizer, chain, default="z")
    prompts = ["go", "which way which way go", "turn", "stay"]
    texts = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    assert texts == ["x y", "x y", "q", "z z z z"]


def test_generation_keeps_only_the_last_prompt_tokens(tokenizer):
    model = bigram_llama(tokenizer, {"go": "x", "x": "[EOS]"}, default="z")
    widths, original = [], model.generate

    def recording(**kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return original(**kwargs)

    model.generate = recording
    texts = generate(model, tokenizer, ["stay stay stay stay go"], max_new_tokens=3, max_prompt_tokens=2)
    assert texts == ["x"]  # the kept end still carries the prompt's last token
    assert widths == [2]


# ---------------------------------------------------------------- loss and answers in one pass


def held_out_examples() -> list[Example]:
    """Prompts of 2 to 20 words and responses of 1 to 4, so batches pad both on the left and the right."""
    words = ["which", "way", "go", "stay", "turn", "north", "east", "x", "y", "z"]
    return [
        Example(
            " ".join(words[(index + k) % len(words)] for k in range(1 + index % 5)),
            " ".join(words[(3 * index + k) % len(words)] for k in range(1 + index % 4)),
            context=" ".join(["q"] * (index * 7 % 16)),
            category=f"c{index % 3}",
        )
        for index in range(14)
    ]


def apart(model, tokenizer, held_out: HeldOut, max_length: int, max_new_tokens: int):
    """The reference: the response loss and the greedy answers from their own passes."""
    nlls = response_nlls(model, list(held_out.pairs), pad=tokenizer.pad_token_id, max_length=max_length, batch_size=5)
    budget = max(1, max_length - max_new_tokens)
    answers = generate(
        model, tokenizer, [" ".join(tokenizer.convert_ids_to_tokens(list(p))) for p, _ in held_out.pairs],
        max_new_tokens=max_new_tokens, max_prompt_tokens=budget, batch_size=5,
    )
    return nlls, answers


@pytest.mark.parametrize("max_length", [64, 14], ids=["nothing-cut", "some-cut"])
@pytest.mark.parametrize("seed", [0, 5])
def test_one_pass_gives_the_losses_and_answers_of_the_separate_passes(tokenizer, seed, max_length):
    model = tiny_llama(len(tokenizer), seed=seed)
    with torch.no_grad():  # a peaked next-token distribution, as a trained model has, so greedy answers vary
        model.lm_head.weight.mul_(40.0)
    held_out = HeldOut.tokenize(tokenizer, held_out_examples(), "alpaca")
    scores = score_held_out(model, tokenizer, held_out, max_length=max_length, max_new_tokens=4, batch_size=4)
    nlls, answers = apart(model, tokenizer, held_out, max_length, max_new_tokens=4)
    assert [count for _, count in scores.nlls] == [count for _, count in nlls]
    for (total, _), (expected, _) in zip(scores.nlls, nlls):
        assert total == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert scores.answers == answers
    assert len(set(answers)) >= 3  # answers differ between examples, some stop early: the comparison has teeth


def test_generation_reuses_the_prompt_of_the_loss_pass_and_stops_with_the_last_answer(tokenizer):
    # Every answer is "x y" then [EOS]: two tokens and a stop, whatever max_new_tokens allows.
    model = bigram_llama(tokenizer, {"x": "y", "y": "[EOS]"}, default="x")
    widths, forward = [], model.forward

    def recording(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = recording
    held_out = HeldOut.tokenize(tokenizer, held_out_examples()[:4], "alpaca")
    scores = score_held_out(model, tokenizer, held_out, max_length=128, max_new_tokens=30, batch_size=4)
    assert scores.answers == ["x y"] * 4
    prompt_width = max(len(prompt) for prompt, _ in held_out.pairs)
    response_width = max(len(response) for _, response in held_out.pairs)
    # One teacher-forced pass, then generation from the prompt's last token, then "y" and "[EOS]".
    assert widths == [prompt_width + response_width, 1, 1, 1]


def test_evaluate_takes_examples_tokenised_once(tokenizer):
    model = tiny_llama(len(tokenizer), seed=4)
    examples = held_out_examples()
    options = dict(template="alpaca", max_new_tokens=3, batch_size=4, max_length=32)
    assert evaluate(model, tokenizer, examples=HeldOut.tokenize(tokenizer, examples, "alpaca"), **options) == evaluate(
        model, tokenizer, examples=examples, **options
    )


# ---------------------------------------------------------------- the convenience entry


def test_evaluate_returns_flat_json_metrics_that_agree_with_the_parts(tokenizer):
    model = tiny_llama(len(tokenizer), seed=4)
    examples = [Example("which way", "x y", category="open_qa"), Example("go", "z", category="brainstorming")]
    metrics = evaluate(
        model, tokenizer, examples=examples, mmlu=marked_questions(), template="alpaca", max_new_tokens=3, batch_size=2
    )
    json.dumps(metrics)
    loss = instruction_loss(model, tokenizer, examples, template="alpaca")
    assert metrics["test_loss"] == pytest.approx(loss.mean_nll, rel=1e-6)
    assert metrics["mmlu_accuracy"] == evaluate_mmlu(model, tokenizer, marked_questions(), batch_size=2).accuracy
    assert sum(metrics["mmlu_pred_dist"].values()) == len(marked_questions())
    expected_keys = {"rouge_l", "exact_match", "exact_match/open_qa", "exact_match/brainstorming", "mmlu_always_B"}
    assert expected_keys <= metrics.keys()
    only_loss = evaluate(model, tokenizer, examples=examples, template="alpaca", metrics=("loss",))
    assert set(only_loss) == {"test_loss", "test_perplexity", "test_tokens"}


def test_evaluate_rejects_unknown_metrics_and_missing_data(tokenizer):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="unknown metrics bleu"):
        evaluate(model, tokenizer, examples=[Example("go", "x")], template="alpaca", metrics=("bleu",))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(model, tokenizer, template="alpaca")


def test_progress_display_changes_nothing_in_the_metrics(tokenizer):
    model = tiny_llama(len(tokenizer), seed=4)
    examples = [Example("which way", "x y", category="open_qa"), Example("go", "z", category="brainstorming")]
    options = dict(examples=examples, mmlu=marked_questions(), template="alpaca", max_new_tokens=3, batch_size=1)
    assert evaluate(model, tokenizer, progress=True, **options) == evaluate(model, tokenizer, progress=False, **options)
