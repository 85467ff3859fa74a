"""Qwen2.5-VL's ChatML template for LLaVA-format conversations, tokenization and label masking.

The prompt is what ``Qwen2_5_VLProcessor.apply_chat_template`` renders with Qwen2.5-VL's chat template
(:data:`QWEN2_5_VL_CHAT_TEMPLATE`) for ``[{"type": "image"}, {"type": "text", "text": q}]`` user turns:

    "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
    "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{q1}<|im_end|>\\n"
    "<|im_start|>assistant\\n{a1}<|im_end|>\\n" ...

Labels follow Qwen's own fine-tuning code (QwenLM/Qwen2.5-VL ``qwen-vl-finetune/qwenvl/data/data_qwen.py``,
``preprocess_qwen_2_visual``: the first 3 tokens of an assistant message, ``<|im_start|>assistant\\n``,
are ignored): every assistant reply with its ``<|im_end|>\\n`` is supervised, everything else is -100.
As in :mod:`lightning_lvp.data.conversation`, a token is labelled when its first character lies inside a
reply span. Each ``<|image_pad|>`` is then expanded to its image's ``t h w / 4`` tokens (the processor's
``replace_image_token``), image by image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lightning_lvp.data.conversation import GPT, HUMAN, IGNORE_INDEX, IMAGE_TOKEN, RenderedConversation, label_tokens

SYSTEM = "You are a helpful assistant."
IMAGE_PAD = "<|image_pad|>"
VISION = "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD)

# Qwen2-VL / Qwen2.5-VL's chat_template (images and text parts; videos as <|video_pad|>).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user_content(value: str) -> str:
    """A LLaVA human turn in Qwen's layout: every ``<image>`` becomes one vision block, in front of the text."""
    n = value.count(IMAGE_TOKEN)
    return VISION * n + (value.replace(IMAGE_TOKEN, "").strip() if n else value)


def render_chatml(turns: list[dict], system: str = SYSTEM, prompt_only: bool = False) -> RenderedConversation:
    """Renders alternating human/gpt turns with Qwen2.5-VL's chat template.

    Args:
        turns: ``[{"from": "human"|"gpt", "value": str}, ...]`` (LLaVA format, ``<image>`` in human turns).
        system: the system message (Qwen's default one).
        prompt_only: stop after the last ``<|im_start|>assistant\\n`` (the generation prompt).

    Returns:
        The prompt, the ``[start, end)`` spans of every reply + ``<|im_end|>\\n``, and the last reply.
    """
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    spans: list[tuple[int, int]] = []
    answer = ""
    for i, turn in enumerate(turns):
        if turn["from"] == HUMAN:
            text += f"<|im_start|>user\n{user_content(turn['value'])}<|im_end|>\n"
            continue
        if turn["from"] != GPT:
            raise ValueError(f"turn {i}: 'from' must be {HUMAN!r} or {GPT!r}, got {turn['from']!r}")
        answer = turn["value"]
        text += "<|im_start|>assistant\n"
        if prompt_only and i == len(turns) - 1:
            break
        start = len(text)
        text += f"{answer}<|im_end|>\n"
        spans.append((start, len(text)))
    return RenderedConversation(text=text, target_spans=spans, answer=answer)


