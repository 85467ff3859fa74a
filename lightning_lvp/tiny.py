"""Tiny random-weight LLaVA configurations for tests, the CPU demo and benchmarks.

Shapes follow transformers' ``LlavaVisionText2TextModelTester.get_config()`` spirit: a CLIP vision
tower, a 2-layer GELU projector and a Llama LLM, all small enough to run on 2 CPU cores.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)


@dataclass
class TinyLlavaSpec:
    """Dimensions of a tiny LLaVA.

    Args:
        vocab_size: LLM vocabulary size (the image token is ``image_token_id``).
        hidden_size: LLM hidden size d.
        intermediate_size: LLM MLP width m.
        num_layers: number of LLM decoder layers.
        num_heads: LLM attention heads.
        num_kv_heads: LLM key/value heads (< num_heads gives grouped-query attention).
        vision_hidden_size: CLIP hidden size.
        vision_intermediate_size: CLIP MLP width.
        vision_layers: CLIP layers.
        vision_heads: CLIP heads.
        image_size: input image side in pixels.
        patch_size: CLIP patch side; (image_size / patch_size)^2 vision tokens per image.
        num_channels: image channels.
        image_token_id: id of the ``<image>`` placeholder token.
        pad_token_id: id of the padding token.
        vision_feature_layer: CLIP layer whose output feeds the projector (-2 in LLaVA-1.5; -1 for
            towers of 1-2 layers, otherwise the last layer is unused).
        max_position_embeddings: LLM context length.
    """

    vocab_size: int = 99
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 16
    patch_size: int = 4
    num_channels: int = 3
    image_token_id: int = 98
    pad_token_id: int = 0
    vision_feature_layer: int = -1
    max_position_embeddings: int = 512

    @property
    def num_image_tokens(self) -> int:
        """Vision tokens per image (CLS dropped, strategy "default")."""
        return (self.image_size // self.patch_size) ** 2


def tiny_llava_config(spec: TinyLlavaSpec | None = None, **overrides) -> LlavaConfig:
    """Builds a ``LlavaConfig`` from a :class:`TinyLlavaSpec` (fields may be overridden by keyword)."""
    spec = TinyLlavaSpec(**{**asdict(spec or TinyLlavaSpec()), **overrides})
    text = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=spec.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=spec.num_channels,
        projection_dim=spec.vision_hidden_size,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=spec.image_token_id,
        image_seq_length=spec.num_image_tokens,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=spec.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llava(
    spec: TinyLlavaSpec | None = None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> LlavaForConditionalGeneration:
    """A random-weight tiny LLaVA in eval mode (deterministic for ``seed``)."""
    config = tiny_llava_config(spec, **overrides)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def tiny_llava_next_config(
    spec: TinyLlavaSpec | None = None,
    grid_pinpoints: list[list[int]] | None = None,
    **overrides,
) -> LlavaNextConfig:
    """A ``LlavaNextConfig`` with the tower / LLM of :func:`tiny_llava_config` and small anyres pinpoints.

    Args:
        spec: dimensions (``image_size`` is one view's side).
        grid_pinpoints: (height, width) resolutions of the crop grid; default 1x2, 2x1 and 2x2 views.
    """
    base = tiny_llava_config(spec, **overrides)
    side = base.vision_config.image_size
    pinpoints = grid_pinpoints or [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    return LlavaNextConfig(
        text_config=base.text_config.to_dict(),
        vision_config=base.vision_config.to_dict(),
        image_token_index=base.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=base.vision_feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=base.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llava_next(
    spec: TinyLlavaSpec | None = None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> LlavaNextForConditionalGeneration:
    """A random-weight tiny LLaVA-NeXT in eval mode (deterministic for ``seed``)."""
    config = tiny_llava_next_config(spec, **overrides)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype
    )
    return model.eval()
