"""The ONLY module that touches transformers' LLaVA / LLaMA internals.

transformers moves attribute paths and return types between releases (``get_image_features``
returns an output object since v5, ``cache_position`` is gone in v5). Everything the pruned
forward needs from the model goes through the functions here, so a new release means editing one
file; ``tests/test_adapter.py`` pins the behaviour on a tiny model against HF's own forward.
Tested: transformers 5.24 (``TESTED_TRANSFORMERS``, the pin in ``pyproject.toml``). 5.24 renamed the
decoder layers' ``past_key_values`` to ``cache`` (deprecated, removed in 5.40); 5.23 has only
``past_key_values`` and would silently drop ``cache=`` into ``**kwargs``, hence the lower bound.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoConfig, DynamicCache, LlavaConfig, LlavaForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from lightning_lvp.attention import masked_softmax_attention

TESTED_TRANSFORMERS = ("5.24", "5.25")  # [lower, upper) as in pyproject.toml
ATTN_IMPLEMENTATION = "lvp_sdpa"
KEEP_KWARG = "lvp_keep"


def _lvp_attention(module: nn.Module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA everywhere, except eq. 9 masked attention when the training path passes ``lvp_keep``."""
    keep = kwargs.pop(KEEP_KWARG, None)
    if keep is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = masked_softmax_attention(query, key, value, attention_mask, keep, scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, Dh) as transformers expects


def register_attention() -> None:
    """Registers :func:`_lvp_attention` and its mask function with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _lvp_attention)
    # Without a mask function a custom implementation gets attention_mask=None in HF's own forward.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _attn_config() -> dict[str, str]:
    return {"text_config": ATTN_IMPLEMENTATION, "vision_config": "sdpa", "": "sdpa"}


def prepare_frozen(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Freezes every LLaVA parameter, sets eval mode and our attention on the text model only."""
    register_attention()
    model.set_attn_implementation(_attn_config())
    model.requires_grad_(False)
    return model.eval()


