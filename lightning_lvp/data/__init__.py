"""LLaVA-format data: conversation template, datasets, batching, the embedded digits set and a demo tokenizer."""

from lightning_lvp.data.collate import LlavaCollator, SkipCountingLoader, answer_accuracy
from lightning_lvp.data.conversation import IGNORE_INDEX, VICUNA_V1, ConversationTemplate, render_conversation
from lightning_lvp.data.datamodule import LengthGroupedSampler, LlavaDataModule
from lightning_lvp.data.digits import DigitsConfig, build_digits_dataset, ensure_digits_dataset
from lightning_lvp.data.llava_dataset import BadSampleError, LlavaDataset, filter_entries, load_entries
from lightning_lvp.data.tokenizer import build_tiny_processor, save_tiny_processor, tiny_spec_overrides

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
    "SkipCountingLoader",
    "answer_accuracy",
    "build_digits_dataset",
    "build_tiny_processor",
    "ensure_digits_dataset",
    "filter_entries",
    "load_entries",
    "render_conversation",
    "save_tiny_processor",
    "tiny_spec_overrides",
]
