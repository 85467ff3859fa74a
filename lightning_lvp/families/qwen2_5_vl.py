"""Qwen2.5-VL family: the ONLY module that touches ``Qwen2_5_VLForConditionalGeneration`` internals.

What differs from LLaVA-1.5 (read from transformers 5.24 ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``):

* Images come as FLAT patches ``pixel_values (sum_i t_i h_i w_i, C * T_p * p * p)`` plus
  ``image_grid_thw (n_images, 3)`` (dynamic resolution); the windowed vision encoder and its 2x2
  patch merger turn image i into ``t_i h_i w_i / 4`` LLM tokens (``Qwen2_5_VLProcessor.replace_image_token``).
  Images belong to samples in order: sample b's ``<|image_pad|>`` runs take the next images.
* Rotary positions are 3-D (M-RoPE): ``get_rope_index`` gives every token a (t, h, w) triple; text
  tokens have t = h = w, image tokens t = start, h = start + row, w = start + col, and the text after an
  image continues at ``start + max(rows, cols)``. We keep them as ``(B, T, 3)`` so that
  :meth:`~lightning_lvp.state.SeqState.select` gathers them like any per-token field: a kept vision
  token keeps its ORIGINAL (t, h, w).
* Decoding continues at ``text position + rope_delta`` (``Qwen2_5_VLForConditionalGeneration.
  _prepare_position_ids_for_generation``: ``rope_delta = max position + 1 - prompt length`` of the
  UNPRUNED prompt), the same for all three components. Pruning changes neither, so decode positions
  equal the unpruned model's.
* The vision encoder has no CLS token (CLS-knee and VisionZip refuse it, see :func:`vision_cls_attention`).

The decoder layer (``Qwen2_5_VLDecoderLayer``) has the Llama signature, so the layer loop, the
attention function registered for the text model and the KV cache are the LLaVA ones.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

MODEL_TYPE = "qwen2_5_vl"


# ------------------------------------------------------------------------------------------ configs
def tiny_config(
    num_layers: int = 4,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_layers: int = 2,
    vocab_size: int = 99,
    patch_size: int = 4,
) -> Qwen2_5_VLConfig:
    """A tiny random Qwen2.5-VL: windowed vision encoder (block 0 windowed, block 1 full) + 2x2 merger.

    ``window_size = 4 * patch_size`` makes each window 2 x 2 merged tokens, so images of 32 px and more
    have several windows. Special ids: image 98, video 97, vision start 96, vision end 95, pad 0, eos 2.

    Args:
        num_layers: LLM decoder layers.
        hidden_size: LLM (and merger output) width.
        num_heads: LLM attention heads (head_dim = hidden_size / num_heads = 8: mrope_section [2, 1, 1]).
        num_kv_heads: LLM key/value heads (grouped-query attention when < num_heads).
        vision_layers: vision blocks; the last one attends over the whole image, the others in windows.
        vocab_size: LLM vocabulary.
        patch_size: vision patch side in pixels (one LLM token = 2 x 2 patches).
    """
    head_dim = hidden_size // num_heads
    half = head_dim // 2  # M-RoPE splits the head_dim / 2 frequencies into (t, h, w) sections
    section = [half - 2 * (half // 4), half // 4, half // 4]
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        depth=vision_layers,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        in_channels=3,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=4 * patch_size,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[vision_layers - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=98,
        video_token_id=97,
        vision_start_token_id=96,
        vision_end_token_id=95,
        tie_word_embeddings=False,
    )


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Qwen2_5_VLForConditionalGeneration:
    """Random-weight tiny Qwen2.5-VL (SDPA everywhere, eval mode, deterministic for ``seed``)."""
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype
    )
    return model.eval()


def pixel_row_width(config: Qwen2_5_VLConfig) -> int:
    """Width of one row of ``pixel_values``: C * temporal_patch_size * patch_size^2."""
    vc = config.vision_config
    return vc.in_channels * vc.temporal_patch_size * vc.patch_size**2


# --------------------------------------------------------------------------------- image features
def tokens_per_image(config: Qwen2_5_VLConfig, image_grid_thw: torch.Tensor) -> list[int]:
    """LLM tokens of each image: t * h * w / merge^2 (``Qwen2_5_VLProcessor.replace_image_token``).

    Args:
        image_grid_thw: (n_images, 3) patch grid (t, h, w) of each image.
    """
    merge = config.vision_config.spatial_merge_size
    return (image_grid_thw.prod(-1) // merge**2).tolist()


def patches_per_image(image_grid_thw: torch.Tensor) -> list[int]:
    """Rows of ``pixel_values`` of each image: t * h * w."""
    return image_grid_thw.prod(-1).tolist()


def image_features(
    model: Qwen2_5_VLForConditionalGeneration, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
) -> list[torch.Tensor]:
    """The windowed vision encoder + 2x2 merger, untouched: one (N_i, D) tensor per image.

    Args:
        pixel_values: (sum_i t_i h_i w_i, C * T_p * p * p) flat patches of all images, image by image.
        image_grid_thw: (n_images, 3).
    """
    out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    return list(out.pooler_output)  # a tuple split per image (``get_image_features``)


def images_per_sample(model, input_ids: torch.Tensor, image_grid_thw: torch.Tensor) -> list[list[int]]:
    """Which images (indices into ``image_grid_thw``) each sample's image-token runs take, in order.

    Raises:
        ValueError: naming the sample, if its image-token count does not match its images, or the
            batch has more / fewer images than placeholders.
    """
    counts = tokens_per_image(model.config, image_grid_thw)
    per_sample = (input_ids == model.config.image_token_id).sum(1).tolist()
    result, nxt = [], 0
    for b, want in enumerate(per_sample):
        mine, have = [], 0
        while have < want and nxt < len(counts):
            mine.append(nxt)
            have += counts[nxt]
            nxt += 1
        if have != want:
            raise ValueError(
                f"sample {b} has {want} image tokens ({model.config.image_token_id}) but its images "
                f"{mine} give {have} features (image_grid_thw {image_grid_thw[mine].tolist()})"
            )
        result.append(mine)
    if nxt != len(counts):
        raise ValueError(f"image_grid_thw has {len(counts)} images but the samples' image tokens take only {nxt}")
    return result


def merge_image_features(
    model: Qwen2_5_VLForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Input embeddings with the image features scattered into the image-token positions.

    The embedding step of ``Qwen2_5_VLModel.forward`` with a per-sample check.

    Returns:
        inputs_embeds (B, T, D), vision_mask (B, T) bool, the per-image features.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (n_images, 3), got shape {tuple(image_grid_thw.shape)}")
    rows = sum(patches_per_image(image_grid_thw))
    if pixel_values.dim() != 2 or pixel_values.shape[0] != rows:
        raise ValueError(
            f"pixel_values must be flat patches ({rows}, {pixel_row_width(model.config)}) for image_grid_thw "
            f"{image_grid_thw.tolist()}, got shape {tuple(pixel_values.shape)}"
        )
    images_per_sample(model, input_ids, image_grid_thw)  # raises, naming the sample
    vision_mask = input_ids == model.config.image_token_id
    feats = image_features(model, pixel_values, image_grid_thw)
    embeds = embed_tokens(model, input_ids)
    flat = torch.cat(feats, 0).to(embeds.dtype)
    return embeds.masked_scatter(vision_mask.unsqueeze(-1), flat), vision_mask, feats


# -------------------------------------------------------------------------------------- positions
def rope_positions(
    model: Qwen2_5_VLForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own 3-D M-RoPE positions of the UNPRUNED prompt and its ``rope_deltas``.

    Args:
        input_ids, attention_mask: (B, T); padding (either side) gets position 0.

    Returns:
        position_ids (B, T, 3) (t, h, w) per token, rope_deltas (B, 1): decode token k after a prompt of
        n real tokens sits at n + k + rope_delta in all three components.
    """
    token_type = (input_ids == model.config.image_token_id).int()  # mm_token_type_ids: 1 = image
    pos, deltas = model.model.get_rope_index(input_ids, token_type, image_grid_thw, attention_mask=attention_mask)
    return pos.permute(1, 2, 0).contiguous(), deltas  # (3, B, T) -> (B, T, 3)


