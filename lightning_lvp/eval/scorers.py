"""Per-question scores, aggregate metrics and `score_benchmark`.

VQA-style soft accuracy follows the official tools named in `VqaProtocol`; POPE uses torchmetrics'
binary classification metrics; the rest are plain means. File formats live in `benchmarks.py`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_lvp.eval.benchmarks import (
    VQA_BENCHMARKS,
    GroundTruth,
    QuestionId,
    check_benchmark,
    load_ground_truth,
    read_answers_jsonl,
)
from lightning_lvp.eval.normalize import (
    normalize_evalai_answer,
    normalize_gqa_answer,
    normalize_vqa_answer,
    parse_mmbench_letter,
    parse_pope_answer,
    parse_sqa_letter,
    process_punctuation,
)

logger = logging.getLogger(__name__)

VqaProtocol = Literal["vqa_eval", "vizwiz_eval", "m4c"]
VQA_PROTOCOLS: tuple[str, ...] = ("vqa_eval", "vizwiz_eval", "m4c")
# The official tool behind each VQA-style benchmark (`vqa_accuracy` explains each).
DEFAULT_VQA_PROTOCOL: dict[str, VqaProtocol] = {"vqav2": "vqa_eval", "vizwiz": "vizwiz_eval", "textvqa": "m4c"}
MissingImagePolicy = Literal["skip", "wrong"]
# Reasons used in the report of `score_benchmark`.
MISSING_IMAGE = "missing_image"
MISSING_PREDICTION = "missing_prediction"
EMPTY_PREDICTION = "empty_prediction"
UNPARSABLE_ANSWER = "unparsable_answer"
UNKNOWN_QUESTION_ID = "unknown_question_id"
MALFORMED_GROUND_TRUTH = "malformed_ground_truth_line"
MALFORMED_ANSWER = "malformed_answer_line"
POPE_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def vqa_soft_score(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA soft accuracy of an already-normalised prediction.

    For each of the n human answers i, the n-1 others are kept (the "10 choose 9" subsets of
    vqaEval.py's ``otherGTAns``) and ``min(1, #matches / 3)`` is taken; the n values are averaged.
    With k of the n answers equal to the prediction this is
    ``(k * min(1, (k-1)/3) + (n-k) * min(1, k/3)) / n``: for n=10, k=1 -> 0.3, k=2 -> 0.6,
    k=3 -> 0.9, k>=4 -> 1.0.

    Args:
        prediction: normalised prediction.
        human_answers: the n normalised human answers (n=10 in VQAv2, VizWiz, TextVQA).

    Returns:
        Score in [0, 1].
    """
    if not human_answers:
        raise ValueError("vqa_soft_score needs at least one human answer")
    matches = [answer == prediction for answer in human_answers]
    k = sum(matches)
    return sum(min(1.0, (k - int(m)) / 3) for m in matches) / len(matches)


def vqa_accuracy(prediction: str, human_answers: Sequence[str], protocol: VqaProtocol = "vqa_eval") -> float:
    """Soft VQA accuracy of one raw prediction, normalised the way ``protocol``'s tool does it.

    - ``"vqa_eval"`` (VQAv2): LLaVA's ``convert_vqav2_for_submission.py`` runs the EvalAI processor on
      the prediction, then the official vqaEval.py normalises it again (punctuation, digits,
      articles, contractions). The human answers only get ``processPunctuation``, and only when
      they are not all identical. Comparison is exact (case-sensitive).
    - ``"vizwiz_eval"`` (VizWiz): the same on the prediction (LLaVA's ``convert_vizwiz_for_submission.py``
      then the VizWiz API's VQAEval); the VizWiz API leaves human answers untouched.
    - ``"m4c"`` (TextVQA): LLaVA's ``eval_textvqa.py`` / ``TextVQAAccuracyEvaluator``: the EvalAI
      processor on the prediction and on every human answer.

    Args:
        prediction: raw model output.
        human_answers: raw human answers.
        protocol: one of `VQA_PROTOCOLS`.

    Returns:
        Score in [0, 1].
    """
    if protocol == "m4c":
        return vqa_soft_score(normalize_evalai_answer(prediction), [normalize_evalai_answer(a) for a in human_answers])
    if protocol not in VQA_PROTOCOLS:
        raise ValueError(f"protocol must be one of {VQA_PROTOCOLS}, got {protocol!r}")
    pred = normalize_vqa_answer(normalize_evalai_answer(prediction))
    answers = list(human_answers)
    if protocol == "vqa_eval" and len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    return vqa_soft_score(pred, answers)


