"""LLaVA-1.5 benchmark formats: question and ground-truth files, prompts, answer files, generation loop.

Formats, prompts and scoring rules are documented in docs/EVAL.md. In short: questions are
LLaVA's ``{"question_id", "image", "text", "category"?}`` JSONL lines; answers are LLaVA's
``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`` lines; ground truth is
one JSON object per question, with the fields `load_ground_truth` lists for each benchmark.
Question ids are compared as strings, so ``7`` and ``"7"`` are the same question. Scoring is in
`scorers.py`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lightning_lvp.eval.normalize import OPTION_LETTERS, SQA_OPTIONS

logger = logging.getLogger(__name__)

QuestionId = int | str
BENCHMARKS: tuple[str, ...] = ("vqav2", "gqa", "vizwiz", "textvqa", "pope", "scienceqa", "mmbench")
VQA_BENCHMARKS: tuple[str, ...] = ("vqav2", "vizwiz", "textvqa")

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
UNANSWERABLE_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
# Lines LLaVA-1.5 puts after the question, each on its own line (its llava_*.jsonl question files
# already end with them; model_vqa_mmbench.py / model_vqa_science.py add them with --single-pred-prompt).
PROMPT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "vqav2": (SHORT_ANSWER_PROMPT,),
    "gqa": (SHORT_ANSWER_PROMPT,),
    "textvqa": (SHORT_ANSWER_PROMPT,),
    "pope": (SHORT_ANSWER_PROMPT,),
    "vizwiz": (UNANSWERABLE_PROMPT, SHORT_ANSWER_PROMPT),
    "scienceqa": (MULTIPLE_CHOICE_PROMPT,),
    "mmbench": (MULTIPLE_CHOICE_PROMPT,),
}
ANSWER_FIELDS: tuple[str, ...] = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")

T = TypeVar("T")


class EvalFormatError(ValueError):
    """A malformed line in a benchmark file; the message starts with ``path:line:``."""


@dataclass(frozen=True)
class GroundTruth:
    """One ground-truth question, whatever the benchmark.

    Attributes:
        question_id: id as a string.
        answers: VQAv2/VizWiz/TextVQA: the 10 human answers; GQA: (answer,); POPE: ("yes"|"no",);
            ScienceQA/MMBench: (letter,).
        category: POPE split; otherwise the optional category used for the per-category breakdown.
        choices: option texts (ScienceQA, MMBench).
        l2_category: MMBench's second-level category.
        circular_group: MMBench: id shared by the rotations of one question (CircularEval).
        has_image: ScienceQA: False for text-only questions (left out of ``img_accuracy``).
    """

    question_id: str
    answers: tuple[str, ...]
    category: str | None = None
    choices: tuple[str, ...] = ()
    l2_category: str | None = None
    circular_group: str | None = None
    has_image: bool = True


@dataclass(frozen=True)
class PromptItem:
    """What `generate_answers` hands to the model: the user text (no conversation template) and image."""

    question_id: QuestionId
    image: str | None
    prompt: str


GenerateFn = Callable[[list[PromptItem]], list[str]]


def check_benchmark(name: str) -> str:
    """Return ``name`` if it is a known benchmark, else raise ValueError listing the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {name!r}")
    return name


# --------------------------------------------------------------------------- JSONL reading


def _load_jsonl(
    path: str | Path, parse: Callable[[dict[str, Any]], T], *, strict: bool
) -> tuple[list[tuple[int, T]], list[str]]:
    """Parse every non-blank line of a JSONL file; a bad line becomes a ``"path:line: reason"`` issue.

    Args:
        path: the JSONL file.
        parse: turns one JSON object into an item; raises ValueError with a reason when it cannot.
        strict: raise on the first bad line instead of collecting it.

    Returns:
        ``([(line_number, item), ...], issues)``.

    Raises:
        EvalFormatError: on the first bad line when ``strict``.
        FileNotFoundError: when the file does not exist.
    """
    path = Path(path)
    items: list[tuple[int, T]] = []
    issues: list[str] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                items.append((lineno, parse(obj)))
            except ValueError as err:
                _report_issue(issues, f"{path}:{lineno}: {err}", strict)
    return items, issues


