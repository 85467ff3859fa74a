"""Benchmark evaluation with the pruned model (``python -m lightning_lvp evaluate ...``, lightning_lvp/commands/evaluate.py).

Questions in LLaVA's JSONL format are rendered with the vicuna_v1 template ("USER: <image>\\n{prompt}
ASSISTANT:"), images are prepared exactly as in training (pad to square with the mean colour, the
model's CLIP processor), batches are LEFT-padded and decoded greedily with the pruned KV cache.
Batched answers equal batch-size-1 answers (``tests/test_eval_runner.py``), so unlike LLaVA's
reference scripts we evaluate in batches.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch

from lightning_lvp.data.collate import LlavaCollator
from lightning_lvp.data.llava_dataset import LlavaDataset, Skipped
from lightning_lvp.eval.benchmarks import PromptItem
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