def load_llava(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Loads a llava-hf format model (hub id or local folder) with our attention on the LLM.

    Args:
        path: hub id such as ``llava-hf/llava-1.5-7b-hf`` or a folder written by ``save_pretrained``.
        dtype: parameter dtype.
        device: optional device to move the model to.
    """
    register_attention()
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model folder {path!r} has no config.json (expected a save_pretrained folder)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=_attn_config())
    if device is not None:
        model = model.to(device)
    return prepare_frozen(model)


def save_llava(model: LlavaForConditionalGeneration, folder: str, processor_from: str | None = None) -> None:
    """``save_pretrained`` of the weights and config, plus the processor of ``processor_from`` if it has one."""
    from transformers import AutoProcessor

    model.save_pretrained(folder)
    if processor_from and os.path.isdir(processor_from):
        try:
            AutoProcessor.from_pretrained(processor_from).save_pretrained(folder)
        except (OSError, ValueError) as err:  # a bare config folder has no processor: nothing to copy
            raise ValueError(f"cannot copy the processor of {processor_from!r} to {folder!r}: {err}") from err


def load_config(path: str) -> LlavaConfig:
    """The ``LlavaConfig`` of a model folder / hub id, or of a bare ``config.json`` file."""
    if path.endswith(".json"):
        return LlavaConfig.from_json_file(path)
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, LlavaConfig):
        raise ValueError(f"{path!r} is a {type(config).__name__}, expected a LLaVA (LlavaConfig) model")
    return config


def build_from_config(config: LlavaConfig, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """Random-weight LLaVA from a config (on the current default device, e.g. ``meta``)."""
    register_attention()
    return LlavaForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation=_attn_config(), dtype=dtype
    )


@dataclass(frozen=True)
class TextDims:
    """LLM dimensions the pruning code needs (the one place they are read from a config).

    ``num_kv_heads`` is last and optional so that pruner folders saved before it existed
    (``pruners.json`` stores these fields) still load.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_kv_heads: int | None = None


def text_dims(config: LlavaConfig) -> TextDims:
    """:class:`TextDims` of a ``LlavaConfig``."""
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    return TextDims(
        tc.hidden_size,
        tc.num_hidden_layers,
        tc.num_attention_heads,
        head_dim,
        tc.intermediate_size,
        tc.vocab_size,
        kv_heads,
    )


@dataclass(frozen=True)
class VisionDims:
    """Vision-tower dimensions: how many ``<image>`` tokens one image becomes.

    Attributes:
        image_size: input side in pixels.
        patch_size: patch side in pixels.
        patches_per_side: image_size // patch_size.
        num_patches: patches_per_side ** 2.
        tokens_per_image: image tokens in ``input_ids`` per image (CLS dropped for strategy "default").
    """

    image_size: int
    patch_size: int
    patches_per_side: int
    num_patches: int
    tokens_per_image: int


def vision_dims(config: LlavaConfig) -> VisionDims:
    """:class:`VisionDims` of a ``LlavaConfig`` (FACTS: one image token per patch, "full" keeps CLS)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    extra = 1 if config.vision_feature_select_strategy == "full" else 0
    return VisionDims(vc.image_size, vc.patch_size, side, side * side, side * side + extra)


def _config_file(model: LlavaForConditionalGeneration) -> str:
    """Where the model's config came from, for error messages."""
    source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    return f"{source}/config.json" if source else "the model's config.json"


def image_token_id(model: LlavaForConditionalGeneration) -> int:
    """Id of the ``<image>`` placeholder; a clear error naming the config field when it is missing."""
    value = getattr(model.config, "image_token_id", None)
    if value is None:
        raise ValueError(
            f'{_config_file(model)} has no image token id: set "image_token_id" (older files: "image_token_index") '
            "to the tokenizer's id of <image> (llava-hf/llava-1.5-7b-hf: 32000)"
        )
    return int(value)


def pad_token_id(model: LlavaForConditionalGeneration) -> int:
    """Filler id: ``text_config.pad_token_id``, else the top-level ``pad_token_id`` (llava-hf files have both).

    Raises:
        ValueError: neither is set (transformers 5 then raised ``'LlavaConfig' object has no attribute
            'pad_token_id'``); the message names the field to set.
    """
    for value in (getattr(model.config.text_config, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return int(value)
    raise ValueError(
        f'{_config_file(model)} has no pad token id: set "pad_token_id" in its "text_config" to the tokenizer\'s '
        "pad_token_id (llava-hf/llava-1.5-7b-hf: 32001), or pass pad_token_id=... to generate()"
    )


def eos_token_id(model: LlavaForConditionalGeneration) -> int:
    """Stop id: ``text_config.eos_token_id`` (the first of a list).

    Raises:
        ValueError: not set (generation would silently run to max_new_tokens); the message names the field.
    """
    eid = getattr(model.config.text_config, "eos_token_id", None)
    if isinstance(eid, list):
        eid = eid[0] if eid else None
    if eid is None:
        raise ValueError(
            f'{_config_file(model)} has no end-of-sequence id: set "eos_token_id" in its "text_config" to the '
            "tokenizer's eos_token_id (llava-hf/llava-1.5-7b-hf: 2), or pass eos_token_id=-1 to generate() to never stop"
        )
    return int(eid)


def _lm(model: LlavaForConditionalGeneration):
    return model.model.language_model


def decoder_layers(model: LlavaForConditionalGeneration) -> nn.ModuleList:
    return _lm(model).layers


def embed_tokens(model: LlavaForConditionalGeneration, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, D) input embeddings."""
    return _lm(model).embed_tokens(input_ids)


@dataclass
class ImageFeatures:
    """Projected image features and the vision tower's selected-layer hidden states.

    Attributes:
        embeds: (B, N, D) projected features, one image per sample.
        vision_hidden: (B, 1 + N, Dv) hidden states of the selected CLIP layer, CLS first.
        vision_input: (B, 1 + N, Dv) hidden states that entered the selected layer (for
            :func:`vision_cls_attention`), or None.
    """

    embeds: torch.Tensor
    vision_hidden: torch.Tensor
    vision_input: torch.Tensor | None = None


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> ImageFeatures:
    """Runs the vision tower + projector as LLaVA does (feature layer, CLS dropped for "default")."""
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise NotImplementedError("lists of vision_feature_layer are not supported")
    captured: dict[str, torch.Tensor] = {}
    selected = _vision_layer_number(model)
    hook = None
    if selected >= 1:  # transformers 5.24 keeps only the selected hidden state: catch the layer's input
        layer = _vision_layers(model)[selected - 1]

        def catch(_module, args):  # returns None: the layer's input is not changed
            captured["input"] = args[0]

        hook = layer.register_forward_pre_hook(catch)
    try:
        out = model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
    finally:
        if hook is not None:
            hook.remove()
    embeds = torch.stack(list(out.pooler_output))  # (B, N, D): pooler_output is a list per image in v5
    return ImageFeatures(
        embeds=embeds, vision_hidden=out.hidden_states[cfg.vision_feature_layer], vision_input=captured.get("input")
    )


def _vision_layers(model: LlavaForConditionalGeneration) -> nn.ModuleList:
    """The CLIP encoder layers (transformers 5: the tower is the ``CLIPVisionTransformer`` itself)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def _vision_layer_number(model: LlavaForConditionalGeneration) -> int:
    """1-based number of the CLIP layer whose output LLaVA reads (0 = the embeddings)."""
    n = model.config.vision_config.num_hidden_layers
    return int(model.config.vision_feature_layer) % (n + 1)  # hidden_states has n + 1 entries


def vision_cls_attention(
    model: LlavaForConditionalGeneration, layer_input: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS query's attention and the keys of the vision tower's selected layer (VisionZip).

    Recomputed from the layer's input (one query row; the tower itself runs SDPA and returns no
    attention map). Keys are ``k_proj`` of the layer-normed input, averaged over heads (VisionZip's
    similarity metric).

    Args:
        layer_input: (B, 1 + N, Dv) :attr:`ImageFeatures.vision_input`.

    Returns:
        cls_attention (B, Hv, 1 + N) softmax probabilities of the CLS query, keys (B, 1 + N, Dh).
    """
    number = _vision_layer_number(model)
    if number < 1 or layer_input is None:
        raise ValueError(
            f"vision_feature_layer {model.config.vision_feature_layer} reads the patch embeddings: "
            "that layer has no attention to rank tokens with"
        )
    layer = _vision_layers(model)[number - 1]
    attn = layer.self_attn
    b, t, _ = layer_input.shape
    normed = layer.layer_norm1(layer_input)
    keys = attn.k_proj(normed).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, Hv, T, Dh)
    query = attn.q_proj(normed[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = ((query @ keys.transpose(-1, -2)) * attn.scale).squeeze(2).softmax(-1)  # (B, Hv, T)
    return probs, keys.mean(1)


def project_vision(model: LlavaForConditionalGeneration, vision_states: torch.Tensor) -> torch.Tensor:
    """The multimodal projector on (B, M, Dv) vision-tower states -> (B, M, D) LLM embeddings."""
    return model.model.multi_modal_projector(vision_states)


def merge_image_features(
    model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, ImageFeatures]:
    """Input embeddings with the image features scattered into the ``<image>`` positions.

    Equivalent to the embedding step of ``LlavaModel.forward`` (FACTS: reproduces it exactly) but
    with a per-sample check and without ``.item()`` (so it also runs on the ``meta`` device).

    Args:
        input_ids: (B, T) with one image token per patch in every sample.
        pixel_values: (B, C, H, W), one image per sample.

    Returns:
        inputs_embeds (B, T, D), vision_mask (B, T) bool, the :class:`ImageFeatures`.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if pixel_values.dim() != 4 or pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"pixel_values must be (batch, channels, height, width) with batch {input_ids.shape[0]}, "
            f"got shape {tuple(pixel_values.shape)}"
        )
    vision_mask = input_ids == image_token_id(model)
    feats = image_features(model, pixel_values)
    if input_ids.device.type != "meta":
        counts = vision_mask.sum(1).tolist()
        n = feats.embeds.shape[1]
        for i, c in enumerate(counts):
            if c == 0:
                raise ValueError(f"sample {i} has no image token ({image_token_id(model)}) in input_ids")
            if c != n:
                raise ValueError(f"sample {i} has {c} image tokens but its image gives {n} features")
    embeds = embed_tokens(model, input_ids)
    feats_flat = feats.embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1])
    embeds = embeds.masked_scatter(vision_mask.unsqueeze(-1), feats_flat)
    return embeds, vision_mask, feats