def tokenize_chatml(
    rendered: RenderedConversation, tokenizer: PreTrainedTokenizerBase, image_tokens: list[int], image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenizes a rendered prompt, masks the labels and expands each ``<|image_pad|>`` to its image's count.

    Args:
        image_tokens: LLM tokens of each image in order (``t h w / 4`` of its ``image_grid_thw`` row).
        image_token_id: id of ``<|image_pad|>``.

    Returns:
        input_ids (T,), labels (T,) (-100 outside the replies), vision_mask (T,) bool.

    Raises:
        ValueError: the prompt has a different number of image placeholders than ``image_tokens``.
    """
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if ids.count(image_token_id) != len(image_tokens):
        raise ValueError(f"the prompt has {ids.count(image_token_id)} {IMAGE_PAD} but {len(image_tokens)} images")
    supervised = label_tokens(list(enc["offset_mapping"]), rendered.target_spans)
    counts = iter(image_tokens)
    out_ids, out_labels, vision = [], [], []
    for token, sup in zip(ids, supervised, strict=True):
        n = next(counts) if token == image_token_id else 1
        out_ids += [token] * n
        out_labels += [token if sup else IGNORE_INDEX] * n
        vision += [token == image_token_id] * n
    return torch.tensor(out_ids), torch.tensor(out_labels), torch.tensor(vision)


def build_tiny_qwen_tokenizer(words: list[str]):
    """An offline word-level tokenizer for tiny Qwen models: ``words``, ``\\n``, the ChatML / vision specials,
    Qwen2.5-VL's chat template (``Qwen2_5_VLProcessor`` itself needs torchvision for its video processor)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [
        *SPECIAL_TOKENS,
        "<unk>",
        "\n",
        "system",
        "user",
        "assistant",
        *SYSTEM.replace(".", " .").split(),
        *words,
    ]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # words, punctuation runs and newlines are tokens; other whitespace separates them
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def tiny_qwen_image_processor(patch_size: int = 4, max_pixels: int = 64 * 64):
    """Qwen2-VL's image processor (flat patches + ``image_grid_thw``) for ``patch_size`` patches, 2x2 merge."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": max_pixels},
    )


@dataclass
class QwenProcessor:
    """The two parts of ``Qwen2_5_VLProcessor`` the data pipeline uses, loadable WITHOUT torchvision.

    ``Qwen2_5_VLProcessor`` (and ``AutoProcessor`` on a Qwen folder) also builds a video processor, which
    needs torchvision; images only need the tokenizer and Qwen2-VL's PIL image processor
    (``Qwen2VLImageProcessorPil``: smart resize to multiples of ``patch_size * merge_size``, flat patches,
    ``image_grid_thw``). Each image gives ``t h w / merge_size^2`` ``<|image_pad|>`` tokens.

    Args:
        tokenizer: the model's tokenizer (knows ``<|image_pad|>``, ``<|vision_start|>``, ...).
        image_processor: a ``Qwen2VLImageProcessorPil`` (or any image processor with its outputs).
    """

    tokenizer: PreTrainedTokenizerBase
    image_processor: Any

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> QwenProcessor:
        """The tokenizer and image processor of a Qwen2.5-VL model folder (or hub id).

        Args:
            path: the folder with ``tokenizer.json`` / ``tokenizer_config.json`` and ``preprocessor_config.json``.
            min_pixels: lower pixel bound of the resize (None = the folder's; the hub's 7B: 3,136 = 56 x 56).
            max_pixels: upper pixel bound (None = the folder's; the hub's 7B: 12,845,056 = 28 x 28 x 16,384).
        """
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        for name, value in bounds.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1 or null (the folder's value), got {value}")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), **bounds)
        size = image_processor.size
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(
                f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']} for the processor of {path}"
            )
        return cls(AutoTokenizer.from_pretrained(str(path)), image_processor)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes the tokenizer and ``preprocessor_config.json`` into ``folder`` (a model folder)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        self.image_processor.save_pretrained(str(folder))


def is_qwen_processor(processor: object) -> bool:
    """A Qwen2-VL-style processor: flat patches + ``image_grid_thw`` (its image processor has ``merge_size``
    and ``temporal_patch_size``); a :class:`QwenProcessor` or HF's own ``Qwen2_5_VLProcessor``."""
    image_processor = getattr(processor, "image_processor", None)
    return all(getattr(image_processor, k, None) is not None for k in ("merge_size", "temporal_patch_size"))


def qwen_image_tokens(image_processor: Any, image_grid_thw: torch.Tensor) -> list[int]:
    """LLM tokens of each image: ``t h w / merge_size^2`` of its ``image_grid_thw`` row (the processor's
    ``replace_image_token``; ``families.qwen2_5_vl.tokens_per_image`` counts the same from the model config)."""
    return (image_grid_thw.prod(-1) // int(image_processor.merge_size) ** 2).tolist()


def qwen_max_image_tokens(image_processor: Any) -> int:
    """Tokens of an image at the processor's upper pixel bound (``size.longest_edge``), for length estimates."""
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    return max(1, int(image_processor.size["longest_edge"]) // factor**2)
