"""Benchmark evaluation with the pruned model: ``python -m lightning_lvp evaluate ...``.

Questions in LLaVA's JSONL format are rendered with the vicuna_v1 template ("USER: <image>\\n{prompt}
ASSISTANT:"), images are prepared exactly as in training (pad to square with the mean colour, the
model's CLIP processor), batches are LEFT-padded and decoded greedily with the pruned KV cache.
Batched answers equal batch-size-1 answers (``tests/test_eval_runner.py``), so unlike LLaVA's
reference scripts we evaluate in batches.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_lvp.data.collate import LlavaCollator
from lightning_lvp.data.llava_dataset import LlavaDataset, Skipped
from lightning_lvp.eval.benchmarks import PromptItem, generate_answers, load_questions, write_answers_jsonl
from lightning_lvp.eval.scorers import score_benchmark
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.model import PrunedLlava

log = logging.getLogger(__name__)


class PrunedGenerator:
    """A ``GenerateFn`` (list[PromptItem] -> list[str]) over a :class:`PrunedLlava`.

    Args:
        model: the pruned model.
        processor: the model's ``LlavaProcessor``.
        image_folders: folders the questions' image paths are relative to.
        ratios: inference schedule (None = the method's keep_ratios).
        max_new_tokens: decoding budget per answer.
    """

    def __init__(
        self,
        model: PrunedLlava,
        processor,
        image_folders: Sequence[str],
        ratios: Sequence[float] | None = None,
        max_new_tokens: int = 16,
    ):
        self.model, self.processor, self.ratios, self.max_new_tokens = model, processor, ratios, max_new_tokens
        self.image_folders = list(image_folders)
        self.collate = LlavaCollator(processor.tokenizer.pad_token_id, padding_side="left")
        self.missing: Counter = Counter()
        self.missing_ids: list[str] = []

    def _dataset(self, items: list[PromptItem]) -> LlavaDataset:
        entries = [
            {
                "id": str(it.question_id),
                "image": it.image,
                "conversations": [{"from": "human", "value": "<image>\n" + it.prompt}, {"from": "gpt", "value": ""}],
            }
            for it in items
        ]
        return LlavaDataset(entries, self.image_folders, self.processor, policy="skip", prompt_only=True)

    @torch.no_grad()
    def __call__(self, items: list[PromptItem]) -> list[str]:
        ds = self._dataset(items)
        samples = [ds[i] for i in range(len(ds))]
        answers = [""] * len(items)
        for it, s in zip(items, samples):
            if isinstance(s, Skipped):  # unreadable / missing image: counted, answered with ""
                self.missing[s.reason] += 1
                self.missing_ids.append(str(it.question_id))
        kept = [i for i, s in enumerate(samples) if not isinstance(s, Skipped)]
        if not kept:
            return answers
        batch = self.collate([samples[i] for i in kept])
        device = next(self.model.parameters()).device
        tokens = self.model.generate(
            **model_inputs(batch, device), ratios=self.ratios, max_new_tokens=self.max_new_tokens
        )
        tok = self.processor.tokenizer
        for row, i in enumerate(kept):
            answers[i] = tok.decode(tokens[row].tolist(), skip_special_tokens=True).strip()
        return answers


def evaluate_command(argv: list[str]) -> int:
    from transformers import AutoProcessor

    from lightning_lvp.schedules import parse_schedule

    p = argparse.ArgumentParser(prog="python -m lightning_lvp evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", required=True, help="vqav2 | gqa | vizwiz | textvqa | pope | sqa | mmbench")
    p.add_argument("--questions", required=True, help="question JSONL (question_id, image, text, [category])")
    p.add_argument("--ground_truth", default=None, help="ground-truth JSONL (docs/EVAL.md); omit to only answer")
    p.add_argument("--image_folder", action="append", required=True, help="image folder (repeatable)")
    p.add_argument("--model_path", required=True, help="llava-hf model folder or hub id")
    p.add_argument("--pruners", default=None, help="pruner folder or checkpoint (omit for the unpruned model)")
    p.add_argument(
        "--ratios",
        default=None,
        help="inference schedule 'a,b,c' or 'paper:0.5' (lightning_lvp/schedules.py; default: the pruners' keep_ratios)",
    )
    p.add_argument("--batch_size", type=int, default=8, help="questions per generation batch")
    p.add_argument("--max_new_tokens", type=int, default=16, help="decoding budget per answer")
    p.add_argument("--answers", required=True, help="answers JSONL to write (never overwritten without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing answers file")
    p.add_argument(
        "--no_prompt_suffix",
        action="store_true",
        help="send the bare question, without the benchmark's suffix line (models trained without it, e.g. the digits demo)",
    )
    args = p.parse_args(argv)
    model = PrunedLlava.from_pretrained(args.model_path, args.pruners)
    processor = AutoProcessor.from_pretrained(args.model_path)
    stages = model.method.num_stages if model.method is not None else None
    ratios = parse_schedule(args.ratios, stages) if args.ratios else None
    gen = PrunedGenerator(model, processor, args.image_folder, ratios, args.max_new_tokens)
    questions, issues = load_questions(args.questions)
    for issue in issues:
        log.warning("%s", issue)
    records = generate_answers(
        args.benchmark,
        questions,
        gen,
        model_id=Path(args.model_path).name,
        batch_size=args.batch_size,
        prompt_suffix=not args.no_prompt_suffix,
    )
    write_answers_jsonl(args.answers, records, overwrite=args.overwrite)
    print(
        f"wrote {len(records)} answers to {args.answers}; malformed question lines: {len(issues)}; "
        f"missing/unreadable images: {dict(gen.missing)}"
    )
    if args.ground_truth:
        report = score_benchmark(args.benchmark, args.answers, args.ground_truth, missing_image_ids=gen.missing_ids)
        print(json.dumps({"metrics": report["metrics"], "counts": report["counts"]}, indent=2))
    return 0