def rotary(model: LlavaForConditionalGeneration, hidden: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) rotary embeddings for ``position_ids`` (B, L) -- computed from ORIGINAL positions."""
    return _lm(model).rotary_emb(hidden, position_ids=position_ids)


def run_layer(
    model: LlavaForConditionalGeneration,
    index: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: DynamicCache | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder layer (matches ``LlamaModel``'s loop exactly when ``keep`` is None).

    Args:
        index: 0-based layer index.
        hidden: (B, L, D).
        mask: (B, 1, Lq, Lk) bool, True = may attend; None (inference only, ``keep`` None) = every key
            is real: SDPA's causal path when Lq = Lk (prefill), every key when Lq = 1 (decode step).
        position_ids: (B, L) original positions.
        position_embeddings: (cos, sin) for those positions.
        cache: KV cache updated in place (inference), or None.
        keep: (B, L) eq. 7 decisions for the masked training path, or None.
    """
    kwargs = {KEEP_KWARG: keep} if keep is not None else {}
    return decoder_layers(model)[index](
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,  # transformers >= 5.24 (``past_key_values`` is deprecated there)
        use_cache=cache is not None,
        position_embeddings=position_embeddings,
        **kwargs,
    )


def final_norm(model: LlavaForConditionalGeneration, hidden: torch.Tensor) -> torch.Tensor:
    return _lm(model).norm(hidden)


