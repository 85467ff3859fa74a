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
import math
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
from lightning_lvp.data.qwen_chat import (
    IMAGE_PAD,
    is_qwen_processor,
    qwen_image_tokens,
    qwen_max_image_tokens,
    render_chatml,
    tokenize_chatml,
)

log = logging.getLogger(__name__)

Policy = Literal["raise", "skip"]
POLICIES = ("raise", "skip")
# 50 megapixels (150 MB as decoded RGB): above any LLaVA-1.5 training image, well below PIL's own
# decompression-bomb error (2 x Image.MAX_IMAGE_PIXELS = 179 Mpx), which would come after the decode.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class BadSampleError(ValueError):
    """A data entry or its image cannot be used; the message names the entry id and the file.

    Args:
        message: what is wrong, with the entry id and the file.
        reason: short reason code the skip counters use (``missing_image``, ``image_truncated``, ...).
        file: the file at fault (the image, or the JSON for setup-time problems), for skip records.
    """

    def __init__(self, message: str, reason: str = "bad_sample", file: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.file = file


@dataclass(frozen=True)
class Skipped:
    """What ``LlavaDataset.__getitem__`` returns for a bad sample under the ``skip`` policy."""

    id: str
    reason: str
    file: str = ""


@dataclass
class FilterReport:
    """Counts of the entries kept and dropped while loading one JSON file.

    Args:
        source: the JSON file.
        total: entries in the file.
        kept: entries kept.
        dropped: dropped entries per reason (``text_only`` is expected filtering, the rest is bad input).
        entries: every dropped entry as ``{"index", "id", "file", "reason"}`` (written to the run's
            ``skipped_entries.jsonl`` by :class:`lightning_lvp.data.skips.SkipReport`).
    """

    source: str
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    entries: list[dict] = field(default_factory=list)

    @property
    def bad(self) -> int:
        """Entries dropped as bad input (everything but ``text_only``)."""
        return sum(n for reason, n in self.dropped.items() if reason != "text_only")

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


def entry_images(entry: dict) -> list[str]:
    """The entry's image paths in ``<image>`` order: ``image`` is one path, or a list of paths (several images)."""
    return list(entry["image"]) if isinstance(entry["image"], list) else [entry["image"]]


def entry_problem(entry: object, max_images: int | None = 1) -> str | None:
    """The reason an entry cannot be trained on, or None when it is fine.

    Args:
        entry: one JSON entry.
        max_images: images one sample may have (1: LLaVA-1.5 / NeXT; None = any number, Qwen2.5-VL), given
            as a list ``"image": [path, ...]`` with one ``<image>`` per path, in order.

    Reasons: ``not_an_object``, ``missing_id``, ``text_only`` (no image: expected filtering),
    ``bad_image_field`` (not one path string, or a list of them where several images are allowed),
    ``no_conversations``, ``bad_turn_order`` (must alternate human/gpt, starting with human and ending
    with gpt), ``no_image_token``, ``multiple_image_tokens`` (more ``<image>`` than the model takes),
    ``image_count_mismatch`` (a list of images and a different number of ``<image>``), ``empty_reply``.
    """
    if not isinstance(entry, dict):
        return "not_an_object"
    if "id" not in entry:
        return "missing_id"
    if not entry.get("image"):
        return "text_only"
    several = isinstance(entry["image"], list) and max_images != 1
    if several and not all(isinstance(p, str) and p for p in entry["image"]):
        return "bad_image_field"
    if not several and not isinstance(entry["image"], str):
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
    if several and n_images != len(entry["image"]):
        return "image_count_mismatch"
    if n_images > (max_images or n_images) or (not several and n_images > 1):
        return "multiple_image_tokens"
    if any(not t["value"].strip() for t in turns if t["from"] == GPT):
        return "empty_reply"
    return None


def filter_entries(
    entries: list, source: str, policy: Policy = "raise", max_images: int | None = 1
) -> tuple[list[dict], FilterReport]:
    """Keeps the usable image entries; drops text-only ones (counted); bad ones raise or are counted.

    Args:
        entries: the loaded JSON list.
        source: the file they came from (for messages).
        policy: ``"raise"`` stops at the first bad entry; ``"skip"`` counts it per reason.
        max_images: images one sample may have (:func:`entry_problem`; None = any number).

    Raises:
        BadSampleError: under ``"raise"``, naming the entry id, its position and the file.
    """
    report = FilterReport(source=source, total=len(entries))
    kept = []
    for index, entry in enumerate(entries):
        reason = entry_problem(entry, max_images)
        if reason is None:
            kept.append(entry)
            continue
        entry_id = entry.get("id", "?") if isinstance(entry, dict) else "?"
        if reason != "text_only" and policy == "raise":
            raise BadSampleError(
                f"{source}: entry {index} (id {entry_id!r}): {reason}; use the skip policy to drop such entries",
                reason,
                source,
            )
        report.dropped[reason] += 1
        report.entries.append({"index": index, "id": str(entry_id), "file": source, "reason": reason})
    report.kept = len(kept)
    return kept, report


def resolve_image(relative: str, folders: list[str]) -> Path:
    """The first ``folder/relative`` that exists, else the path under the first folder (to report)."""
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return Path(folders[0]) / relative if folders else Path(relative)


class ImageTooLargeError(ValueError):
    """An image has more pixels than allowed (checked from the file header, before decoding)."""


def open_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Decodes an image fully and converts it to RGB (grayscale, palette, CMYK; alpha over white).

    Args:
        path: the image file.
        max_pixels: refuse images with more than this many pixels (width x height) BEFORE decoding them.

    Raises:
        FileNotFoundError: no such file.
        ImageTooLargeError: more than ``max_pixels`` pixels, or over PIL's decompression-bomb limit.
        OSError: unreadable or truncated file (PIL's errors).
    """
    try:
        opened = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{e} (PIL.Image.MAX_IMAGE_PIXELS)") from None
    with opened as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"{width} x {height} = {width * height} pixels > data.max_image_pixels={max_pixels} "
                "(raise the limit if the image is genuine)"
            )
        image.load()  # decode now, so a truncated file fails here and not later
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def _size_field(size: object, name: str) -> int | None:
    """``size[name]`` of an image processor's size (a dict or a transformers ``SizeDict``), or None."""
    value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
    return int(value) if value else None


def processor_input_side(image_processor: object) -> int | None:
    """Side of the square a padded image is resized to: ``size.shortest_edge`` (CLIP), else the larger
    of ``size.height`` / ``size.width``; None when the processor does not resize."""
    if not getattr(image_processor, "do_resize", True):
        return None
    size = getattr(image_processor, "size", None) or {}
    side = _size_field(size, "shortest_edge")
    if side is None:
        sides = [v for v in (_size_field(size, "height"), _size_field(size, "width")) if v]
        side = max(sides) if sides else None
    return side


_FILTER_SUPPORT = 3.0  # the widest PIL filter (Lanczos), in output pixels: the margins below cover every filter
_ROW_CHUNK = 1024  # rows of a portrait image padded at a time


def _span(offset: int, length: int, longer: int, side: int) -> tuple[int, int, int, int]:
    """Output pixels [i0, i1) of a ``longer`` -> ``side`` resize whose filter windows reach the input span
    [offset, offset + length), and the input pixels [c0, c1) those windows read (PIL's windows: centre
    (i + 0.5) * scale, half-width support * scale, clipped to [0, longer))."""
    scale = longer / side
    support = _FILTER_SUPPORT * scale
    i0 = max(0, math.floor((offset - support) / scale - 0.5) - 1)
    i1 = min(side, math.ceil((offset + length + support) / scale + 0.5) + 1)
    c0 = max(0, math.floor(i0 * scale - support) - 1)
    c1 = min(longer, math.ceil(i1 * scale + support) + 1)
    return i0, i1, c0, c1


def resize_then_pad(
    image: Image.Image, side: int, background: tuple[int, int, int], resample: int = Image.Resampling.BICUBIC
) -> Image.Image:
    """LLaVA-1.5's ``expand2square`` followed by the processor's resize of the square to ``side`` x ``side``,
    computed without the square: memory is bounded by the image and ``side``, not by its longer edge squared
    (a 20000 x 10 panorama padded first made a 20000 x 20000 square, 1.2 GB RGB, in the worker).

    PIL resizes in two separable passes, horizontal then vertical, rounding to 8 bit in between; both are
    done here on the same input pixels with the same filter windows, only restricted to the band of the
    square the image touches (plus the filter's reach into the padding): the output equals pad-then-resize
    up to floating-point rounding of the window positions (tests/test_data_llava.py measures it).
    Images whose longer edge is at most ``side`` are padded as before (no resize here).

    Args:
        image: an RGB image.
        side: the processor's input side (:func:`processor_input_side`).
        background: padding colour (the processor's mean, as LLaVA-1.5).
        resample: PIL filter of the processor's resize (CLIP: bicubic).
    """
    width, height = image.size
    longer = max(width, height)
    if longer <= side:
        return expand_to_square(image, background)
    scale = longer / side
    result = Image.new(image.mode, (side, side), background)
    if width >= height:  # the image spans the square's width: rows [offset, offset + height) are the image
        offset = (longer - height) // 2
        i0, i1, c0, c1 = _span(offset, height, longer, side)
        rows = image.resize((side, height), resample=resample)  # horizontal pass only
        band = Image.new(image.mode, (side, c1 - c0), background)
        band.paste(rows, (0, offset - c0))
        box = (0, i0 * scale - c0, side, i1 * scale - c0)
        result.paste(band.resize((side, i1 - i0), resample=resample, box=box), (0, i0))
        return result
    offset = (longer - width) // 2  # the image spans the square's height: columns [offset, offset + width)
    i0, i1, c0, c1 = _span(offset, width, longer, side)
    strip = Image.new(image.mode, (i1 - i0, height))
    for top in range(0, height, _ROW_CHUNK):  # horizontal pass, a chunk of padded rows at a time
        rows = min(_ROW_CHUNK, height - top)
        chunk = Image.new(image.mode, (c1 - c0, rows), background)
        chunk.paste(image.crop((0, top, width, top + rows)), (offset - c0, 0))
        box = (i0 * scale - c0, 0, i1 * scale - c0, rows)
        strip.paste(chunk.resize((i1 - i0, rows), resample=resample, box=box), (0, top))
    result.paste(strip.resize((i1 - i0, side), resample=resample), (i0, 0))  # vertical pass
    return result


def center_crop_first(image: Image.Image, image_processor: object, resample: int) -> Image.Image:
    """Without padding: the processor's "resize the shorter edge to S, then centre-crop" done as crop the
    centre region first, then resize it, when the resized longer edge would exceed twice the crop (an
    extreme aspect ratio: a 10 x 20000 image resized to S = 336 first would be 336 x 672000 pixels).
    Other images are returned unchanged (the processor handles them as before)."""
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    shortest = _size_field(size, "shortest_edge")
    crop_h, crop_w = _size_field(crop, "height"), _size_field(crop, "width")
    if not (getattr(image_processor, "do_resize", True) and shortest and crop_h and crop_w):
        return image
    width, height = image.size
    scale = shortest / min(width, height)
    if max(width, height) * scale <= 2 * max(crop_h, crop_w, shortest):
        return image
    box_w, box_h = min(width, crop_w / scale), min(height, crop_h / scale)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    out = (max(1, round(box_w * scale)), max(1, round(box_h * scale)))
    return image.resize(out, resample=resample, box=(left, top, left + box_w, top + box_h))


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pads to a square with ``background``, the image centred (LLaVA-1.5's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def is_anyres(processor: ProcessorMixin) -> bool:
    """A LLaVA-NeXT processor (anyres: the image-token count depends on each image's size)."""
    return getattr(processor.image_processor, "image_grid_pinpoints", None) is not None


def anyres_image_tokens(processor: ProcessorMixin, image_size: tuple[int, int]) -> int:
    """Image tokens ``LlavaNextProcessor`` expands one ``<image>`` of ``image_size`` (height, width) to."""
    return int(processor._get_num_multimodal_tokens(image_sizes=[list(image_size)])["num_image_tokens"][0])


def num_image_tokens(processor: ProcessorMixin) -> int:
    """Image tokens per image as ``LlavaProcessor`` counts them (patches + extra tokens - CLS if "default");
    for a LLaVA-NeXT processor the base view's count (each image has more: :func:`anyres_image_tokens`)."""
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
        pad_to_square: pad images to a square with the image processor's mean colour first (LLaVA-1.5);
            done after resizing to the processor's size (:func:`resize_then_pad`), so memory stays bounded.
            Ignored for a LLaVA-NeXT processor (anyres keeps the aspect ratio: base view + crops; each
            sample then carries ``pixel_values`` (V, 3, H, W) and ``image_size`` (height, width), and
            its ``<image>`` expands to the processor's count for that size). Ignored for a Qwen2.5-VL
            processor too (:func:`~lightning_lvp.data.qwen_chat.is_qwen_processor`): dynamic resolution,
            Qwen's ChatML template and labels (``data/qwen_chat.py``); each sample carries flat patches
            ``pixel_values`` (N, C * 2 * p * p) and ``image_grid_thw`` (1, 3), its ``<|image_pad|>``
            expanded to ``t h w / merge_size^2`` tokens.
        max_image_pixels: images with more pixels are bad samples (``image_too_large``), checked before decoding.
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
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.entries = PackedEntries(entries)
        self.image_folders = list(image_folders)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.processor = processor
        self.qwen = is_qwen_processor(processor)  # Qwen2.5-VL: flat patches + image_grid_thw, ChatML
        self.anyres = not self.qwen and is_anyres(processor)
        # Qwen: the count depends on each image; its upper bound is the length estimate for grouping
        self.num_image_tokens = None if self.qwen else num_image_tokens(processor)
        words = [sum(len(t["value"].split()) for t in e["conversations"]) for e in entries]
        estimate = qwen_max_image_tokens(self.image_processor) if self.qwen else self.num_image_tokens
        images = [len(entry_images(e)) for e in entries]
        self._lengths = np.asarray(words, dtype=np.int64) + estimate * np.asarray(images, dtype=np.int64)
        image_token = IMAGE_PAD if self.qwen else IMAGE_TOKEN
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer of the processor ({getattr(self.tokenizer, 'name_or_path', '')}) has no {image_token} "
                f"token: add it (tokenizer.add_tokens(['{image_token}'], special_tokens=True), then save_pretrained) "
                "and set the model config's image_token_id to its id"
            )
        self.max_length = max_length
        self.policy = policy
        self.prompt_only = prompt_only
        self.template = template
        self.pad_to_square = pad_to_square
        self.max_image_pixels = max_image_pixels
        self.input_side = processor_input_side(self.image_processor)
        self.resample = int(getattr(self.image_processor, "resample", Image.Resampling.BICUBIC))
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
            return Skipped(id=str(entry.get("id")), reason=error.reason, file=error.file)

    def _bad(self, entry: dict, reason: str, detail: str, path: Path | None = None) -> BadSampleError:
        """A BadSampleError naming the entry and the file."""
        where = f" (image {path})" if path is not None else ""
        file = str(path if path is not None else resolve_image(entry_images(entry)[0], self.image_folders))
        return BadSampleError(f"entry {entry.get('id')!r}{where}: {reason}: {detail}", reason, file)

    def _image(self, entry: dict) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) pixel values of the entry's image; anyres: ((V, 3, H, W) views, (2,) image size);
        Qwen2.5-VL: ((N, C * 2 * p * p) flat patches of ALL the entry's images, (n_images, 3) image_grid_thw)."""
        if self.qwen:
            opened = [self._open(entry, relative) for relative in entry_images(entry)]
            return self._processed(entry, [image for image, _ in opened], opened[0][1])
        image, path = self._open(entry, entry["image"])
        if self.anyres:
            return self._processed(entry, [image], path)
        if self.pad_to_square and self.input_side:
            image = resize_then_pad(image, self.input_side, self.background, self.resample)
        elif self.pad_to_square:
            image = expand_to_square(image, self.background)
        else:
            image = center_crop_first(image, self.image_processor, self.resample)
        try:
            return self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        except Exception as e:  # e.g. a 1-pixel image the resize cannot handle: name the entry, not the processor
            raise self._bad(entry, "unreadable_image", f"image processor failed: {type(e).__name__}: {e}", path) from e

    def _open(self, entry: dict, relative: str) -> tuple[Image.Image, Path]:
        """One decoded RGB image of the entry and its path; a :class:`BadSampleError` naming both if it fails."""
        path = resolve_image(relative, self.image_folders)
        try:
            return open_rgb(path, self.max_image_pixels), path
        except FileNotFoundError:
            raise self._bad(entry, "missing_image", "file not found", path) from None
        except ImageTooLargeError as e:
            raise self._bad(entry, "image_too_large", str(e), path) from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, ...
            raise self._bad(entry, "unreadable_image", f"{type(e).__name__}: {e}", path) from None

    def _processed(self, entry: dict, images: list[Image.Image], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """LLaVA-NeXT's image processor: ((V, 3, H, W) base view + crops, (2,) original (height, width));
        Qwen2-VL's: ((N, C * 2 * p * p) flat patches of every image, (n_images, 3) image_grid_thw)."""
        try:
            out = self.image_processor(images=images, return_tensors="pt")
        except Exception as e:  # name the entry, not the processor
            raise self._bad(entry, "unreadable_image", f"image processor failed: {type(e).__name__}: {e}", path) from e
        if self.qwen:
            return out["pixel_values"], torch.as_tensor(out["image_grid_thw"]).long()
        return out["pixel_values"][0], torch.as_tensor(out["image_sizes"][0]).long()

    def _tokenize(self, entry: dict) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """Image inputs, input_ids (T,), labels (T,), vision mask (T,) and the last answer, per family."""
        if self.qwen:  # Qwen2.5-VL's ChatML template and labels; <|image_pad|> -> the image's count
            rendered = render_chatml(entry["conversations"], prompt_only=self.prompt_only)
            pixel_values, grid = self._image(entry)
            try:
                ids, labels, vision = tokenize_chatml(
                    rendered, self.tokenizer, qwen_image_tokens(self.image_processor, grid), self.image_token_id
                )
            except ValueError as e:  # e.g. a literal <|image_pad|> in the text: placeholders != images
                detail = f"{e} (one <image> per image; the text itself must not hold Qwen's vision tokens)"
                raise self._bad(entry, "image_token_mismatch", detail) from None
            return {"pixel_values": pixel_values, "image_grid_thw": grid}, ids, labels, vision, rendered.answer
        turns = [{"from": t["from"], "value": move_image_token_to_front(t["value"])} for t in entry["conversations"]]
        rendered = render_conversation(turns, self.template, prompt_only=self.prompt_only)
        image, count = {}, self.num_image_tokens
        if self.anyres:  # the token count depends on the image: decode it first
            pixel_values, image_size = self._image(entry)
            image = {"pixel_values": pixel_values, "image_size": image_size}
            count = anyres_image_tokens(self.processor, tuple(image_size.tolist()))
        ids, labels, vision = tokenize_conversation(rendered, self.tokenizer, count, self.image_token_id)
        return image, ids, labels, vision, rendered.answer

    def _load(self, entry: dict) -> dict:
        image, input_ids, labels, vision, answer = self._tokenize(entry)
        input_ids, labels, vision = self._truncate(entry, input_ids, labels, vision)
        if not image:  # LLaVA-1.5: the count is fixed, decode after the length checks
            image = {"pixel_values": self._image(entry)}
        sample = {
            "input_ids": input_ids,
            "vision_mask": vision,
            "prompt_mask": self._prompt_mask(labels, vision),
            **image,  # pixel_values (+ image_size for LLaVA-NeXT, image_grid_thw for Qwen2.5-VL)
            "id": str(entry["id"]),
            "answer": answer,
            "question_type": str(entry.get("question_type", "")),
            "image": ",".join(entry_images(entry)),  # image identity: questions about one image are compared by it
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
