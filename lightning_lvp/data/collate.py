"""Batching per the contract of ``docs/DESIGN.md``, skip counting, and teacher-forced answer accuracy."""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(B, 3, H, W); LLaVA-NeXT's (V_b, 3, H, W) views -> (B, V_max, 3, H, W), zero views past each count
    (``LlavaNextModel.get_image_features`` reads only the first V_b of each row)."""
    if images[0].dim() == 3:
        return torch.stack(images)
    views = max(x.shape[0] for x in images)
    out = images[0].new_zeros(len(images), views, *images[0].shape[1:])
    for i, x in enumerate(images):
        out[i, : x.shape[0]] = x
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
            ``input_ids`` / ``attention_mask`` / ``labels``: Long (B, T); ``pixel_values``: (B, 3, H, W)
            (LLaVA-NeXT: (B, V_max, 3, H, W) + ``image_sizes`` (B, 2); Qwen2.5-VL: the flat patches of all
            images concatenated, (sum_i t_i h_i w_i, C * 2 * p * p), + ``image_grid_thw`` (n_images, 3));
            ``vision_mask`` / ``prompt_mask`` (and ``relevant_mask`` when the samples carry it): Bool (B, T);
            ``ids`` / ``answers`` / ``question_types`` / ``images``: list[str]; ``skipped``: the :class:`Skipped`
            records (id, file, reason), only when some samples were skipped. ``labels`` is absent for
            prompt-only samples. An empty batch (every sample skipped) has only ``skipped``.
        """
        skipped = [s for s in samples if isinstance(s, Skipped)]
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
        if all("image_grid_thw" in s for s in kept):  # Qwen2.5-VL: flat patches of every image, sample by sample
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in kept])
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in kept])  # (n_images, 3)
        else:
            batch["pixel_values"] = _stack_images([s["pixel_values"] for s in kept])
        if all("image_size" in s for s in kept):  # LLaVA-NeXT: (B, 2) original (height, width)
            batch["image_sizes"] = torch.stack([s["image_size"] for s in kept])
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


@dataclass
class SkipTally:
    """The load-time skips of one split, shared by its loader, the loader's copies and the data module.

    Attributes:
        split: ``train``, ``val`` or ``predict``.
        total: skips per reason over every epoch.
        epoch: skips per reason in the current (or last) pass over the loader.
        records: every skipped sample not yet written out, as ``{"split", "id", "file", "reason"}``
            (:class:`lightning_lvp.data.skips.SkipReport` drains it into the run's JSONL file).
    """

    split: str = "train"
    total: Counter = field(default_factory=Counter)
    epoch: Counter = field(default_factory=Counter)
    records: list[dict] = field(default_factory=list)

    def add(self, skipped: list[Skipped]) -> None:
        """Counts skipped samples and keeps their records."""
        reasons = Counter(s.reason for s in skipped)
        self.epoch.update(reasons)
        self.total.update(reasons)
        self.records += [{"split": self.split, "id": s.id, "file": s.file, "reason": s.reason} for s in skipped]


class _SkipFirst:
    """An index sampler without its first ``count`` batches; ``len`` stays the full epoch's (Lightning
    counts a resumed epoch's batches from the checkpoint's position)."""

    def __init__(self, sampler: Iterable, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.sampler), self.count, None)

    def __len__(self) -> int:
        return len(self.sampler)


