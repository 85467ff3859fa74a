"""Normalisation, parsing and per-question scoring rules, on hand-worked examples.

Every expected value is derived in the comment next to it from the official rule cited in
lightning_lvp/eval/normalize.py and scorers.py.
"""

from __future__ import annotations

import math

import pytest

from lightning_lvp.eval.normalize import (
    normalize_evalai_answer,
    normalize_gqa_answer,
    normalize_vqa_answer,
    parse_mmbench_letter,
    parse_pope_answer,
    parse_sqa_letter,
    process_punctuation,
)
from lightning_lvp.eval.scorers import gqa_exact_match, pope_metrics, vqa_accuracy, vqa_soft_score

# --------------------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a dog.", "dog"),  # period not followed by a digit removed, article "a" dropped
        ("ten", "10"),  # manualMap
        ("yes.", "yes"),
        ("Two", "2"),  # lower-cased before manualMap
        ("none", "0"),  # manualMap quirk: "none" is a number word
        ("it's", "it's"),  # "'" is not in the punct list and "it's" is no contraction key
        ("Dont", "don't"),  # contractions map restores the apostrophe
        ("t-shirt", "t shirt"),  # "-" with no space beside it becomes a space
        ("red - white", "red white"),  # " - " is deleted, then split/join squeezes spaces
        ("1,000", "1000"),  # a digit,digit group: every punctuation mark is deleted
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("3.", "3"),
        ("hello, world?", "hello world"),  # ", " deleted; "?" has no space beside it -> " ", then stripped
        ("The cat's toy", "cat's toy"),
        ("  An apple\n", "apple"),  # newline -> space, strip, article dropped
    ],
)
def test_normalize_vqa_answer_follows_vqaeval(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("it's", "it 's"),  # word_tokenize splits the possessive off: "it's" -> "it 's"
        ("The cat's toy", "cat 's toy"),
        ("a dog.", "dog"),
        ("Yes.", "yes"),
        ("1,000", "1000"),  # word_tokenize deletes every comma first
        ("What?", "what"),  # and every "?"
    ],
)
def test_normalize_evalai_answer_adds_word_tokenize(raw: str, expected: str) -> None:
    assert normalize_evalai_answer(raw) == expected


def test_period_strip_keeps_the_count_bug() -> None:
    # vqaEval.py passes re.UNICODE (== 32) as `count`: 40 periods lose only 32 of them.
    assert process_punctuation("." * 40) == "." * 8


def test_process_punctuation_keeps_case() -> None:
    # processPunctuation never lower-cases; only processDigitArticle does.
    assert process_punctuation("Coca-Cola") == "Coca Cola"


# --------------------------------------------------------------------------- VQA soft score


def _official_loop(prediction: str, answers: list[str]) -> float:
    """Literal transcription of vqaEval.py's loop (answers made distinct by their index)."""
    gt = list(enumerate(answers))
    accs = []
    for datum in gt:
        others = [item for item in gt if item != datum]
        matching = [item for item in others if item[1] == prediction]
        accs.append(min(1, len(matching) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 1 subset without the match scores 0, 9 subsets hold it once: 9 * (1/3) / 10
        (2, 0.6),  # 2 subsets score 1/3, 8 subsets score 2/3: (2/3 + 16/3) / 10
        (3, 0.9),  # 3 subsets score 2/3, 7 score 1: (2 + 7) / 10
        (4, 1.0),  # every subset keeps >= 3 matches
        (10, 1.0),
    ],
)
def test_vqa_soft_score_ten_choose_nine(k: int, expected: float) -> None:
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_soft_score("cat", answers) == pytest.approx(expected)
    assert vqa_soft_score("cat", answers) == pytest.approx(_official_loop("cat", answers))


def test_vqa_accuracy_two_vs_digits_depends_on_protocol() -> None:
    humans = ["2"] * 3 + ["two"] + ["3"] * 6
    # vqa_eval: prediction "Two" -> "2"; the human answers only get processPunctuation, so "two" stays
    # "two": 3 matches -> 0.9.
    assert vqa_accuracy("Two", humans, "vqa_eval") == pytest.approx(0.9)
    # m4c (TextVQA): the EvalAI processor also maps the human "two" -> "2": 4 matches -> 1.0.
    assert vqa_accuracy("Two", humans, "m4c") == pytest.approx(1.0)


def test_vqa_eval_leaves_unanimous_answers_unprocessed() -> None:
    # All ten humans wrote "t-shirt": vqaEval.py skips processPunctuation on them, while the
    # prediction becomes "t shirt", so nothing matches -> 0.0. m4c normalises both sides -> 1.0.
    humans = ["t-shirt"] * 10
    assert vqa_accuracy("t-shirt", humans, "vqa_eval") == 0.0
    assert vqa_accuracy("t-shirt", humans, "vizwiz_eval") == 0.0  # VizWiz never touches the answers
    assert vqa_accuracy("t-shirt", humans, "m4c") == 1.0


