"""LLaVA-format data: conversation template, datasets, batching, the embedded digits set and a demo tokenizer.

``LlavaDataModule`` / ``LengthGroupedSampler`` (Lightning) are imported on first use, so the datasets and
the collator (which evaluation uses) import without Lightning.
"""

from lightning_lvp.data.collate import LlavaCollator, SkipCountingLoader, answer_accuracy
from lightning_lvp.data.conversation import IGNORE_INDEX, VICUNA_V1, ConversationTemplate, render_conversation
from lightning_lvp.data.digits import DigitsConfig, build_digits_dataset, ensure_digits_dataset
from lightning_lvp.data.llava_dataset import BadSampleError, LlavaDataset, filter_entries, load_entries
from lightning_lvp.data.processors import load_processor
from lightning_lvp.data.qwen_chat import QwenProcessor
from lightning_lvp.data.tokenizer import build_tiny_processor, save_tiny_processor, tiny_spec_overrides

_LIGHTNING = ("LengthGroupedSampler", "LlavaDataModule")


def __getattr__(name: str):
    if name in _LIGHTNING:
        from lightning_lvp.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "VICUNA_V1",
    "BadSampleError",
    "ConversationTemplate",
    "DigitsConfig",
    "LengthGroupedSampler",
    "LlavaCollator",
    "LlavaDataModule",
    "LlavaDataset",
    "QwenProcessor",
    "SkipCountingLoader",
    "answer_accuracy",
    "build_digits_dataset",
    "build_tiny_processor",
    "ensure_digits_dataset",
    "filter_entries",
    "load_entries",
    "load_processor",
    "render_conversation",
    "save_tiny_processor",
    "tiny_spec_overrides",
]
