"""LLaVA-format instruction data: JSON loading, entry checks and filtering, lazy image loading.

An entry is ``{"id", "image": <path under an image folder>, "conversations": [{"from", "value"}, ...]}``
(LLaVA-1.5's ``llava_v1_5_mix665k.json``). Optional extra keys: ``question_type`` (str) and
``relevant_patches`` (list of patch indices that decide the answer; the digits set writes both).

Bad input never crashes deep inside a worker with an opaque trace: each problem is either a
:class:`BadSampleError` naming the entry id and the file (policy ``"raise"``), or, under policy
``"skip"``, a skip counted per reason (structural problems at setup, image and length problems when
the sample is loaded, see ``collate.SkipCountingLoader``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import ProcessorMixin

from lightning_lvp.data.conversation import (
    GPT,
    HUMAN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VICUNA_V1,
    ConversationTemplate,
    move_image_token_to_front,
    render_conversation,
    tokenize_conversation,
)

log = logging.getLogger(__name__)

Policy = Literal["raise", "skip"]
POLICIES = ("raise", "skip")


class BadSampleError(ValueError):
    """A data entry or its image cannot be used; the message names the entry id and the file.

    Args:
        message: what is wrong, with the entry id and the file.
        reason: short reason code the skip counters use (``missing_image``, ``image_truncated``, ...).
    """

    def __init__(self, message: str, reason: str = "bad_sample") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Skipped:
    """What ``LlavaDataset.__getitem__`` returns for a bad sample under the ``skip`` policy."""

    id: str
    reason: str


@dataclass
class FilterReport:
    """Counts of the entries kept and dropped while loading one JSON file.

    Args:
        source: the JSON file.
        total: entries in the file.
        kept: entries kept.
        dropped: dropped entries per reason (``text_only`` is expected filtering, the rest is bad input).
    """

    source: str
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line: ``file: kept K of N; dropped D (reason=n, ...)``."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.source}: kept {self.kept} of {self.total}; dropped {sum(self.dropped.values())} ({reasons})"


def load_entries(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON list (``.json``) or one JSON object per line (``.jsonl``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed JSON, with the line, column and character offset of the error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        entries = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: malformed JSON at line {lineno}, column {e.colno}: {e.msg}") from None
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (char offset {e.pos}): {e.msg}"
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def entry_problem(entry: object) -> str | None:
    """The reason an entry cannot be trained on, or None when it is fine.

    Reasons: ``not_an_object``, ``missing_id``, ``text_only`` (no image: expected filtering),
    ``bad_image_field`` (not one path string),
    ``no_conversations``, ``bad_turn_order`` (must alternate human/gpt, starting with human and ending
    with gpt), ``no_image_token``, ``multiple_image_tokens``, ``empty_reply``.
    """
    if not isinstance(entry, dict):
        return "not_an_object"
    if "id" not in entry:
        return "missing_id"
    if not entry.get("image"):
        return "text_only"
    if not isinstance(entry["image"], str):
        return "bad_image_field"
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no_conversations"
    expected = [HUMAN, GPT] * (len(turns) // 2 + 1)
    if len(turns) % 2 or any(not isinstance(t, dict) or t.get("from") != r for t, r in zip(turns, expected)):
        return "bad_turn_order"
    if any(not isinstance(t.get("value"), str) for t in turns):
        return "bad_turn_order"
    n_images = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if n_images == 0 or not any(IMAGE_TOKEN in t["value"] for t in turns if t["from"] == HUMAN):
        return "no_image_token"
    if n_images > 1:
        return "multiple_image_tokens"
    if any(not t["value"].strip() for t in turns if t["from"] == GPT):
        return "empty_reply"
    return None


def filter_entries(entries: list, source: str, policy: Policy = "raise") -> tuple[list[dict], FilterReport]:
    """Keeps the usable image entries; drops text-only ones (counted); bad ones raise or are counted.

    Args:
        entries: the loaded JSON list.
        source: the file they came from (for messages).
        policy: ``"raise"`` stops at the first bad entry; ``"skip"`` counts it per reason.

    Raises:
        BadSampleError: under ``"raise"``, naming the entry id, its position and the file.
    """
    report = FilterReport(source=source, total=len(entries))
    kept = []
    for index, entry in enumerate(entries):
        reason = entry_problem(entry)
        if reason is None:
            kept.append(entry)
            continue
        if reason != "text_only" and policy == "raise":
            entry_id = entry.get("id", "?") if isinstance(entry, dict) else "?"
            raise BadSampleError(
                f"{source}: entry {index} (id {entry_id!r}): {reason}; use the skip policy to drop such entries", reason
            )
        report.dropped[reason] += 1
    report.kept = len(kept)
    return kept, report


def resolve_image(relative: str, folders: list[str]) -> Path:
    """The first ``folder/relative`` that exists, else the path under the first folder (to report)."""
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return Path(folders[0]) / relative if folders else Path(relative)


def open_rgb(path: Path) -> Image.Image:
    """Decodes an image fully and converts it to RGB (grayscale, palette, CMYK; alpha over white).

    Raises:
        FileNotFoundError: no such file.
        OSError: unreadable or truncated file (PIL's errors).
    """
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here and not later
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pads to a square with ``background``, the image centred (LLaVA-1.5's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def num_image_tokens(processor: ProcessorMixin) -> int:
    """Image tokens per image as ``LlavaProcessor`` counts them (patches + extra tokens - CLS if "default")."""
    crop = processor.image_processor.crop_size
    n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    n += getattr(processor, "num_additional_image_tokens", 0)
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        n -= 1
    return n


class PackedEntries:
    """A read-only list of JSON objects stored as one byte array.

    Python lists of dicts turn copy-on-write into copy-on-read in forked DataLoader workers (every
    access touches reference counts), so each worker would slowly copy the 620k entries; one numpy
    buffer is shared for free. ``entries[i]`` decodes entry ``i``.

    Args:
        entries: the JSON-serialisable entries.
    """

    def __init__(self, entries: list[dict]) -> None:
        blobs = [json.dumps(e, separators=(",", ":")).encode() for e in entries]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return json.loads(self._data[self._offsets[index] : self._offsets[index + 1]].tobytes())


class LlavaDataset(Dataset):
    """LLaVA-1.5 samples, decoded lazily (in the DataLoader workers).

    Args:
        entries: checked entries (see :func:`filter_entries`).
        image_folders: folders the ``image`` paths are relative to (the first that has the file wins).
        processor: a ``LlavaProcessor`` (its tokenizer, image processor and patch size are used).
        max_length: the model's context length; longer samples are cut at the end, never inside the image.
        policy: what a bad sample does at load time: ``"raise"`` a :class:`BadSampleError`, or ``"skip"``
            (returns :class:`Skipped`, counted by the collate function).
        prompt_only: render up to "ASSISTANT:" of the last turn, without labels (for generation).
        template: the conversation template.
        pad_to_square: pad images to a square with the image processor's mean colour first (LLaVA-1.5).
    """

    def __init__(
        self,
        entries: list[dict],
        image_folders: list[str],
        processor: ProcessorMixin,
        max_length: int = 2048,
        policy: Policy = "raise",
        prompt_only: bool = False,
        template: ConversationTemplate = VICUNA_V1,
        pad_to_square: bool = True,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.entries = PackedEntries(entries)
        words = [sum(len(t["value"].split()) for t in e["conversations"]) for e in entries]
        self._lengths = np.asarray(words, dtype=np.int64) + num_image_tokens(processor)
        self.image_folders = list(image_folders)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.num_image_tokens = num_image_tokens(processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.max_length = max_length
        self.policy = policy
        self.prompt_only = prompt_only
        self.template = template
        self.pad_to_square = pad_to_square
        self.background = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)

    def __len__(self) -> int:
        return len(self.entries)

    def approximate_lengths(self) -> list[int]:
        """Per-entry length estimate without tokenizing (words + image tokens), for length grouping."""
        return self._lengths.tolist()

    def __getitem__(self, index: int) -> dict | Skipped:
        entry = self.entries[index]
        try:
            return self._load(entry)
        except BadSampleError as error:
            if self.policy == "raise":
                raise
            return Skipped(id=str(entry.get("id")), reason=error.reason)

    def _bad(self, entry: dict, reason: str, detail: str, path: Path | None = None) -> BadSampleError:
        """A BadSampleError naming the entry and the file."""
        where = f" (image {path})" if path is not None else ""
        return BadSampleError(f"entry {entry.get('id')!r}{where}: {reason}: {detail}", reason)

    def _image(self, entry: dict) -> torch.Tensor:
        """(3, H, W) pixel values of the entry's image."""
        path = resolve_image(entry["image"], self.image_folders)
        try:
            image = open_rgb(path)
        except FileNotFoundError:
            raise self._bad(entry, "missing_image", "file not found", path) from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, ...
            raise self._bad(entry, "unreadable_image", f"{type(e).__name__}: {e}", path) from None
        if self.pad_to_square:
            image = expand_to_square(image, self.background)
        try:
            return self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        except Exception as e:  # e.g. a 1-pixel image the resize cannot handle: name the entry, not the processor
            raise self._bad(entry, "unreadable_image", f"image processor failed: {type(e).__name__}: {e}", path) from e

    def _load(self, entry: dict) -> dict:
        turns = [{"from": t["from"], "value": move_image_token_to_front(t["value"])} for t in entry["conversations"]]
        rendered = render_conversation(turns, self.template, prompt_only=self.prompt_only)
        input_ids, labels, vision = tokenize_conversation(
            rendered, self.tokenizer, self.num_image_tokens, self.image_token_id
        )
        input_ids, labels, vision = self._truncate(entry, input_ids, labels, vision)
        pixel_values = self._image(entry)
        sample = {
            "input_ids": input_ids,
            "vision_mask": vision,
            "prompt_mask": self._prompt_mask(labels, vision),
            "pixel_values": pixel_values,
            "id": str(entry["id"]),
            "answer": rendered.answer,
            "question_type": str(entry.get("question_type", "")),
            "image": str(entry["image"]),  # image identity: questions about one image are compared by it
        }
        if not self.prompt_only:
            sample["labels"] = labels
        if entry.get("relevant_patches") is not None:
            sample["relevant_mask"] = self._relevant_mask(entry, vision)
        return sample

    def _truncate(
        self, entry: dict, input_ids: torch.Tensor, labels: torch.Tensor, vision: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cuts to ``max_length`` at the end; a cut inside the image (or the prompt, or all answers) is bad."""
        if len(input_ids) <= self.max_length:
            return input_ids, labels, vision
        detail = f"{len(input_ids)} tokens > max_length {self.max_length}"
        if vision[self.max_length :].any():
            raise self._bad(entry, "image_truncated", detail)
        if self.prompt_only:
            raise self._bad(entry, "prompt_too_long", detail)
        labels = labels[: self.max_length]
        if (labels == IGNORE_INDEX).all():
            raise self._bad(entry, "answer_truncated", detail)
        return input_ids[: self.max_length], labels, vision[: self.max_length]

    def _prompt_mask(self, labels: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        """(T,) Bool: text tokens before the first answer token (all text tokens in prompt-only mode)."""
        text = ~vision
        if self.prompt_only:
            return text
        supervised = (labels != IGNORE_INDEX).nonzero()
        first = int(supervised[0]) if len(supervised) else len(labels)
        return text & (torch.arange(len(labels)) < first)

    def _relevant_mask(self, entry: dict, vision: torch.Tensor) -> torch.Tensor:
        """(T,) Bool: True at the image tokens listed in ``relevant_patches``."""
        positions = vision.nonzero().squeeze(1)  # (N_vis,)
        patches = torch.as_tensor(entry["relevant_patches"], dtype=torch.long)
        if len(patches) and (patches.min() < 0 or patches.max() >= len(positions)):
            raise self._bad(entry, "bad_relevant_patches", f"indices must be in [0, {len(positions)})")
        mask = torch.zeros_like(vision)
        mask[positions[patches]] = True
        return mask