def gqa_exact_match(prediction: str, answer: str) -> float:
    """GQA accuracy of one prediction: ``normalize_gqa_answer(prediction) == answer`` (GQA eval.py).

    Args:
        prediction: raw model output.
        answer: gold answer, compared as is (GQA's gold answers are lower-case single phrases).

    Returns:
        1.0 or 0.0.
    """
    return float(normalize_gqa_answer(prediction) == answer)


def pope_metrics(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """POPE metrics of one split, as LLaVA's ``eval_pope.py`` prints them (1 = "yes" = positive).

    Accuracy, precision, recall and F1 come from torchmetrics; a 0/0 precision or recall is 0
    (torchmetrics' ``zero_division=0``; eval_pope.py would raise ZeroDivisionError).

    Args:
        preds: predicted labels, 0 ("no") or 1 ("yes").
        labels: gold labels, same length.

    Returns:
        ``accuracy, precision, recall, f1, yes_ratio`` (fractions) and ``tp, fp, tn, fn, n``.
    """
    if len(preds) != len(labels):
        raise ValueError(f"pope_metrics got {len(preds)} predictions for {len(labels)} labels")
    if not preds:
        nan = math.nan
        return dict(accuracy=nan, precision=nan, recall=nan, f1=nan, yes_ratio=nan, tp=0, fp=0, tn=0, fn=0, n=0)
    # imported here: torchmetrics imports matplotlib.pyplot at import, which importing eval must not do
    from torchmetrics.functional.classification import (
        binary_accuracy,
        binary_f1_score,
        binary_precision,
        binary_recall,
        binary_stat_scores,
    )

    p = torch.tensor(list(preds), dtype=torch.long)
    t = torch.tensor(list(labels), dtype=torch.long)
    tp, fp, tn, fn, _ = binary_stat_scores(p, t).tolist()
    return {
        "accuracy": binary_accuracy(p, t).item(),
        "precision": binary_precision(p, t).item(),
        "recall": binary_recall(p, t).item(),
        "f1": binary_f1_score(p, t).item(),
        "yes_ratio": p.float().mean().item(),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": len(preds),
    }


def mean_score(scores: Sequence[float]) -> float:
    """Mean of per-question scores; NaN when there are none."""
    return sum(scores) / len(scores) if scores else math.nan


def accuracy_by_group(scores: Mapping[str, float], groups: Mapping[str, str | None]) -> dict[str, dict[str, float]]:
    """Mean score per group (category, answer type, ...); questions without a group are left out.

    Args:
        scores: question_id -> score.
        groups: question_id -> group name or None.

    Returns:
        ``{group: {"accuracy": mean, "n": count}}`` sorted by group name.
    """
    by_group: dict[str, list[float]] = defaultdict(list)
    for qid, score in scores.items():
        group = groups.get(qid)
        if group is not None:
            by_group[group].append(score)
    return {g: {"accuracy": mean_score(v), "n": len(v)} for g, v in sorted(by_group.items())}


def circular_accuracy(scores: Mapping[str, float], groups: Mapping[str, str], excluded: set[str]) -> float:
    """MMBench CircularEval accuracy: a group is correct only if all its rotations are.

    A group is one question asked once per rotation of its options. Groups with an excluded
    (skipped) member are left out.

    Args:
        scores: question_id -> 0/1 score of the scored questions.
        groups: question_id -> group id, for every question of the ground truth.
        excluded: question_ids that were skipped.

    Returns:
        Fraction of correct groups; NaN when no group is complete.
    """
    members: dict[str, list[str]] = defaultdict(list)
    for qid, group in groups.items():
        members[group].append(qid)
    complete = [qids for qids in members.values() if not excluded.intersection(qids)]
    return mean_score([float(all(scores.get(q, 0.0) == 1.0 for q in qids)) for qids in complete])


# --------------------------------------------------------------------------- score_benchmark


@dataclass
class _Report:
    """Question ids (or file locations) per reason, for each kind of trouble."""

    skipped: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, list[str]] = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: Literal["skipped", "failed", "ignored"], reason: str, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            getattr(self, kind).setdefault(reason, []).extend(items)

    def count(self, kind: Literal["skipped", "failed", "ignored"]) -> int:
        return sum(len(v) for v in getattr(self, kind).values())


