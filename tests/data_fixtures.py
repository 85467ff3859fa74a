"""Fixtures and helpers for the data tests: the demo processor in a folder, LLaVA-format files on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from lightning_lvp.data.tokenizer import save_tiny_processor  # noqa: E402

IMAGE_SIZE, PATCH_SIZE = 16, 8  # 4 image tokens per sample keeps hand-built expectations short


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory) -> Path:
    """A model folder holding the demo LlavaProcessor (16 px images, 8 px patches -> 4 image tokens)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    save_tiny_processor(folder, IMAGE_SIZE, PATCH_SIZE)
    return folder


@pytest.fixture(scope="session")
def processor(processor_dir):
    """The demo processor, loaded back from its folder."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(processor_dir)


def turns(*values: str) -> list[dict]:
    """Alternating human/gpt turns from their texts."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def entry(entry_id: str, image: str | None = "a.png", conversations: list | None = None, **extra) -> dict:
    """A LLaVA-format entry (default: one question about ``image``)."""
    out = {"id": entry_id, "conversations": turns("<image>\nWhat digit is in r1c1?", "7")}
    if conversations is not None:
        out["conversations"] = conversations
    if image is not None:
        out["image"] = image
    out.update(extra)
    return out


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (16, 16)) -> Path:
    """Writes a small image of ``mode`` (PNG, or JPEG for CMYK)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = {"RGB": (200, 10, 10), "L": 128, "RGBA": (0, 0, 0, 0), "CMYK": (0, 255, 255, 0), "P": 3, "LA": (9, 0)}
    Image.new(mode, size, colour[mode]).save(path)
    return path


def write_json(path: Path, entries: list) -> Path:
    """Writes a JSON list of entries."""
    path.write_text(json.dumps(entries))
    return path