def decode_positions(text_positions: torch.Tensor, rope_deltas: torch.Tensor) -> torch.Tensor:
    """(B, 1) 1-D positions ``cumsum(mask) - 1`` of decoded tokens -> (B, 1, 3) M-RoPE positions.

    ``Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation``: ``text + rope_deltas``,
    equal in t, h and w.
    """
    return (text_positions + rope_deltas.to(text_positions.device))[..., None].expand(-1, -1, 3)


def _lm(model: Qwen2_5_VLForConditionalGeneration) -> nn.Module:
    return model.model.language_model


def embed_tokens(model: Qwen2_5_VLForConditionalGeneration, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, D)."""
    return _lm(model).embed_tokens(input_ids)


def decoder_layers(model: Qwen2_5_VLForConditionalGeneration) -> nn.ModuleList:
    return _lm(model).layers


def rotary(model: Qwen2_5_VLForConditionalGeneration, hidden: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin), each (B, L, head_dim), of the ORIGINAL (t, h, w) positions ``position_ids`` (B, L, 3).

    ``Qwen2_5_VLRotaryEmbedding`` takes (3, B, L) and interleaves the t/h/w frequency sections
    (``mrope_section``); the result has Llama's shape, so ``apply_rotary_pos_emb`` is unchanged.
    """
    if position_ids.dim() != 3 or position_ids.shape[-1] != 3:
        raise ValueError(f"Qwen2.5-VL needs (batch, seq_len, 3) M-RoPE positions, got {tuple(position_ids.shape)}")
    return _lm(model).rotary_emb(hidden, position_ids.permute(2, 0, 1))