def score_answer(benchmark: str, gt: GroundTruth, text: str, vqa_protocol: VqaProtocol | None = None) -> float | None:
    """Score one non-empty answer against its ground truth.

    Args:
        benchmark: one of `benchmarks.BENCHMARKS`.
        gt: the question's ground truth.
        text: raw model output.
        vqa_protocol: VQA-style benchmarks only; default `DEFAULT_VQA_PROTOCOL[benchmark]`.

    Returns:
        Score in [0, 1] (POPE: 1.0 when the parsed yes/no equals the label), or None when no
        option letter can be parsed (ScienceQA, MMBench).
    """
    if check_benchmark(benchmark) in VQA_BENCHMARKS:
        return vqa_accuracy(text, gt.answers, vqa_protocol or DEFAULT_VQA_PROTOCOL[benchmark])
    if benchmark == "gqa":
        return gqa_exact_match(text, gt.answers[0])
    if benchmark == "pope":
        return float(parse_pope_answer(text) == gt.answers[0])
    if benchmark == "scienceqa":
        letter = parse_sqa_letter(text, len(gt.choices))
    else:  # mmbench
        letter = parse_mmbench_letter(text, gt.choices)
    return None if letter is None else float(letter == gt.answers[0])


def _score_questions(
    benchmark: str,
    truth: Mapping[str, GroundTruth],
    predictions: Mapping[str, str],
    missing_images: set[str],
    policy: MissingImagePolicy,
    vqa_protocol: VqaProtocol | None,
    report: _Report,
) -> dict[str, float]:
    """Score every ground-truth question; each failure scores 0 and is reported with its reason."""
    scores: dict[str, float] = {}
    for qid, gt in truth.items():
        text = predictions.get(qid)
        if qid in missing_images:
            if policy == "skip":
                report.add("skipped", MISSING_IMAGE, [qid])
                continue
            reason = MISSING_IMAGE
        elif text is None:
            reason = MISSING_PREDICTION
        elif not text.strip():
            reason = EMPTY_PREDICTION
        else:
            score = score_answer(benchmark, gt, text, vqa_protocol)
            if score is not None:
                scores[qid] = score
                continue
            reason = UNPARSABLE_ANSWER
        report.add("failed", reason, [qid])
        scores[qid] = 0.0
    return scores


def _pope_summary(truth: Mapping[str, GroundTruth], scores: Mapping[str, float]) -> tuple[dict, dict]:
    """Per-split POPE metrics and their mean over splits.

    POPE answers are binary, so a question's predicted label follows from its score: the label
    itself when correct, the other one when wrong. A failed question (missing / empty answer)
    therefore counts as the wrong answer in every metric.
    """
    by_split: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for qid, score in scores.items():
        label = int(truth[qid].answers[0] == "yes")
        preds, labels = by_split[truth[qid].category or ""]
        preds.append(label if score == 1.0 else 1 - label)
        labels.append(label)
    per_split = {split: pope_metrics(p, t) for split, (p, t) in sorted(by_split.items())}
    metrics = {name: mean_score([m[name] for m in per_split.values()]) for name in POPE_METRICS}
    return metrics, per_split


def _summary(
    benchmark: str, truth: Mapping[str, GroundTruth], scores: Mapping[str, float], skipped: set[str]
) -> dict[str, Any]:
    """``metrics`` and the per-category breakdowns of one benchmark."""
    if benchmark == "pope":
        metrics, per_split = _pope_summary(truth, scores)
        return {"metrics": metrics, "per_category": per_split}
    out: dict[str, Any] = {
        "metrics": {"accuracy": mean_score(list(scores.values()))},
        "per_category": accuracy_by_group(scores, {q: gt.category for q, gt in truth.items()}),
    }
    if benchmark == "scienceqa":
        # eval_science_qa.py's "IMG-Accuracy": the questions that come with an image.
        out["metrics"]["img_accuracy"] = mean_score([s for q, s in scores.items() if truth[q].has_image])
    if benchmark == "mmbench":
        out["per_l2_category"] = accuracy_by_group(scores, {q: gt.l2_category for q, gt in truth.items()})
        groups = {q: gt.circular_group for q, gt in truth.items() if gt.circular_group is not None}
        if groups:
            out["metrics"]["circular_accuracy"] = circular_accuracy(scores, groups, skipped)
    return out


