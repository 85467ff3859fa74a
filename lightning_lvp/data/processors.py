"""The data pipeline's processor of a model folder, chosen by the model's family (its ``config.json``).

LLaVA-1.5 / LLaVA-NeXT: transformers' ``AutoProcessor`` (``LlavaProcessor`` / ``LlavaNextProcessor``).
Qwen2.5-VL: :class:`~lightning_lvp.data.qwen_chat.QwenProcessor` (tokenizer + ``Qwen2VLImageProcessorPil``),
because ``Qwen2_5_VLProcessor`` needs torchvision for its video processor. The family comes from the model's
config, never from a flag; a folder without ``config.json`` (a processor saved alone) is read by
``AutoProcessor`` as before.
"""

from __future__ import annotations

import os
from pathlib import Path

QWEN_MODEL_TYPES = ("qwen2_5_vl",)


def model_type_of(path: str | os.PathLike) -> str | None:
    """``model_type`` of the model at ``path`` (local folder or hub id); None for a folder without ``config.json``."""
    from transformers import AutoConfig

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        return None
    return getattr(AutoConfig.from_pretrained(str(path)), "model_type", None)


def load_processor(path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None):
    """The processor the datasets use for the model at ``path``.

    Args:
        path: the model folder (or hub id) holding the processor files.
        min_pixels: Qwen2.5-VL only: lower pixel bound of its resize (None = the folder's preprocessor_config.json).
        max_pixels: Qwen2.5-VL only: upper pixel bound (None = the folder's).

    Raises:
        ValueError: ``min_pixels`` / ``max_pixels`` given for a model that is not Qwen2.5-VL.
    """
    model_type = model_type_of(path)
    if model_type in QWEN_MODEL_TYPES:
        from lightning_lvp.data.qwen_chat import QwenProcessor

        return QwenProcessor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    if min_pixels is not None or max_pixels is not None:
        raise ValueError(
            f"min_pixels / max_pixels are Qwen2.5-VL's image bounds; the model at {path} is {model_type!r} "
            "(its processor resizes to a fixed size): leave them null"
        )
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))