def _report_issue(issues: list[str], message: str, strict: bool) -> None:
    """Append ``message`` to ``issues``, or raise it as an `EvalFormatError` when ``strict``."""
    if strict:
        raise EvalFormatError(message)
    issues.append(message)


def _question_id(rec: Mapping[str, Any]) -> str:
    qid = rec.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int | str) or str(qid).strip() == "":
        raise ValueError(f"'question_id' must be a non-empty string or an integer, got {qid!r}")
    return str(qid)


def _opt_str(rec: Mapping[str, Any], key: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{key!r} must be a string, got {value!r}")
    return str(value)


def _req_str(rec: Mapping[str, Any], key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {value!r}")
    return value


def _str_list(rec: Mapping[str, Any], key: str, min_len: int, max_len: int) -> tuple[str, ...]:
    value = rec.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a list of strings, got {value!r}")
    if not min_len <= len(value) <= max_len:
        expected = str(min_len) if min_len == max_len else f"{min_len} to {max_len}"
        raise ValueError(f"{key!r} must hold {expected} items, got {len(value)}")
    return tuple(value)


def _answer_letter(rec: Mapping[str, Any], num_choices: int) -> str:
    """'answer' as a 0-based index or a letter, checked against the number of choices."""
    answer = rec.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < num_choices:
        return OPTION_LETTERS[answer]
    if isinstance(answer, str) and answer.strip().upper() in OPTION_LETTERS[:num_choices]:
        return answer.strip().upper()
    raise ValueError(
        f"'answer' must be an index in [0, {num_choices}) or a letter A-{OPTION_LETTERS[num_choices - 1]}, got {answer!r}"
    )


# --------------------------------------------------------------------------- ground truth


def _parse_vqa(rec: dict[str, Any]) -> GroundTruth:
    answers = _str_list(rec, "answers", 10, 10)
    return GroundTruth(_question_id(rec), answers, category=_opt_str(rec, "category"))


def _parse_gqa(rec: dict[str, Any]) -> GroundTruth:
    return GroundTruth(_question_id(rec), (_req_str(rec, "answer"),), category=_opt_str(rec, "category"))


def _parse_pope(rec: dict[str, Any]) -> GroundTruth:
    label = _req_str(rec, "label").strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"'label' must be 'yes' or 'no', got {rec['label']!r}")
    split = _req_str(rec, "category")
    return GroundTruth(_question_id(rec), (label,), category=split)


def _parse_scienceqa(rec: dict[str, Any]) -> GroundTruth:
    choices = _str_list(rec, "choices", 2, len(SQA_OPTIONS))
    has_image = rec.get("has_image", True)
    if not isinstance(has_image, bool):
        raise ValueError(f"'has_image' must be true or false, got {has_image!r}")
    letter = _answer_letter(rec, len(choices))
    return GroundTruth(_question_id(rec), (letter,), _opt_str(rec, "category"), choices, has_image=has_image)


def _parse_mmbench(rec: dict[str, Any]) -> GroundTruth:
    choices = _str_list(rec, "choices", 2, len(OPTION_LETTERS))
    letter = _answer_letter(rec, len(choices))
    return GroundTruth(
        _question_id(rec),
        (letter,),
        category=_opt_str(rec, "category"),
        choices=choices,
        l2_category=_opt_str(rec, "l2_category"),
        circular_group=_opt_str(rec, "circular_group"),
    )


_GT_PARSERS: dict[str, Callable[[dict[str, Any]], GroundTruth]] = {
    "vqav2": _parse_vqa,
    "vizwiz": _parse_vqa,
    "textvqa": _parse_vqa,
    "gqa": _parse_gqa,
    "pope": _parse_pope,
    "scienceqa": _parse_scienceqa,
    "mmbench": _parse_mmbench,
}


def load_ground_truth(
    benchmark: str, path: str | Path, *, strict: bool = False
) -> tuple[dict[str, GroundTruth], list[str]]:
    """Load a ground-truth JSONL file of ours (one object per question; extra fields are ignored).

    Fields per benchmark (``category`` is optional everywhere except POPE):

    - vqav2 / vizwiz / textvqa: ``question_id``, ``answers`` (the 10 human answers, strings).
    - gqa: ``question_id``, ``answer``.
    - pope: ``question_id``, ``label`` ("yes"/"no"), ``category`` (the split: adversarial/popular/random).
    - scienceqa: ``question_id``, ``choices`` (2-5 strings), ``answer`` (0-based index or letter),
      ``has_image`` (optional, default true).
    - mmbench: ``question_id``, ``choices`` (option texts, A first), ``answer`` (letter or index),
      ``l2_category`` and ``circular_group`` (optional).

    Args:
        benchmark: one of `BENCHMARKS`.
        path: the JSONL file.
        strict: raise `EvalFormatError` on the first bad line instead of reporting it.

    Returns:
        ``({question_id: GroundTruth}, issues)``; each issue reads ``"path:line: reason"``. A repeated
        question_id is an issue and its later lines are ignored.
    """
    records, issues = _load_jsonl(path, _GT_PARSERS[check_benchmark(benchmark)], strict=strict)
    truth: dict[str, GroundTruth] = {}
    first_line: dict[str, int] = {}
    for lineno, gt in records:
        if gt.question_id in truth:
            message = (
                f"duplicate question_id {gt.question_id!r} (first on line {first_line[gt.question_id]}); line ignored"
            )
            _report_issue(issues, f"{path}:{lineno}: {message}", strict)
            continue
        truth[gt.question_id] = gt
        first_line[gt.question_id] = lineno
    return truth, issues


def load_questions(path: str | Path, *, strict: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Load a LLaVA question JSONL file: ``question_id``, ``text`` and ``image`` (optional) per line.

    Args:
        path: the JSONL file.
        strict: raise `EvalFormatError` on the first bad line instead of reporting it.

    Returns:
        ``(records, issues)``: the line objects as read, and ``"path:line: reason"`` messages.
    """

    def parse(rec: dict[str, Any]) -> dict[str, Any]:
        _question_id(rec)
        _req_str(rec, "text")
        _opt_str(rec, "image")
        return rec

    records, issues = _load_jsonl(path, parse, strict=strict)
    return [rec for _, rec in records], issues


# --------------------------------------------------------------------------- prompts


def _is_none(value: Any) -> bool:
    """model_vqa_mmbench.py ``is_none``: None, NaN, or the strings 'nan' / 'none' (any case)."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def build_prompt(benchmark: str, question: Mapping[str, Any], suffix: bool = True) -> str:
    """The user text LLaVA-1.5 sends for one question (without the conversation template or image token).

    ``question["text"]`` is used as is, less any ``<image>`` token and any of the benchmark's
    suffix lines it already ends with (LLaVA's question files carry them), then the suffix lines of
    `PROMPT_SUFFIXES` are appended, one per line. ScienceQA's text must already hold the context,
    question and lettered options (as LLaVA's llava_test_CQM-A.json does). For MMBench, when the
    record has ``choices``, the text is built as model_vqa_mmbench.py does:
    ``hint\\nquestion\\nA. choice\\nB. choice...`` (the hint only when present and not NaN/None).

    Args:
        benchmark: one of `BENCHMARKS`.
        question: a question record with at least ``text``.
        suffix: append the benchmark's suffix lines (False: the bare question, for models trained
            without them, e.g. the digits demo).

    Returns:
        The prompt, e.g. ``"Is there a dog in the image?\\nAnswer the question using a single word or phrase."``.
    """
    lines = PROMPT_SUFFIXES[check_benchmark(benchmark)]
    text = question.get("text")
    if not isinstance(text, str):
        raise ValueError(f"question {question.get('question_id')!r}: 'text' must be a string, got {text!r}")
    body = text.replace("<image>", "").strip()
    for line in reversed(lines):
        if body.endswith(line):
            body = body[: -len(line)].rstrip()
    if benchmark == "mmbench" and question.get("choices") is not None:
        choices = _str_list(question, "choices", 1, len(OPTION_LETTERS))
        hint = question.get("hint")
        if not _is_none(hint):
            body = f"{hint}\n{body}"
        body += "".join(f"\n{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return "\n".join((body, *lines)) if suffix else body


# --------------------------------------------------------------------------- answers files


def make_answer_record(
    question_id: QuestionId, prompt: str, text: str, *, model_id: str, metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One line of a LLaVA answers file, fields in LLaVA's order (model_vqa_loader.py).

    LLaVA draws ``answer_id`` with shortuuid; we use ``uuid4().hex`` (no extra dependency).

    Args:
        question_id: id of the question, kept as given.
        prompt: the user text sent to the model (LLaVA's ``cur_prompt``).
        text: the model's answer.
        model_id: name of the model / checkpoint.
        metadata: free-form extra fields (e.g. ``{"keep_ratio": 0.25}``).

    Returns:
        ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``.
    """
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": dict(metadata or {}),
    }


def write_answers_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]], *, overwrite: bool = False) -> int:
    """Write answer records (see `make_answer_record`) as JSONL, atomically.

    Args:
        path: destination file; parent folders are created.
        records: records with every field of `ANSWER_FIELDS`.
        overwrite: replace an existing file (a warning is logged) instead of refusing.

    Returns:
        The number of lines written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a record lacks a field.
    """
    path = Path(path)
    existed = path.exists()
    if existed and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    lines = []
    for i, rec in enumerate(records):
        missing = [key for key in ANSWER_FIELDS if key not in rec]
        if missing:
            raise ValueError(f"answer record {i} lacks {missing}; build records with make_answer_record")
        lines.append(json.dumps({key: rec[key] for key in ANSWER_FIELDS}) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a temporary file next to the target, then rename: a crash never leaves half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if existed:
        logger.warning("Overwrote existing answers file %s with %d answers", path, len(lines))
    return len(lines)


def read_answers_jsonl(path: str | Path, *, strict: bool = False) -> tuple[dict[str, str], list[str]]:
    """Read a LLaVA answers file into ``{question_id (as str): text}``.

    A repeated question_id is reported and the later line wins, as in LLaVA's converters
    (``{x['question_id']: x['text'] for x in results}``).

    Args:
        path: the JSONL file.
        strict: raise `EvalFormatError` on the first bad line instead of reporting it.

    Returns:
        ``(predictions, issues)``; each issue reads ``"path:line: reason"``.
    """

    def parse(rec: dict[str, Any]) -> tuple[str, str]:
        return _question_id(rec), _req_str(rec, "text")

    records, issues = _load_jsonl(path, parse, strict=strict)
    predictions: dict[str, str] = {}
    seen: dict[str, int] = {}
    for lineno, (qid, text) in records:
        if qid in seen:
            message = f"duplicate question_id {qid!r} (also on line {seen[qid]}); this later line wins"
            _report_issue(issues, f"{path}:{lineno}: {message}", strict)
        predictions[qid] = text
        seen[qid] = lineno
    return predictions, issues


# --------------------------------------------------------------------------- generation


def generate_answers(
    benchmark: str,
    questions: Sequence[Mapping[str, Any]],
    generate_fn: GenerateFn,
    *,
    model_id: str,
    batch_size: int = 8,
    missing_image_ids: Iterable[QuestionId] = (),
    prompt_suffix: bool = True,
) -> list[dict[str, Any]]:
    """Build the prompts, call ``generate_fn`` batch by batch, and return answer records.

    Questions whose image is missing are not sent to the model (`score_benchmark` reports them).

    Args:
        benchmark: one of `BENCHMARKS`.
        questions: question records (see `load_questions`).
        generate_fn: ``list[PromptItem] -> list[str]``, one answer per item; it adds the
            conversation template and loads the image.
        model_id: written to every record.
        batch_size: items per ``generate_fn`` call.
        missing_image_ids: questions to leave out.
        prompt_suffix: append the benchmark's suffix lines (:func:`build_prompt`).

    Returns:
        Records as `make_answer_record` builds them, answers stripped (as LLaVA does).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    missing = {str(q) for q in missing_image_ids}
    items = [
        PromptItem(q["question_id"], q.get("image"), build_prompt(benchmark, q, prompt_suffix))
        for q in questions
        if str(q["question_id"]) not in missing
    ]
    if len(items) < len(questions):
        logger.warning("%s: %d questions left out for missing images", benchmark, len(questions) - len(items))
    records: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        outputs = generate_fn(batch)
        if len(outputs) != len(batch) or not all(isinstance(o, str) for o in outputs):
            raise ValueError(
                f"generate_fn must return {len(batch)} strings for a batch of {len(batch)}, got {outputs!r}"
            )
        records.extend(
            make_answer_record(item.question_id, item.prompt, out.strip(), model_id=model_id)
            for item, out in zip(batch, outputs, strict=True)
        )
    return records
