"""Evaluation of LLaVA-1.5 benchmarks: formats, prompts, answer normalisation and scoring.

See docs/EVAL.md. Typical use::

    questions, issues = load_questions("pope/llava_pope_test.jsonl")
    records = generate_answers("pope", questions, generate_fn, model_id="llava-v1.5-7b-lvp")
    write_answers_jsonl("answers/pope.jsonl", records)
    result = score_benchmark("pope", "answers/pope.jsonl", "pope/ground_truth.jsonl")
"""

from lightning_lvp.eval.benchmarks import (
    BENCHMARKS,
    MULTIPLE_CHOICE_PROMPT,
    PROMPT_SUFFIXES,
    SHORT_ANSWER_PROMPT,
    UNANSWERABLE_PROMPT,
    EvalFormatError,
    GenerateFn,
    GroundTruth,
    PromptItem,
    build_prompt,
    generate_answers,
    load_ground_truth,
    load_questions,
    make_answer_record,
    read_answers_jsonl,
    write_answers_jsonl,
)
from lightning_lvp.eval.normalize import (
    normalize_evalai_answer,
    normalize_gqa_answer,
    normalize_vqa_answer,
    parse_mmbench_letter,
    parse_pope_answer,
    parse_sqa_letter,
)
from lightning_lvp.eval.scorers import (
    DEFAULT_VQA_PROTOCOL,
    VQA_PROTOCOLS,
    gqa_exact_match,
    pope_metrics,
    score_answer,
    score_benchmark,
    vqa_accuracy,
    vqa_soft_score,
)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_VQA_PROTOCOL",
    "MULTIPLE_CHOICE_PROMPT",
    "PROMPT_SUFFIXES",
    "SHORT_ANSWER_PROMPT",
    "UNANSWERABLE_PROMPT",
    "VQA_PROTOCOLS",
    "EvalFormatError",
    "GenerateFn",
    "GroundTruth",
    "PromptItem",
    "build_prompt",
    "generate_answers",
    "gqa_exact_match",
    "load_ground_truth",
    "load_questions",
    "make_answer_record",
    "normalize_evalai_answer",
    "normalize_gqa_answer",
    "normalize_vqa_answer",
    "parse_mmbench_letter",
    "parse_pope_answer",
    "parse_sqa_letter",
    "pope_metrics",
    "read_answers_jsonl",
    "score_answer",
    "score_benchmark",
    "vqa_accuracy",
    "vqa_soft_score",
    "write_answers_jsonl",
]
