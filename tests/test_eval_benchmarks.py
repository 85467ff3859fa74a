"""Benchmark formats, prompts, answer files and `score_benchmark`, on small hand-made files."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from lightning_lvp.eval import (
    MULTIPLE_CHOICE_PROMPT,
    SHORT_ANSWER_PROMPT,
    UNANSWERABLE_PROMPT,
    EvalFormatError,
    PromptItem,
    build_prompt,
    generate_answers,
    load_ground_truth,
    load_questions,
    make_answer_record,
    read_answers_jsonl,
    score_benchmark,
    write_answers_jsonl,
)


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows that are strings are written verbatim (to make malformed lines), others as JSON."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- prompts


def test_build_prompt_short_answer_benchmarks() -> None:
    expected = f"What color is the bus?\n{SHORT_ANSWER_PROMPT}"
    for name in ("vqav2", "gqa", "textvqa", "pope"):
        assert build_prompt(name, {"question_id": 1, "text": "What color is the bus?"}) == expected
    # LLaVA's question files already carry the suffix, and an "<image>" token is dropped: same prompt.
    assert build_prompt("vqav2", {"text": f"<image>\nWhat color is the bus?\n{SHORT_ANSWER_PROMPT}"}) == expected


def test_build_prompt_vizwiz_adds_both_lines_once() -> None:
    expected = f"What is this?\n{UNANSWERABLE_PROMPT}\n{SHORT_ANSWER_PROMPT}"
    assert build_prompt("vizwiz", {"text": "What is this?"}) == expected
    assert build_prompt("vizwiz", {"text": expected}) == expected
    assert build_prompt("vizwiz", {"text": f"What is this?\n{SHORT_ANSWER_PROMPT}"}) == expected


def test_build_prompt_scienceqa_keeps_llava_text() -> None:
    text = "<image>\nContext: A fern.\nWhich is a plant?\nA. fern\nB. rock"
    assert build_prompt("scienceqa", {"text": text}) == (
        f"Context: A fern.\nWhich is a plant?\nA. fern\nB. rock\n{MULTIPLE_CHOICE_PROMPT}"
    )


def test_build_prompt_mmbench_like_model_vqa_mmbench() -> None:
    question = {"text": "What is shown?", "hint": "Look closely.", "choices": ["cat", "dog"]}
    assert (
        build_prompt("mmbench", question) == f"Look closely.\nWhat is shown?\nA. cat\nB. dog\n{MULTIPLE_CHOICE_PROMPT}"
    )
    # A NaN / "nan" hint (pandas reads empty TSV cells so) is no hint.
    for hint in (float("nan"), "nan", None):
        question["hint"] = hint
        assert build_prompt("mmbench", question) == f"What is shown?\nA. cat\nB. dog\n{MULTIPLE_CHOICE_PROMPT}"


def test_build_prompt_errors() -> None:
    with pytest.raises(ValueError, match="benchmark must be one of"):
        build_prompt("okvqa", {"text": "q"})
    with pytest.raises(ValueError, match="question 3: 'text' must be a string"):
        build_prompt("gqa", {"question_id": 3})


# --------------------------------------------------------------------------- loaders


def test_load_ground_truth_reports_bad_lines_with_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "gt.jsonl",
        [
            {"question_id": 1, "answers": ["yes"] * 10},
            '{"question_id": 2, "answers": ',  # line 2: broken JSON
            "",  # blank lines are skipped, not reported
            {"question_id": 3, "answers": ["yes"] * 3},  # line 4: 3 answers, not 10
            [1, 2],  # line 5: not an object
            {"question_id": 1, "answers": ["no"] * 10},  # line 6: duplicate id
            {"answers": ["no"] * 10},  # line 7: no id
        ],
    )
    truth, issues = load_ground_truth("vqav2", path)
    assert list(truth) == ["1"] and truth["1"].answers == ("yes",) * 10
    assert [issue.split(": ")[0] for issue in issues] == [f"{path}:{n}" for n in (2, 4, 5, 7, 6)]
    assert "'answers' must hold 10 items, got 3" in issues[1]
    assert "duplicate question_id '1' (first on line 1)" in issues[4]
    with pytest.raises(EvalFormatError, match=rf"{path}:2: "):
        load_ground_truth("vqav2", path, strict=True)


@pytest.mark.parametrize(
    ("bench", "row", "message"),
    [
        ("pope", {"question_id": 1, "label": "maybe", "category": "random"}, "'label' must be 'yes' or 'no'"),
        ("pope", {"question_id": 1, "label": "yes"}, "'category' must be a string"),
        ("gqa", {"question_id": 1, "answer": 3}, "'answer' must be a string"),
        ("scienceqa", {"question_id": 1, "choices": ["a", "b"], "answer": 2}, "'answer' must be an index in [0, 2)"),
        ("scienceqa", {"question_id": 1, "choices": list("abcdef"), "answer": 0}, "must hold 2 to 5 items"),
        ("mmbench", {"question_id": 1, "choices": ["a", "b"], "answer": "C"}, "or a letter A-B"),
        ("mmbench", {"question_id": True, "choices": ["a", "b"], "answer": "A"}, "'question_id' must be"),
    ],
)
def test_load_ground_truth_field_checks(tmp_path: Path, bench: str, row: dict, message: str) -> None:
    path = _write_jsonl(tmp_path / "gt.jsonl", [row])
    truth, issues = load_ground_truth(bench, path)
    assert truth == {} and len(issues) == 1 and message in issues[0] and issues[0].startswith(f"{path}:1: ")


def test_load_ground_truth_choice_answers(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "gt.jsonl",
        [
            {"question_id": "a", "choices": ["x", "y", "z"], "answer": 2},
            {"question_id": "b", "choices": ["x", "y"], "answer": "b"},
        ],
    )
    truth, issues = load_ground_truth("scienceqa", path)
    assert issues == [] and truth["a"].answers == ("C",) and truth["b"].answers == ("B",)  # index 2 -> C


def test_load_questions(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question_id": 7, "image": "a.jpg", "text": "Q?", "category": "random"},
            {"question_id": 8, "image": "b.jpg"},
        ],
    )
    questions, issues = load_questions(path)
    assert questions == [{"question_id": 7, "image": "a.jpg", "text": "Q?", "category": "random"}]
    assert issues == [f"{path}:2: 'text' must be a string, got None"]


# --------------------------------------------------------------------------- answers files


def test_write_answers_jsonl_refuses_then_overwrites(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "out" / "answers.jsonl"
    first = [make_answer_record(1, "Q?", "yes", model_id="m", metadata={"keep_ratio": 0.5})]
    assert write_answers_jsonl(path, first) == 1
    row = json.loads(path.read_text())
    assert list(row) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert (row["question_id"], row["text"], row["metadata"]) == (1, "yes", {"keep_ratio": 0.5})

    second = [make_answer_record(2, "Q?", "no", model_id="m")]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_answers_jsonl(path, second)
    assert json.loads(path.read_text())["question_id"] == 1  # untouched

    with caplog.at_level(logging.WARNING, logger="lightning_lvp.eval.benchmarks"):
        write_answers_jsonl(path, second, overwrite=True)
    assert "Overwrote existing answers file" in caplog.text
    assert json.loads(path.read_text())["question_id"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["answers.jsonl"]  # no temporary file left


def test_write_answers_jsonl_checks_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"answer record 0 lacks \['prompt', 'answer_id'"):
        write_answers_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "x"}])
    assert not (tmp_path / "a.jsonl").exists()


def test_read_answers_jsonl(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "a.jsonl",
        [{"question_id": 1, "text": "yes"}, "not json", {"question_id": 1, "text": "no"}, {"question_id": 2}],
    )
    preds, issues = read_answers_jsonl(path)
    assert preds == {"1": "no"}  # the later line wins, as in LLaVA's converters
    assert [i.split(": ")[0] for i in issues] == [f"{path}:2", f"{path}:4", f"{path}:3"]


def test_generate_answers_batches_and_skips_missing_images() -> None:
    questions = [{"question_id": i, "image": f"{i}.jpg", "text": f"Q{i}?"} for i in range(5)]
    seen: list[list[PromptItem]] = []

    def generate_fn(batch: list[PromptItem]) -> list[str]:
        seen.append(batch)
        return [f" answer {item.question_id} " for item in batch]

    records = generate_answers("gqa", questions, generate_fn, model_id="m", batch_size=2, missing_image_ids=["3"])
    assert [len(b) for b in seen] == [2, 2]  # questions 0, 1, 2, 4 in batches of 2
    assert seen[0][0] == PromptItem(0, "0.jpg", f"Q0?\n{SHORT_ANSWER_PROMPT}")
    assert [(r["question_id"], r["text"]) for r in records] == [(i, f"answer {i}") for i in (0, 1, 2, 4)]
    with pytest.raises(ValueError, match="must return 2 strings"):
        generate_answers("gqa", questions, lambda batch: ["x"], model_id="m", batch_size=2)


# --------------------------------------------------------------------------- score_benchmark


def test_score_vqav2_with_bad_input(tmp_path: Path) -> None:
    gt = _write_jsonl(
        tmp_path / "gt.jsonl",
        [
            {"question_id": 1, "answers": ["2"] * 3 + ["two"] + ["3"] * 6, "category": "number"},
            {"question_id": 2, "answers": ["yes"] * 10, "category": "yes/no"},
            {"question_id": 3, "answers": ["red"] * 10, "category": "other"},
            {"question_id": 4, "answers": ["red"] * 10, "category": "other"},
            {"question_id": 5, "answers": ["red"] * 9},  # line 5: malformed
        ],
    )
    preds = {1: "Two", "2": "Yes.", 4: "red", 999: "stray"}
    result = score_benchmark("vqav2", preds, gt, missing_image_ids=[4])
    # q1: "Two" -> "2", the human "two" is not digit-mapped by vqaEval.py -> 3 matches -> 0.9
    # q2: "Yes." -> "yes", 10 matches -> 1.0; q3: no prediction -> 0; q4: image missing -> skipped
    assert result["per_question"] == pytest.approx({"1": 0.9, "2": 1.0, "3": 0.0})
    assert result["metrics"]["accuracy"] == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    assert result["per_category"] == {
        "number": {"accuracy": pytest.approx(0.9), "n": 1},
        "other": {"accuracy": 0.0, "n": 1},
        "yes/no": {"accuracy": 1.0, "n": 1},
    }
    assert result["counts"] == {"total": 4, "scored": 3, "skipped": 1, "failed": 1, "ignored": 2}
    assert result["skipped"] == {"missing_image": ["4"]}
    assert result["failed"] == {"missing_prediction": ["3"]}
    assert result["ignored"]["unknown_question_id"] == ["999"]
    assert result["ignored"]["malformed_ground_truth_line"][0].startswith(f"{gt}:5: ")
    assert result["settings"] == {"missing_image_policy": "skip", "vqa_protocol": "vqa_eval"}


def test_score_missing_image_policy_wrong_and_empty_answer(tmp_path: Path) -> None:
    gt = _write_jsonl(tmp_path / "gt.jsonl", [{"question_id": i, "answer": "red"} for i in (1, 2, 3)])
    result = score_benchmark(
        "gqa", {1: "Red.", 2: "   ", 3: "red"}, gt, missing_image_ids=[3], missing_image_policy="wrong"
    )
    # q1 correct; q2 empty -> 0; q3 image missing, counted wrong -> 0
    assert result["metrics"]["accuracy"] == pytest.approx(1 / 3)
    assert result["failed"] == {"empty_prediction": ["2"], "missing_image": ["3"]}
    assert result["skipped"] == {}


def test_score_textvqa_protocols(tmp_path: Path) -> None:
    gt = _write_jsonl(tmp_path / "gt.jsonl", [{"question_id": 1, "answers": ["Coca Cola"] * 3 + ["pepsi"] * 7}])
    # m4c lower-cases the human answers: 3 matches -> 0.9; vqaEval.py does not -> 0.0.
    assert score_benchmark("textvqa", {1: "coca-cola"}, gt)["metrics"]["accuracy"] == pytest.approx(0.9)
    result = score_benchmark("textvqa", {1: "coca-cola"}, gt, vqa_protocol="vqa_eval")
    assert result["metrics"]["accuracy"] == 0.0 and result["settings"]["vqa_protocol"] == "vqa_eval"
    with pytest.raises(ValueError, match="vqa_protocol applies to"):
        score_benchmark("gqa", {}, gt, vqa_protocol="m4c")


def test_score_vizwiz_unanswerable(tmp_path: Path) -> None:
    gt = _write_jsonl(tmp_path / "gt.jsonl", [{"question_id": "VizWiz_val_1.jpg", "answers": ["unanswerable"] * 10}])
    assert score_benchmark("vizwiz", {"VizWiz_val_1.jpg": "Unanswerable."}, gt)["metrics"]["accuracy"] == 1.0


def test_score_pope_per_split(tmp_path: Path) -> None:
    labels = ["yes"] * 4 + ["no"] * 4
    answers = [
        "Yes",
        "Yes, there is.",
        "No",
        "yes",
        "No.",
        "Yes",
        "Yes",
        "no",
    ]  # see test_pope_metrics_on_eight_samples
    rows = [{"question_id": i, "label": lab, "category": "adversarial"} for i, lab in enumerate(labels)]
    rows += [
        {"question_id": 100 + i, "label": lab, "category": "random"} for i, lab in enumerate(["yes", "yes", "no", "no"])
    ]
    gt = _write_jsonl(tmp_path / "gt.jsonl", rows)
    preds = {i: a for i, a in enumerate(answers)} | {100: "Yes", 101: "Yes", 102: "No", 103: None}
    result = score_benchmark("pope", preds, gt)
    adv, rnd = result["per_category"]["adversarial"], result["per_category"]["random"]
    assert (adv["precision"], adv["recall"], adv["f1"]) == pytest.approx((3 / 5, 3 / 4, 2 / 3))
    # random: question 103 (label "no") has no answer -> counted as the wrong answer "yes":
    # TP 2, FP 1, TN 1 -> precision 2/3, recall 1, F1 0.8, accuracy 3/4, yes ratio 3/4
    assert (rnd["precision"], rnd["recall"], rnd["f1"], rnd["accuracy"], rnd["yes_ratio"]) == pytest.approx(
        (2 / 3, 1.0, 0.8, 0.75, 0.75)
    )
    assert result["metrics"]["f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # mean over the two splits
    assert result["failed"] == {"missing_prediction": ["103"]}


def test_score_scienceqa(tmp_path: Path) -> None:
    choices = ["w", "x", "y", "z"]
    gt = _write_jsonl(
        tmp_path / "gt.jsonl",
        [
            {"question_id": "1", "choices": choices, "answer": 1, "category": "natural science"},
            {"question_id": "2", "choices": choices, "answer": "C", "category": "social science"},
            {"question_id": "3", "choices": choices, "answer": 0, "has_image": False},
        ],
    )
    result = score_benchmark("scienceqa", {"1": "The answer is B.", "2": "(C)", "3": "A"}, gt)
    # q1 correct; q2 "(C)" does not parse the LLaVA way -> 0, failed; q3 correct (text-only)
    assert result["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert result["metrics"]["img_accuracy"] == pytest.approx(1 / 2)  # q1 and q2 have images
    assert result["failed"] == {"unparsable_answer": ["2"]}
    assert result["per_category"]["social science"] == {"accuracy": 0.0, "n": 1}


def test_score_mmbench_circular(tmp_path: Path) -> None:
    rows = [
        {"question_id": "1-0", "choices": ["cat", "dog", "bird", "fish"], "answer": "A", "circular_group": 1},
        {"question_id": "1-1", "choices": ["dog", "bird", "fish", "cat"], "answer": "D", "circular_group": 1},
        {"question_id": "2-0", "choices": ["red", "blue"], "answer": "B", "circular_group": 2},
        {"question_id": "2-1", "choices": ["blue", "red"], "answer": "A", "circular_group": 2},
    ]
    for row in rows:
        row |= {"category": "attribute" if row["circular_group"] == 1 else "logic", "l2_category": "perception"}
    gt = _write_jsonl(tmp_path / "gt.jsonl", rows)
    result = score_benchmark("mmbench", {"1-0": "A", "1-1": "D.", "2-0": "B", "2-1": "b"}, gt)
    # "b" parses to nothing -> 3 of 4 correct; group 1 all correct, group 2 not -> circular 1/2
    assert result["metrics"]["accuracy"] == pytest.approx(3 / 4)
    assert result["metrics"]["circular_accuracy"] == pytest.approx(1 / 2)
    assert result["per_category"]["logic"] == {"accuracy": 0.5, "n": 2}
    assert result["per_l2_category"] == {"perception": {"accuracy": 0.75, "n": 4}}


def test_score_from_answers_file_and_empty_ground_truth(tmp_path: Path) -> None:
    gt = _write_jsonl(tmp_path / "gt.jsonl", [{"question_id": 1, "answer": "red"}])
    answers = tmp_path / "answers.jsonl"
    write_answers_jsonl(answers, [make_answer_record(1, "Q?", "red", model_id="m")])
    with answers.open("a") as f:
        f.write("{broken\n")
    result = score_benchmark("gqa", answers, gt)
    assert result["metrics"]["accuracy"] == 1.0
    assert result["ignored"]["malformed_answer_line"][0].startswith(f"{answers}:2: ")

    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    result = score_benchmark("gqa", {1: "red"}, empty)
    assert math.isnan(result["metrics"]["accuracy"]) and result["ignored"] == {"unknown_question_id": ["1"]}