def test_vqa_eval_comparison_is_case_sensitive_on_human_answers() -> None:
    # processPunctuation does not lower-case: "Coca Cola" never equals the prediction "coca cola".
    humans = ["Coca Cola"] * 3 + ["pepsi"] * 7
    assert vqa_accuracy("coca cola", humans, "vqa_eval") == 0.0
    assert vqa_accuracy("coca cola", humans, "m4c") == pytest.approx(0.9)  # 3 matches


def test_vqa_accuracy_rejects_unknown_protocol() -> None:
    with pytest.raises(ValueError, match="protocol must be one of"):
        vqa_accuracy("yes", ["yes"] * 10, "official")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- GQA


def test_gqa_exact_match() -> None:
    assert normalize_gqa_answer(" Red.\n") == "red"
    assert gqa_exact_match("Red.", "red") == 1.0
    assert gqa_exact_match("The left", "left") == 0.0  # no article removal in GQA
    assert gqa_exact_match("left side", "left") == 0.0


# --------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("There is no dog.", "no"),
        ("yes, there is not one", "no"),  # comma removed; "not" is a word
        ("Yes. But not sure", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # case matters: only "No", "not", "no"
        ("Not really", "yes"),  # "Not" is not in the list
        ("", "yes"),  # eval_pope.py: anything else is "yes"
    ],
)
def test_parse_pope_answer(text: str, expected: str) -> None:
    assert parse_pope_answer(text) == expected


def test_pope_metrics_on_eight_samples() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    answers = ["Yes", "Yes, there is.", "No", "yes", "No.", "Yes", "Yes", "no"]
    preds = [int(parse_pope_answer(a) == "yes") for a in answers]
    assert preds == [1, 1, 0, 1, 0, 1, 1, 0]
    m = pope_metrics(preds, labels)
    # TP = samples 0, 1, 3 -> 3; FN = sample 2 -> 1; FP = samples 5, 6 -> 2; TN = samples 4, 7 -> 2
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (3, 1, 2, 2, 8)
    assert m["accuracy"] == pytest.approx(5 / 8)  # (TP + TN) / 8
    assert m["precision"] == pytest.approx(3 / 5)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(3 / 4)  # TP / (TP + FN)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * 0.6 * 0.75 / (0.6 + 0.75) = 0.9 / 1.35
    assert m["yes_ratio"] == pytest.approx(5 / 8)


def test_pope_metrics_zero_division_is_zero() -> None:
    # All "no": TP + FP = 0; eval_pope.py would divide by zero, torchmetrics gives 0.
    m = pope_metrics([0, 0], [1, 0])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_pope_metrics_empty_is_nan() -> None:
    assert math.isnan(pope_metrics([], [])["f1"])


# --------------------------------------------------------------------------- option letters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is B.", "B"),  # "The answer is ([A-E])\." pattern
        ("The answer is B", "B"),
        ("B", "B"),  # whole text is a letter
        ("B. dog", "B"),  # starts with "<letter>. "
        ("A\nbecause", "A"),  # "\n" -> ". " makes it "A. because"
        ("(C)", None),  # none of the three rules
        ("b", None),  # lower-case is no option
        ("None", None),
        ("B.", None),  # too short for the "<letter>. " rule: an eval_science_qa.py quirk
        ("E", None),  # a letter past the 4 choices: get_pred_idx returns -1
    ],
)
def test_parse_sqa_letter_like_llava(text: str, expected: str | None) -> None:
    assert parse_sqa_letter(text, num_choices=4) == expected


CHOICES = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is B.", "B"),  # punctuation -> spaces, "B" is the only letter word
        ("(C)", "C"),
        ("B.", "B"),
        ("b", None),  # lower-case letter is no option, and no option text is inside "b"
        ("None", None),
        ("B or C", None),  # two letters
        ("It is a dog.", "B"),  # no letter; exactly one option text ("dog") is contained
        ("A dog", "A"),  # VLMEvalKit quirk: the article "A" reads as option A
        ("I'm sorry, but without the image provided I cannot say", None),  # refusal -> "Z"
        ("Z", None),
    ],
)
def test_parse_mmbench_letter_like_vlmevalkit(text: str, expected: str | None) -> None:
    assert parse_mmbench_letter(text, CHOICES) == expected


def test_parse_mmbench_letter_only_uses_the_question_letters() -> None:
    # Two options: "C" is not a letter of this question and "cat"/"dog" are not in the text.
    assert parse_mmbench_letter("C", ["cat", "dog"]) is None
    # Two option texts inside the answer: ambiguous.
    assert parse_mmbench_letter("a cat and a dog", ["cat", "dog"]) is None
