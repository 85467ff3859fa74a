"""Qwen2.5-VL's chat template + label masking for LLaVA-format JSON, token-exact against HF's processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_lvp.data.conversation import IGNORE_INDEX
from lightning_lvp.data.qwen_chat import (
    IMAGE_PAD,
    build_tiny_qwen_tokenizer,
    render_chatml,
    tiny_qwen_image_processor,
    tokenize_chatml,
)

TURNS = [
    {"from": "human", "value": "What is in the picture ?\n<image>"},
    {"from": "gpt", "value": "a cat on a mat"},
    {"from": "human", "value": "What colour is it ?"},
    {"from": "gpt", "value": "black"},
]
WORDS = "What is in the picture ? a cat on mat colour it black".split()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_qwen_tokenizer(WORDS)


def hf_tokens(tok, text: str, grids: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5_VLProcessor.__call__``'s text side: each <|image_pad|> -> t h w / 4 copies, then tokenize."""
    parts = text.split(IMAGE_PAD)
    counts = (grids.prod(-1) // 4).tolist()
    text = parts[0] + "".join(IMAGE_PAD * n + p for n, p in zip(counts, parts[1:], strict=True))
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def messages(turns):
    """The same conversation as HF chat messages (images first in a user turn, as Qwen's examples)."""
    out = []
    for t in turns:
        role = "user" if t["from"] == "human" else "assistant"
        parts = [{"type": "image"}] * t["value"].count("<image>")
        parts.append({"type": "text", "text": t["value"].replace("<image>", "").strip()})
        out.append({"role": role, "content": parts})
    return out


def test_render_equals_hf_apply_chat_template(tok):
    assert render_chatml(TURNS).text == tok.apply_chat_template(messages(TURNS), tokenize=False)
    prompt = render_chatml(TURNS, prompt_only=True).text
    assert prompt == tok.apply_chat_template(messages(TURNS[:-1]), tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("size", [(32, 24), (48, 40)])
def test_tokens_and_image_expansion_equal_hf(tok, size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    pixels = tiny_qwen_image_processor()(images=[image], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    assert pixels["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 4 * 4)
    reference = hf_tokens(tok, tok.apply_chat_template(messages(TURNS), tokenize=False), grid)
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    counts = (grid.prod(-1) // 4).tolist()
    ids, labels, vision = tokenize_chatml(render_chatml(TURNS), tok, counts, pad_id)
    assert torch.equal(ids, reference)
    assert int(vision.sum()) == counts[0] == int((reference == pad_id).sum())
    # supervised: each reply + <|im_end|> + "\n", exactly (Qwen's fine-tuning labels)
    supervised = tok.decode(ids[labels != IGNORE_INDEX])
    assert supervised.split() == "a cat on a mat <|im_end|> black <|im_end|>".split()
    assert int((labels != IGNORE_INDEX).sum()) == len(tok("a cat on a mat<|im_end|>\nblack<|im_end|>\n")["input_ids"])
    assert (labels[vision] == IGNORE_INDEX).all()


def test_two_images_and_count_mismatch(tok):
    turns = [{"from": "human", "value": "<image> <image> What is it ?"}, {"from": "gpt", "value": "a cat"}]
    rendered = render_chatml(turns)
    assert rendered.text == tok.apply_chat_template(messages(turns), tokenize=False)
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    ids, _, vision = tokenize_chatml(rendered, tok, [4, 6], pad_id)
    assert torch.equal(ids, hf_tokens(tok, rendered.text, torch.tensor([[1, 4, 4], [1, 4, 6]])))
    assert int(vision.sum()) == 10
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> but 1 images"):
        tokenize_chatml(rendered, tok, [4], pad_id)
