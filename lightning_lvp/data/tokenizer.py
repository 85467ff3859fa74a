"""An offline word-level tokenizer and ``LlavaProcessor`` for the tiny demo model.

Built in-process with ``tokenizers`` (no download): one token per word or punctuation run, the
vicuna_v1 template words, the digits-grid vocabulary and the specials ``<pad>``, ``<unk>``, ``<s>``,
``</s>`` and ``<image>`` (the last id). Unknown words map to ``<unk>``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from lightning_lvp.data.conversation import IMAGE_TOKEN, VICUNA_V1
from lightning_lvp.data.digits import digits_vocabulary

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
_GENERIC_WORDS = (
    "a an the this that image picture photo of on with and or yes no row column Describe Answer briefly word".split()
)


def _pre_tokenize(text: str) -> list[str]:
    """Words as the tokenizer's pre-tokenizer splits them."""
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def tiny_vocabulary() -> list[str]:
    """The demo vocabulary in id order (specials first, ``<image>`` last)."""
    words: list[str] = []
    template_text = " ".join([VICUNA_V1.system, *VICUNA_V1.roles, ":"])
    for w in _pre_tokenize(template_text) + digits_vocabulary() + _GENERIC_WORDS:
        if w not in words and w not in SPECIALS:
            words.append(w)
    return [*SPECIALS, *words, IMAGE_TOKEN]


def build_tiny_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer that prepends ``<s>`` and knows ``<image>`` as a special token."""
    vocab = {w: i for i, w in enumerate(tiny_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([*SPECIALS, IMAGE_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_tiny_processor(image_size: int, patch_size: int, model_max_length: int = 2048) -> LlavaProcessor:
    """A ``LlavaProcessor`` for a tiny LLaVA with a CLIP tower of ``image_size`` px and ``patch_size`` patches.

    The CLIP image processor resizes the shortest edge to ``image_size``, centre-crops it and normalises
    with mean = std = 0.5 (the digits images are already ``image_size`` square, so resize and crop are
    no-ops for them).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(model_max_length),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by strategy "default"
    )


def tiny_spec_overrides(processor: LlavaProcessor) -> dict[str, int]:
    """``TinyLlavaSpec`` fields that must agree with the processor (vocab size, image and pad ids, sizes)."""
    tok = processor.tokenizer
    return {
        "vocab_size": len(tok),
        "image_token_id": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "pad_token_id": tok.pad_token_id,
        "image_size": processor.image_processor.crop_size["height"],
        "patch_size": processor.patch_size,
    }


def save_tiny_processor(folder: str | os.PathLike, image_size: int, patch_size: int) -> LlavaProcessor:
    """Builds the demo processor and saves it into ``folder`` (a model folder); returns it."""
    processor = build_tiny_processor(image_size, patch_size)
    Path(folder).mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(folder))
    return processor