class SkipCountingLoader(DataLoader):
    """A DataLoader that removes the skipped samples from each batch, counts them per reason (per epoch
    and in total) with their ids and files, drops batches whose samples were all skipped, and can resume
    in the middle of an epoch.

    Skips are REPORTED by the :class:`lightning_lvp.data.skips.SkipReport` callback at every train and
    validation epoch end (Lightning stops one batch short of exhausting a loader, so the loader itself
    cannot); a loader iterated to its end outside Lightning also logs them.

    Resuming (Lightning's stateful-loader protocol, ``state_dict`` / ``load_state_dict``): the state is the
    position in the epoch (batches taken from the index sampler) and the state of ``generator`` when the
    epoch started; the resumed epoch restores it, so a shuffled order is drawn again exactly, and skips
    the batches already trained on without loading them. Give a ``generator`` for a shuffled loader: the
    global RNG would be consumed differently by a resumed run.

    Args:
        *args: passed to ``DataLoader``.
        split: name used in reports (``train``, ``val``, ...).
        skip_counter: Counter accumulating the skips of every epoch (kept for callers that only want totals).
        tally: the :class:`SkipTally` to record into (shared with the owner, and with the copies Lightning
            makes of the loader, e.g. to insert a DistributedSampler); made from ``split`` and
            ``skip_counter`` when not given.
        **kwargs: passed to ``DataLoader``.
    """

    def __init__(
        self,
        *args,
        split: str = "train",
        skip_counter: Counter | None = None,
        tally: SkipTally | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.split = split
        self.tally = (
            tally if tally is not None else SkipTally(split, skip_counter if skip_counter is not None else Counter())
        )
        self._position = 0  # batches taken from the index sampler in the current epoch (skipped ones included)
        self._epoch_rng: torch.Tensor | None = None  # generator state when the current epoch started
        self._finished = False
        self._resume: dict | None = None
        self._skip_now = 0

    @property
    def skip_counter(self) -> Counter:
        """Skips per reason over every epoch."""
        return self.tally.total

    @property
    def epoch_skips(self) -> Counter:
        """Skips per reason in the current (or last) epoch."""
        return self.tally.epoch

    @property
    def _index_sampler(self):  # DataLoader reads it when an epoch's iterator is made (or reset)
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip_now) if self._skip_now else sampler

    def state_dict(self) -> dict:
        """Where the current epoch stands (Lightning stores it in the checkpoint's loop state)."""
        generator = self.generator.get_state() if self.generator is not None else None
        started = self._epoch_rng if not self._finished else generator
        return {
            "position": 0 if self._finished else self._position,
            "generator": started,
            "epoch_skips": dict(self.tally.epoch),
            "total_skips": dict(self.tally.total),
        }

    def load_state_dict(self, state: dict) -> None:
        """Makes the next epoch continue at ``state``'s position."""
        self._resume = dict(state)
        self.tally.total.clear()
        self.tally.total.update(state.get("total_skips", {}))

    def __iter__(self) -> Iterator[dict]:
        resume, self._resume = self._resume, None
        if resume is not None and self.generator is not None and resume.get("generator") is not None:
            self.generator.set_state(resume["generator"])
        self._epoch_rng = self.generator.get_state() if self.generator is not None else None
        self._position = self._skip_now = resume["position"] if resume else 0
        self._finished = False
        self.tally.epoch.clear()
        self.tally.epoch.update(resume.get("epoch_skips", {}) if resume else {})
        try:
            batches = super().__iter__()  # makes the index iterator now, without the skipped batches
        finally:
            self._skip_now = 0
        for batch in batches:
            self._position += 1
            skipped = batch.pop(SKIPPED_KEY, None)
            if skipped:
                self.tally.add(skipped)
            if "input_ids" in batch:
                yield batch
        self._finished = True
        if self.tally.epoch:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.tally.epoch.items()))
            log.warning(
                "%s: skipped %d bad samples this epoch (%s)", self.split, sum(self.tally.epoch.values()), reasons
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


@contextmanager
def entry_ids_in_errors(batch: dict) -> Iterator[None]:
    """Re-raises a ``ValueError`` that names ``sample i`` of ``batch`` (a model-side check: a token count that
    does not match the images, a ratio that leaves a sample no vision token) with that sample's entry id."""
    try:
        yield
    except ValueError as error:
        found = re.search(r"\bsample (\d+)\b", str(error))
        ids = batch.get("ids") or []
        if found is None or int(found.group(1)) >= len(ids):
            raise
        i = int(found.group(1))
        raise ValueError(f"{error} [sample {i} of this batch is entry {ids[i]!r}]") from error