def run_layer(
    model: Qwen2_5_VLForConditionalGeneration,
    index: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache=None,
    **attention_kwargs,
) -> torch.Tensor:
    """One ``Qwen2_5_VLDecoderLayer`` (as ``Qwen2_5_VLTextModel.forward`` calls it).

    ``position_ids`` is None as in HF's loop for unpacked 3-D positions (only flash-attention reads it).

    Args:
        hidden: (B, L, D); mask: (B, 1, Lq, Lk) bool or None (SDPA's causal path / every key).
        position_embeddings: :func:`rotary` of the slots' original positions.
        attention_kwargs: reach the registered attention function (the masked training path's keep).
    """
    return decoder_layers(model)[index](
        hidden,
        attention_mask=mask,
        position_ids=None,
        cache=cache,
        use_cache=cache is not None,
        position_embeddings=position_embeddings,
        **attention_kwargs,
    )


def final_norm(model: Qwen2_5_VLForConditionalGeneration, hidden: torch.Tensor) -> torch.Tensor:
    return _lm(model).norm(hidden)


def lm_head(model: Qwen2_5_VLForConditionalGeneration) -> nn.Linear:
    return model.lm_head


def attention_probs(
    model: Qwen2_5_VLForConditionalGeneration,
    index: int,
    layer_input: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """(B, H, L) softmax attention of one query per sample in layer ``index`` (FastV), from its input.

    Qwen's q/k projections carry a bias (``Qwen2_5_VLAttention``); the M-RoPE tables are already
    recomposed to Llama's layout by :func:`rotary`.
    """
    attn = decoder_layers(model)[index].self_attn
    b, length, _ = layer_input.shape
    normed = decoder_layers(model)[index].input_layernorm(layer_input)
    rows = torch.arange(b, device=layer_input.device)
    q = attn.q_proj(normed[rows, query_index])[:, None].view(b, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos[rows, query_index][:, None], sin[rows, query_index][:, None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, H, L)
    scores = scores.masked_fill(~mask[rows, 0, query_index][:, None, :], float("-inf"))
    return scores.softmax(-1)


def vision_cls_attention(*_args, **_kwargs):
    """Qwen2.5-VL's vision encoder has no CLS token: CLS-based rankings (CLS-knee, VisionZip) refuse it."""
    raise ValueError(
        "Qwen2.5-VL's vision encoder has no CLS token: CLS-knee / VisionZip (CLS attention or similarity) "
        "cannot run on it; use LVPruning, FastV, random or uniform"
    )


def component_modules(model: Qwen2_5_VLForConditionalGeneration) -> dict[str, nn.Module]:
    """Top-level parts for FLOPs attribution (the merger counts as the projector)."""
    visual = model.model.visual
    return {"vision_tower": visual, "projector": visual.merger, "llm": _lm(model), "lm_head": model.lm_head}
