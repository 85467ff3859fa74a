"""Tiny Qwen2.5-VL batches: samples of text + images of different sizes (token counts), padded."""

from __future__ import annotations

import torch

from lightning_lvp.families import qwen2_5_vl as qwen

IMG, START, END = 98, 96, 95


def sample_ids(pre: int, grids: list[tuple[int, int]], post: int, answer: int = 0, seed: int = 0):
    """Ids of ``pre`` text, then per image <start> + h*w/4 image tokens + <end>, then ``post`` text + answer."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 90, (n,), generator=g).tolist()  # noqa: E731
    ids = text(pre)
    for h, w in grids:
        ids += [START] + [IMG] * (h * w // 4) + [END] + text(1)
    ids += text(post) + text(answer)
    return ids, [0] * (len(ids) - answer) + [1] * answer


def make_batch(
    specs: list[tuple[int, list[tuple[int, int]], int, int]], padding: str = "left", seed: int = 0, width: int = 96
) -> dict:
    """Batch of (pre, [(h, w) patch grids], post, answer) samples; ``width`` = one pixel_values row."""
    rows = [sample_ids(*s, seed=seed + i) for i, s in enumerate(specs)]
    t = max(len(r[0]) for r in rows)
    b = len(rows)
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    ans = torch.zeros(b, t, dtype=torch.bool)
    for i, (r, a) in enumerate(rows):
        sl = slice(t - len(r), t) if padding == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl], ans[i, sl] = torch.tensor(r), 1, torch.tensor(a, dtype=torch.bool)
    grid = torch.tensor([[1, h, w] for s in specs for h, w in s[1]], dtype=torch.long)
    pix = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(seed))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.where(ans, ids, -100),
        "prompt_mask": mask.bool() & (ids != IMG) & ~ans,
        "pixel_values": pix,
        "image_grid_thw": grid,
    }


def sample_of(batch: dict, i: int) -> dict:
    """Sample ``i`` alone, padding removed (its own images' patches and grid rows)."""
    keep = batch["attention_mask"][i].bool()
    counts = (batch["input_ids"] == IMG).sum(1).tolist()
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    patches = batch["image_grid_thw"].prod(-1).tolist()
    first, done = 0, 0
    while done < sum(counts[:i]):
        done += per_image[first]
        first += 1
    last, have = first, 0
    while have < counts[i]:
        have += per_image[last]
        last += 1
    start = sum(patches[:first])
    out = {k: v[i : i + 1, keep] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    out["pixel_values"] = batch["pixel_values"][start : start + sum(patches[first:last])]
    out["image_grid_thw"] = batch["image_grid_thw"][first:last]
    return out


def hf_inputs(batch: dict) -> dict:
    """Keyword arguments of HF's ``Qwen2_5_VLForConditionalGeneration`` forward / generate."""
    ids = batch["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"],
        "image_grid_thw": batch["image_grid_thw"],
        "mm_token_type_ids": (ids == IMG).int(),
    }


def build(seed: int = 0, **kw):
    return qwen.build_tiny(seed=seed, **kw)


WORDS = "What is in the picture ? a cat on mat colour it black digit row".split() + [str(i) for i in range(10)]


def tiny_qwen_folder(folder, num_layers: int = 4, seed: int = 0, words: list[str] = WORDS):
    """A tiny Qwen2.5-VL model folder as a hub checkpoint has it: weights + config (special ids from the
    tokenizer), tokenizer with the chat template, ``preprocessor_config.json`` (4 px patches, 2x2 merge).

    Returns:
        (model, QwenProcessor) as saved.
    """
    import copy

    from transformers import Qwen2_5_VLForConditionalGeneration

    from lightning_lvp.data.qwen_chat import QwenProcessor, build_tiny_qwen_tokenizer, tiny_qwen_image_processor

    tok = build_tiny_qwen_tokenizer(words)
    processor = QwenProcessor(tok, tiny_qwen_image_processor(patch_size=4, max_pixels=64 * 64))
    config = qwen.tiny_config(num_layers=num_layers, vocab_size=len(tok) + 1)
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    for name, value in {**ids, "video_token_id": len(tok)}.items():  # no video token in the vocabulary
        setattr(config, name, value)
    config.text_config.pad_token_id = tok.pad_token_id
    config.text_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def write_images(folder, sizes: list[tuple[int, int]], seed: int = 0) -> list[str]:
    """Random RGB PNGs of (width, height) ``sizes`` in ``folder``; their file names."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    names = []
    for i, (w, h) in enumerate(sizes):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(f"{folder}/im{i}.png")
        names.append(f"im{i}.png")
    return names