def lm_head(model: LlavaForConditionalGeneration) -> nn.Linear:
    return model.lm_head


def new_cache(model: LlavaForConditionalGeneration) -> DynamicCache:
    """An empty dynamic KV cache; its layers may hold different lengths (pruned stages)."""
    return DynamicCache(config=model.config)


def cache_lengths(cache: DynamicCache) -> list[int]:
    """Cached sequence length of every layer."""
    return [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by the keys and values of every layer."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def attention_probs(
    model: LlavaForConditionalGeneration,
    index: int,
    layer_input: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of ONE query per sample in layer ``index`` (FastV), recomputed from its input.

    Args:
        layer_input: (B, L, D) hidden states that entered the layer.
        position_embeddings: (cos, sin), each (B, L, Dh).
        query_index: (B,) position (in the current sequence) of the query token.
        mask: (B, 1, L, L) bool mask the layer used.

    Returns:
        (B, H, L) attention probabilities of that query over all keys.
    """
    layer = decoder_layers(model)[index]
    attn = layer.self_attn
    b, length, _ = layer_input.shape
    normed = layer.input_layernorm(layer_input)
    rows = torch.arange(b, device=layer_input.device)
    q = attn.q_proj(normed[rows, query_index])[:, None].view(b, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos[rows, query_index][:, None], sin[rows, query_index][:, None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, H, L)
    allowed = mask[rows, 0, query_index]  # (B, L)
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return scores.softmax(-1)


def layer_keys(
    model: LlavaForConditionalGeneration,
    index: int,
    layer_input: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Rotary keys of layer ``index`` recomputed from its input, one per query head (DART).

    Args:
        layer_input: (B, L, D) hidden states that entered the layer.
        position_embeddings: (cos, sin), each (B, L, Dh).

    Returns:
        (B, L, H * Dh): the heads' keys side by side (grouped-query keys repeated per head).
    """
    layer = decoder_layers(model)[index]
    attn = layer.self_attn
    b, length, _ = layer_input.shape
    k = attn.k_proj(layer.input_layernorm(layer_input)).view(b, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return repeat_kv(k, attn.num_key_value_groups).transpose(1, 2).reshape(b, length, -1)


def vision_patch_size(model: LlavaForConditionalGeneration) -> int:
    return int(model.config.vision_config.patch_size)


def component_modules(model: LlavaForConditionalGeneration) -> dict[str, nn.Module]:
    """Top-level parts for FLOPs attribution."""
    return {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "llm": _lm(model),
        "lm_head": model.lm_head,
    }


def set_gradient_checkpointing_fn() -> Callable:
    """The checkpoint function used around decoder layers (non-reentrant: gradients reach the masks)."""
    from torch.utils.checkpoint import checkpoint

    return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)


def transformers_version() -> str:
    return transformers.__version__
