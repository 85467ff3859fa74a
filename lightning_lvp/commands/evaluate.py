"""``python -m lightning_lvp evaluate --benchmark B --questions Q --image_folder DIR ...``: answers + scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lightning_lvp.commands.experiment import Experiment, run

log = logging.getLogger(__name__)


def evaluate(
    benchmark: Literal["vqav2", "gqa", "vizwiz", "textvqa", "pope", "scienceqa", "mmbench"],
    questions: str,
    image_folder: str | list[str],
    answers: str,
    model_path: str | None = None,
    pruners: str | None = None,
    schedules: str | None = None,
    ground_truth: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    overwrite: bool = False,
    prompt_suffix: bool = True,
    structure: Literal["keep", "prune"] | None = None,
    experiment: Experiment | None = None,
) -> int:
    """Answers a benchmark in LLaVA's formats with the pruned model and scores it (docs/EVAL.md).

    Questions (LLaVA JSONL) are rendered with the vicuna_v1 template, images prepared as in training,
    batches left-padded and decoded greedily with the pruned KV cache.

    Args:
        benchmark: benchmark format and scorer.
        questions: question JSONL (question_id, image, text, [category]).
        image_folder: image folder, or a list [A,B] of folders, the questions' image paths are relative to.
        answers: answers JSONL to write (never overwritten without --overwrite).
        model_path: llava-hf model folder or hub id (default: the config's model.init_args.model_path).
        pruners: pruner folder or checkpoint (omit for the unpruned model).
        schedules: ONE inference schedule in the common syntax (lightning_lvp/schedules.py): 0.5,0.3,0.1
            or paper:0.5 or base; default: the pruners' keep_ratios.
        ground_truth: ground-truth JSONL (docs/EVAL.md); omit to only answer.
        batch_size: questions per generation batch.
        max_new_tokens: decoding budget per answer.
        overwrite: replace an existing answers file.
        prompt_suffix: append the benchmark's answer-format line to the question (false for models trained
            without it, e.g. the digits demo).
        structure: policy for image tokens that are not patches (LLaVA-NeXT's image_newline tokens, docs/FAMILIES.md):
            keep (structure, never pruned) or prune (like patches); default: the config's model.init_args.structure,
            else keep.
    """
    from lightning_lvp.data.processors import load_processor
    from lightning_lvp.eval.benchmarks import generate_answers, load_questions, write_answers_jsonl
    from lightning_lvp.eval.runner import PrunedGenerator
    from lightning_lvp.eval.scorers import score_benchmark
    from lightning_lvp.model import PrunedLlava
    from lightning_lvp.schedules import parse_schedule

    experiment = experiment or Experiment()
    path = experiment.model_path(model_path, "evaluate")
    model = PrunedLlava.from_pretrained(path, pruners, structure=experiment.structure(structure))
    processor = load_processor(path)  # the model family's processor (Qwen2.5-VL: QwenProcessor)
    stages = model.method.num_stages if model.method is not None else None
    try:
        ratios = parse_schedule(schedules, stages) if schedules else None
    except ValueError as err:
        raise ValueError(f"--schedules: {err}") from None
    folders = [image_folder] if isinstance(image_folder, str) else list(image_folder)
    gen = PrunedGenerator(model, processor, folders, ratios, max_new_tokens)
    items, issues = load_questions(questions)
    for issue in issues:
        log.warning("%s", issue)
    records = generate_answers(
        benchmark, items, gen, model_id=Path(path).name, batch_size=batch_size, prompt_suffix=prompt_suffix
    )
    write_answers_jsonl(answers, records, overwrite=overwrite)
    print(
        f"wrote {len(records)} answers to {answers}; malformed question lines: {len(issues)}; "
        f"missing/unreadable images: {dict(gen.missing)}"
    )
    if ground_truth:
        report = score_benchmark(benchmark, answers, ground_truth, missing_image_ids=gen.missing_ids)
        print(json.dumps({"metrics": report["metrics"], "counts": report["counts"]}, indent=2))
    return 0


RENAMED = {
    "--ratios": "--schedules (one schedule: 0.5,0.3,0.1 or paper:0.5)",
    "--no_prompt_suffix": "--prompt_suffix false",
}


def main(argv: Sequence[str]) -> int:
    return run(evaluate, argv, "python -m lightning_lvp evaluate", renamed=RENAMED, lists={"--image_folder": ","})