def _prediction_map(
    predictions: Mapping[QuestionId, str | None] | str | Path, strict: bool, report: _Report
) -> dict[str, str]:
    """Predictions keyed by string id; a path is read with `read_answers_jsonl`. None values count as missing."""
    if isinstance(predictions, str | Path):
        preds, issues = read_answers_jsonl(predictions, strict=strict)
        report.add("ignored", MALFORMED_ANSWER, issues)
        return preds
    return {
        str(qid): text if isinstance(text, str) else str(text) for qid, text in predictions.items() if text is not None
    }


def score_benchmark(
    name: str,
    predictions: Mapping[QuestionId, str | None] | str | Path,
    ground_truth_path: str | Path,
    *,
    missing_image_ids: Iterable[QuestionId] = (),
    missing_image_policy: MissingImagePolicy = "skip",
    vqa_protocol: VqaProtocol | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Score a benchmark's predictions against our ground-truth file.

    Every ground-truth question is accounted for: scored, skipped (missing image, with the
    default policy) or failed (missing / empty / unparsable answer, or a missing image with
    ``missing_image_policy="wrong"``). Failed questions score 0 and stay in the denominators.
    Malformed lines and predictions for unknown ids are listed under ``ignored``.

    Args:
        name: one of `benchmarks.BENCHMARKS`.
        predictions: ``{question_id: raw answer}``, or the path of a LLaVA answers JSONL file.
        ground_truth_path: our ground-truth JSONL (`benchmarks.load_ground_truth`).
        missing_image_ids: questions whose image could not be loaded.
        missing_image_policy: ``"skip"`` leaves them out of the metrics, ``"wrong"`` scores them 0.
        vqa_protocol: override the official tool emulated for VQAv2 / VizWiz / TextVQA.
        strict: raise on the first malformed line instead of reporting it.

    Returns:
        ``{"benchmark", "settings", "metrics", "per_category", "per_question", "counts",
        "skipped", "failed", "ignored"}`` (plus ``"per_l2_category"`` for MMBench). Metrics are
        fractions in [0, 1], NaN when nothing was scored; ``per_category`` holds POPE's per-split
        metrics. ``counts`` = ``{"total", "scored", "skipped", "failed", "ignored"}``; the other
        three map a reason to its question ids (or ``"path:line: reason"`` for malformed lines).
    """
    check_benchmark(name)
    if missing_image_policy not in ("skip", "wrong"):
        raise ValueError(f"missing_image_policy must be 'skip' or 'wrong', got {missing_image_policy!r}")
    if vqa_protocol is not None and (name not in VQA_BENCHMARKS or vqa_protocol not in VQA_PROTOCOLS):
        raise ValueError(f"vqa_protocol applies to {VQA_BENCHMARKS} only and must be one of {VQA_PROTOCOLS}")
    report = _Report()
    truth, gt_issues = load_ground_truth(name, ground_truth_path, strict=strict)
    report.add("ignored", MALFORMED_GROUND_TRUTH, gt_issues)
    preds = _prediction_map(predictions, strict, report)
    report.add("ignored", UNKNOWN_QUESTION_ID, sorted(set(preds) - set(truth)))
    missing = {str(q) for q in missing_image_ids}
    report.add("ignored", "missing_image_unknown_id", sorted(missing - set(truth)))
    scores = _score_questions(name, truth, preds, missing, missing_image_policy, vqa_protocol, report)
    summary = _summary(name, truth, scores, set(report.skipped.get(MISSING_IMAGE, [])))
    counts = {"total": len(truth), "scored": len(scores)}
    counts.update({kind: report.count(kind) for kind in ("skipped", "failed", "ignored")})
    if counts["skipped"] or counts["failed"] or counts["ignored"]:
        logger.warning("%s: %s", name, counts)
    settings = {"missing_image_policy": missing_image_policy}
    if name in VQA_BENCHMARKS:
        settings["vqa_protocol"] = vqa_protocol or DEFAULT_VQA_PROTOCOL[name]
    return {
        "benchmark": name,
        "settings": settings,
        **summary,
        "per_question": scores,
        "counts": counts,
        "skipped": report.skipped,
        "failed": report.failed,
        "ignored": report.ignored,
    }
