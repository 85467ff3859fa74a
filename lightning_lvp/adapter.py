"""Compatibility shim: the pre-#14 adapter functions, now served by the model families.

Everything that touches transformers' internals lives in :mod:`lightning_lvp.families` (one
:class:`~lightning_lvp.families.base.VLMFamily` per model family, docs/FAMILIES.md). The functions
here keep their old signatures and dispatch on the model's (or config's) family, so old callers work
for every supported family; new code calls ``family_for(model).<method>(model, ...)`` directly.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lvp import families
from lightning_lvp.attention import masked_softmax_attention  # noqa: F401  (old import path)
from lightning_lvp.families import family_for
from lightning_lvp.families.base import (  # noqa: F401  (re-exported: the old import paths)
    ATTN_IMPLEMENTATION,
    KEEP_KWARG,
    TESTED_TRANSFORMERS,
    ImageFeatures,
    TextDims,
    VisionDims,
    _lvp_attention,
    attn_config,
    cache_bytes,
    cache_lengths,
    config_file,
    register_attention,
    set_gradient_checkpointing_fn,
    transformers_version,
)
from lightning_lvp.families.llava import cls_attention_from_input, vision_layer_number, vision_layers

_attn_config = attn_config
_config_file = config_file
_vision_layers = vision_layers
_vision_layer_number = vision_layer_number
load_config = families.load_config
build_from_config = families.build_from_config


def load_llava(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Loads a model of any supported family (llava-hf format folder or hub id), frozen, our attention on the LLM."""
    return families.load_model(path, dtype=dtype, device=device)


def save_llava(model: nn.Module, folder: str, processor_from: str | None = None) -> None:
    """``save_pretrained`` of the weights and config, plus the processor of ``processor_from`` if it has one."""
    from lightning_lvp.families.llava import LlavaFamily

    LlavaFamily.save(family_for(model), model, folder, processor_from)


def prepare_frozen(model: nn.Module) -> nn.Module:
    return family_for(model).prepare_frozen(model)


def text_dims(config) -> TextDims:
    return family_for(config).text_dims(config)


def vision_dims(config) -> VisionDims:
    return family_for(config).vision_dims(config)


def image_token_id(model: nn.Module) -> int:
    return family_for(model).image_token_id(model)


def pad_token_id(model: nn.Module) -> int:
    return family_for(model).pad_token_id(model)


def eos_token_id(model: nn.Module) -> int:
    return family_for(model).eos_token_id(model)


def _lm(model: nn.Module) -> nn.Module:
    return family_for(model).language_model(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return family_for(model).decoder_layers(model)


def embed_tokens(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return family_for(model).embed_tokens(model, input_ids)


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> ImageFeatures:
    """LLaVA-1.5's vision tower + projector (see :meth:`LlavaFamily.image_features`)."""
    return family_for(model).image_features(model, pixel_values)


def vision_cls_attention(model: nn.Module, layer_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-1.5's CLS attention of the selected CLIP layer from its input (VisionZip)."""
    return cls_attention_from_input(model, layer_input)


def project_vision(model: nn.Module, vision_states: torch.Tensor) -> torch.Tensor:
    return family_for(model).project_vision(model, vision_states)


def merge_image_features(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, **image_inputs):
    """(inputs_embeds (B, T, D), vision_mask (B, T), :class:`ImageFeatures`) of the model's family."""
    merged = family_for(model).merge(model, input_ids, pixel_values, **image_inputs)
    return merged.embeds, merged.vision, merged.features


def rotary(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    return family_for(model).rotary(model, hidden, position_ids)


def run_layer(model: nn.Module, index: int, hidden, mask, position_ids, position_embeddings, cache=None, keep=None):
    return family_for(model).run_layer(model, index, hidden, mask, position_ids, position_embeddings, cache, keep)


def final_norm(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return family_for(model).final_norm(model, hidden)


def lm_head(model: nn.Module) -> nn.Linear:
    return family_for(model).lm_head(model)


def new_cache(model: nn.Module):
    return family_for(model).new_cache(model)


def attention_probs(model: nn.Module, index: int, layer_input, position_embeddings, query_index, mask):
    return family_for(model).attention_probs(model, index, layer_input, position_embeddings, query_index, mask)


def layer_keys(model: nn.Module, index: int, layer_input, position_embeddings):
    return family_for(model).layer_keys(model, index, layer_input, position_embeddings)


def vision_patch_size(model: nn.Module) -> int:
    return family_for(model).vision_patch_size(model)


def component_modules(model: nn.Module) -> dict[str, nn.Module]:
    return family_for(model).component_modules(model)
