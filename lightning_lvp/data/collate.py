"""Batching per the contract of ``docs/DESIGN.md``, skip counting, and teacher-forced answer accuracy."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import torch
from torch.utils.data import DataLoader

from lightning_lvp.data.conversation import IGNORE_INDEX
from lightning_lvp.data.llava_dataset import Skipped

log = logging.getLogger(__name__)

PaddingSide = Literal["right", "left"]
SKIPPED_KEY = "skipped"


def _pad(tensors: list[torch.Tensor], value: int | bool, side: PaddingSide) -> torch.Tensor:
    """Stacks 1-D tensors into (B, T_max), padding with ``value`` on ``side``."""
    length = max(len(t) for t in tensors)
    out = torch.full((len(tensors), length), value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        if side == "right":
            out[i, : len(t)] = t
        else:
            out[i, length - len(t) :] = t
    return out


class LlavaCollator:
    """Pads LlavaDataset samples into a batch dict (picklable, for DataLoader workers).

    Args:
        pad_token_id: id used for padding ``input_ids``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
    """

    def __init__(self, pad_token_id: int, padding_side: PaddingSide = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, samples: list[dict | Skipped]) -> dict:
        """Collates samples, dropping skipped ones.

        Returns:
            ``input_ids`` / ``attention_mask`` / ``labels``: Long (B, T); ``pixel_values``: (B, 3, H, W);
            ``vision_mask`` / ``prompt_mask`` (and ``relevant_mask`` when the samples carry it): Bool (B, T);
            ``ids`` / ``answers`` / ``question_types`` / ``images``: list[str]; ``skipped``: Counter of reasons, only
            when some samples were skipped. ``labels`` is absent for prompt-only samples. An empty batch
            (every sample skipped) has only ``skipped``.
        """
        skipped = Counter(s.reason for s in samples if isinstance(s, Skipped))
        kept = [s for s in samples if not isinstance(s, Skipped)]
        batch: dict = {SKIPPED_KEY: skipped} if skipped else {}
        if not kept:
            return batch
        side = self.padding_side
        ids = [s["input_ids"] for s in kept]
        batch["input_ids"] = _pad(ids, self.pad_token_id, side)
        batch["attention_mask"] = _pad([torch.ones_like(t) for t in ids], 0, side)
        if all("labels" in s for s in kept):
            batch["labels"] = _pad([s["labels"] for s in kept], IGNORE_INDEX, side)
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in kept])
        batch["vision_mask"] = _pad([s["vision_mask"] for s in kept], False, side)
        batch["prompt_mask"] = _pad([s["prompt_mask"] for s in kept], False, side)
        if any("relevant_mask" in s for s in kept):
            relevant = [s.get("relevant_mask", torch.zeros_like(s["vision_mask"])) for s in kept]
            batch["relevant_mask"] = _pad(relevant, False, side)
        batch["ids"] = [s["id"] for s in kept]
        batch["answers"] = [s["answer"] for s in kept]
        batch["question_types"] = [s["question_type"] for s in kept]
        batch["images"] = [s.get("image", "") for s in kept]
        return batch


class SkipCountingLoader(DataLoader):
    """A DataLoader that removes the ``skipped`` counts from each batch, sums them over the epoch,
    drops batches whose samples were all skipped, and logs the counts per reason when the epoch ends.

    Args:
        *args: passed to ``DataLoader``.
        split: name used in the end-of-epoch report (``train``, ``val``, ...).
        skip_counter: Counter that accumulates the skips of every epoch (shared with the owner, and with the
            copies Lightning makes of the loader, e.g. to insert a DistributedSampler).
        **kwargs: passed to ``DataLoader``.
    """

    def __init__(self, *args, split: str = "train", skip_counter: Counter | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.split = split
        self.skip_counter = skip_counter if skip_counter is not None else Counter()
        self.epoch_skips: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        self.epoch_skips = Counter()
        for batch in super().__iter__():
            skipped = batch.pop(SKIPPED_KEY, None)
            if skipped:
                self.epoch_skips.update(skipped)
                self.skip_counter.update(skipped)
            if "input_ids" in batch:
                yield batch
        if self.epoch_skips:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.epoch_skips.items()))
            log.warning(
                "%s: skipped %d bad samples this epoch (%s)", self.split, sum(self.epoch_skips.values()), reasons
            )


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced exact match: every label token is the argmax of the logits one position earlier.

    Args:
        logits: (B, T, V) next-token logits (position t predicts token t+1).
        labels: (B, T) Long, -100 where not supervised.

    Returns:
        (B,) Bool; False for samples without any label.
    """
    predicted = logits[:, :-1].argmax(-1)  # (B, T-1) predictions of tokens 1..T-1
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX
    return ((predicted == target) | ~supervised).all(-1) & supervised.any(-1)
