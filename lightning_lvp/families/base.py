"""The model-family protocol: everything the pruned forward needs from a transformers VLM.

transformers moves attribute paths and return types between releases (``get_image_features``
returns an output object since v5, ``cache_position`` is gone in v5, 5.24 renamed the decoder
layers' ``past_key_values`` to ``cache``). Every access to a model's internals goes through a
:class:`VLMFamily` object; :func:`lightning_lvp.families.family_for` picks it from the model's
config. A family object is stateless: every method takes the HF model as its first argument (the
same call shape as the old ``lightning_lvp.adapter`` functions). The protocol is described in
docs/FAMILIES.md.

The defaults here are those of a decoder-only HF text model reached at ``model.model.language_model``
with ``layers`` / ``rotary_emb`` / ``norm`` / ``embed_tokens`` and Llama-style attention (LLaVA-1.5 and
LLaVA-NeXT use them unchanged); a family overrides what differs (image features, positions, rotary).
Tested: transformers 5.24 (``TESTED_TRANSFORMERS``, the pin in ``pyproject.toml``); 5.23 has only
``past_key_values`` and would silently drop ``cache=`` into ``**kwargs``, hence the lower bound.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from lightning_lvp.attention import masked_softmax_attention
from lightning_lvp.state import positions_from_mask

TESTED_TRANSFORMERS = ("5.24", "5.25")  # [lower, upper) as in pyproject.toml
ATTN_IMPLEMENTATION = "lvp_sdpa"
KEEP_KWARG = "lvp_keep"


# ------------------------------------------------------------------------------ attention registry
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


def attn_config() -> dict[str, str]:
    """Our attention on the text model only (FACTS: extra kwargs reach the text model's attention)."""
    return {"text_config": ATTN_IMPLEMENTATION, "vision_config": "sdpa", "": "sdpa"}


def transformers_version() -> str:
    return transformers.__version__


# ------------------------------------------------------------------------------------- dimensions
class UnsupportedMethodError(ValueError, NotImplementedError):
    """A pruning method needs something this family's model does not have (e.g. a CLS token for CLS-knee and
    VisionZip on Qwen2.5-VL); the message says what. Commands that run several methods (``compare``) skip the
    method's rows on that family, naming the reason; everything else fails."""


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


@dataclass(frozen=True)
class VisionDims:
    """Vision-tower dimensions: how many ``<image>`` tokens one image becomes.

    Attributes:
        image_size: input side in pixels (of one crop for anyres families).
        patch_size: patch side in pixels.
        patches_per_side: image_size // patch_size.
        num_patches: patches_per_side ** 2.
        tokens_per_image: image tokens in ``input_ids`` per image (CLS dropped for strategy "default");
            for families with a variable count (LLaVA-NeXT) the count of the base image alone.
    """

    image_size: int
    patch_size: int
    patches_per_side: int
    num_patches: int
    tokens_per_image: int


# ------------------------------------------------------------------------------ what merge returns
@dataclass
class ImageFeatures:
    """Projected image features and the vision tower's selected-layer hidden states.

    Attributes:
        embeds: (B, N, D) projected features (one image per sample; N = the longest sample, rows of
            shorter samples zero-padded at the end), or the list of per-sample (N_b, D) tensors.
        vision_hidden: (B, 1 + N, Dv) hidden states of the selected vision layer: a CLS state first,
            then one state per vision token in patch order (``SeqState.patch_index``).
        vision_input: (B, 1 + N, Dv) hidden states that entered the selected layer (LLaVA-1.5's
            :meth:`VLMFamily.vision_cls_attention`), or None.
        token_cls: (B, N, Dv) the CLS state each vision token is compared with (the CLS of its own
            crop for LLaVA-NeXT), or None = column 0 of ``vision_hidden`` for every token.
    """

    embeds: torch.Tensor | list[torch.Tensor]
    vision_hidden: torch.Tensor
    vision_input: torch.Tensor | None = None
    token_cls: torch.Tensor | None = None


@dataclass
class MergedInputs:
    """The LLM input of a batch: embeddings with the image features merged in, and the token roles.

    Attributes:
        embeds: (B, T, D) input embeddings.
        vision: (B, T) bool, the prunable vision tokens (ratios are fractions of their count per sample).
        structure: (B, T) bool, image-placeholder tokens that are NOT prunable (LLaVA-NeXT's
            ``image_newline`` under the "keep" policy): always kept, never pruner keys.
        features: the :class:`ImageFeatures`, patch order = the order of ``vision`` in each row.
        position_ids: the family's own initial positions, (B, T) or (B, T, C) with tokens on dim 1;
            None = ``cumsum(attention_mask) - 1``.
        decode_state: what the family needs to continue positions when decoding (e.g. rope deltas).
    """

    embeds: torch.Tensor
    vision: torch.Tensor
    structure: torch.Tensor
    features: ImageFeatures
    position_ids: torch.Tensor | None = None
    decode_state: dict[str, Any] = field(default_factory=dict)


def config_file(model_or_config) -> str:
    """Where a model's config came from, for error messages."""
    config = getattr(model_or_config, "config", model_or_config)
    source = getattr(config, "_name_or_path", "") or getattr(model_or_config, "name_or_path", "")
    return f"{source}/config.json" if source else "the model's config.json"


def check_image_tokens(counts: list[int], features: list[int], image_token: int) -> None:
    """An error naming the first sample whose placeholder count differs from its image's features."""
    if len(counts) != len(features):
        raise ValueError(f"{len(counts)} samples but {len(features)} images: one image per sample is supported")
    for i, (c, n) in enumerate(zip(counts, features)):
        if c == 0:
            raise ValueError(f"sample {i} has no image token ({image_token}) in input_ids")
        if c != n:
            raise ValueError(f"sample {i} has {c} image tokens but its image gives {n} features")


# --------------------------------------------------------------------------------------- protocol
class VLMFamily:
    """One model family behind the small protocol the pruned model uses (docs/FAMILIES.md).

    Subclasses set ``name``, ``model_types``, ``model_class`` and implement :meth:`merge` (and
    :meth:`vision_dims`); the text-model parts below are HF's decoder-only defaults.

    Attributes:
        name: family name used in messages and ``pruners.json`` (``"llava"``).
        model_types: ``config.model_type`` values this family serves.
        architectures: HF class names (messages only).
        image_input_names: extra image inputs the family's :meth:`merge` reads besides
            ``pixel_values`` (``("image_sizes",)`` for LLaVA-NeXT), passed through every forward.
        structure_policies: allowed values of ``PrunedVLM(structure=...)`` ("keep" always).
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()
    # what the FLOPs table's vision_tower column counts (printed with the FLOP convention)
    vision_tower_flops: ClassVar[str] = "the vision encoder as transformers runs it"
    image_input_names: ClassVar[tuple[str, ...]] = ()
    structure_policies: ClassVar[tuple[str, ...]] = ("keep",)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ------------------------------------------------------------------------- build / load
    @property
    def model_class(self) -> type:
        raise NotImplementedError

    def config_class(self) -> type:
        return self.model_class.config_class

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """Freezes every parameter, sets eval mode and our attention on the text model only."""
        register_attention()
        model.set_attn_implementation(attn_config())
        model.requires_grad_(False)
        return model.eval()

    def load(self, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        """Loads a model folder / hub id with our attention on the LLM, frozen, in eval mode."""
        register_attention()
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model folder {path!r} has no config.json (expected a save_pretrained folder)")
        model = self.model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_config())
        if device is not None:
            model = model.to(device)
        return self.prepare_frozen(model)

    def build_from_config(self, config, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Random-weight model from a config (on the current default device, e.g. ``meta``)."""
        register_attention()
        return self.model_class._from_config(copy.deepcopy(config), attn_implementation=attn_config(), dtype=dtype)

    def load_config(self, path: str):
        """The config of a model folder / hub id, or of a bare ``config.json`` file."""
        if path.endswith(".json"):
            return self.config_class().from_json_file(path)
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in self.model_types:
            raise ValueError(
                f"{path!r} is a {type(config).__name__}, expected a {self.name} ({self.config_class().__name__}) model"
            )
        return config

    # ----------------------------------------------------------------------------- dims / ids
    def text_config(self, config):
        return config.text_config

    def text_dims(self, config) -> TextDims:
        """:class:`TextDims` of the model's text config."""
        tc = self.text_config(config)
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

    def vision_dims(self, config) -> VisionDims:
        raise NotImplementedError

    def image_token_id(self, model: nn.Module) -> int:
        """Id of the ``<image>`` placeholder; a clear error naming the config field when it is missing."""
        value = getattr(model.config, "image_token_id", None)
        if value is None:
            raise ValueError(
                f'{config_file(model)} has no image token id: set "image_token_id" (older files: "image_token_index") '
                "to the tokenizer's id of <image> (llava-hf/llava-1.5-7b-hf: 32000)"
            )
        return int(value)

    def pad_token_id(self, model: nn.Module) -> int:
        """Filler id: ``text_config.pad_token_id``, else the top-level ``pad_token_id`` (llava-hf files have both).

        Raises:
            ValueError: neither is set; the message names the field to set.
        """
        for value in (
            getattr(self.text_config(model.config), "pad_token_id", None),
            getattr(model.config, "pad_token_id", None),
        ):
            if value is not None:
                return int(value)
        raise ValueError(
            f'{config_file(model)} has no pad token id: set "pad_token_id" in its "text_config" to the tokenizer\'s '
            "pad_token_id (llava-hf/llava-1.5-7b-hf: 32001), or pass pad_token_id=... to generate()"
        )

    def eos_token_id(self, model: nn.Module) -> int:
        """Stop id: ``text_config.eos_token_id`` (the first of a list).

        Raises:
            ValueError: not set (generation would silently run to max_new_tokens); the message names the field.
        """
        eid = getattr(self.text_config(model.config), "eos_token_id", None)
        if isinstance(eid, list):
            eid = eid[0] if eid else None
        if eid is None:
            raise ValueError(
                f'{config_file(model)} has no end-of-sequence id: set "eos_token_id" in its "text_config" to the '
                "tokenizer's eos_token_id (llava-hf/llava-1.5-7b-hf: 2), or pass eos_token_id=-1 to generate() to never "
                "stop"
            )
        return int(eid)

    # ---------------------------------------------------------------------------- image side
    def check_image_inputs(self, image_inputs: dict[str, Any]) -> None:
        """An error for image inputs this family does not read (a typo would otherwise be ignored)."""
        unknown = sorted(k for k, v in image_inputs.items() if v is not None and k not in self.image_input_names)
        if unknown:
            allowed = ", ".join(self.image_input_names) or "none"
            raise ValueError(f"{self.name} models take no image input {unknown} (their extra image inputs: {allowed})")

    def merge(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        structure: str = "keep",
        **image_inputs,
    ) -> MergedInputs:
        """Input embeddings with the image features in the placeholder positions, and the token roles.

        Args:
            input_ids: (B, T), one image per sample, its placeholders already expanded.
            pixel_values: the family's image tensor (LLaVA: (B, C, H, W)).
            structure: policy for structure tokens among the placeholders ("keep" or "prune").
            **image_inputs: the family's extra image inputs (``image_input_names``).
        """
        raise NotImplementedError

    def expand_image_inputs(self, model: nn.Module, input_ids: torch.Tensor, images: dict, expand_size: int) -> dict:
        """Image inputs for ``expand_size`` copies of every row (beams, ``num_return_sequences``).

        Default: batch-first tensors (``pixel_values``, ``image_sizes``) repeated row by row, as HF does.
        """
        return {k: v.repeat_interleave(expand_size, dim=0) if torch.is_tensor(v) else v for k, v in images.items()}

    def sample_image_inputs(self, model: nn.Module, input_ids: torch.Tensor, images: dict, index: int) -> dict:
        """The image inputs of row ``index`` of a batch alone (FLOPs per sample: ``compare``).

        Default: batch-first tensors (``pixel_values``, ``image_sizes``), row ``index``.
        """
        return {k: v[index : index + 1] if torch.is_tensor(v) else v for k, v in images.items()}

    def vision_cls_attention(self, model: nn.Module, features: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls_attention (B, Hv, 1 + N), keys (B, 1 + N, Dh)) of the selected vision layer (VisionZip)."""
        raise UnsupportedMethodError(f"the {self.name} family has no CLS attention for VisionZip")

    def patch_cls_similarity(self, features: ImageFeatures) -> torch.Tensor:
        """(B, N) cosine similarity of every vision token's state to its CLS state (CLS-knee stage 1)."""
        v = features.vision_hidden.float()
        cls = v[:, :1] if features.token_cls is None else features.token_cls.float()
        return F.cosine_similarity(v[:, 1:], cls, dim=-1)

    def project_vision(self, model: nn.Module, vision_states: torch.Tensor) -> torch.Tensor:
        """The multimodal projector on (B, M, Dv) vision-tower states -> (B, M, D) LLM embeddings."""
        return model.model.multi_modal_projector(vision_states)

    def vision_patch_size(self, model: nn.Module) -> int:
        return int(model.config.vision_config.patch_size)

    # ----------------------------------------------------------------------------- text side
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def embed_tokens(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) input embeddings."""
        return self.language_model(model).embed_tokens(input_ids)

    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) rotary embeddings for ``position_ids`` (B, L) -- computed from ORIGINAL positions."""
        return self.language_model(model).rotary_emb(hidden, position_ids=position_ids)

    def position_ids(self, model: nn.Module, input_ids, attention_mask: torch.Tensor, merged: MergedInputs):
        """Original rotary positions of the input, tokens on dim 1: ``merged.position_ids``, else ``cumsum(mask) - 1``.

        Families whose positions depend on the padding override it (Qwen2.5-VL's M-RoPE, which also
        records its decode state in ``merged.decode_state``).
        """
        if merged.position_ids is not None:
            return merged.position_ids
        return positions_from_mask(attention_mask)

    def decode_position_ids(self, model: nn.Module, position_ids: torch.Tensor, decode_state: dict) -> torch.Tensor:
        """Positions of decoded tokens from generate()'s ``cumsum(mask) - 1`` (B, 1): unchanged for 1-D RoPE."""
        return position_ids

    def run_layer(
        self,
        model: nn.Module,
        index: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: DynamicCache | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoder layer (matches the HF text model's loop exactly when ``keep`` is None).

        Args:
            index: 0-based layer index.
            hidden: (B, L, D).
            mask: (B, 1, Lq, Lk) bool, True = may attend; None (inference only, ``keep`` None) = every key
                is real: SDPA's causal path when Lq = Lk (prefill), every key when Lq = 1 (decode step).
            position_ids: original positions, tokens on dim 1.
            position_embeddings: (cos, sin) for those positions (:meth:`rotary`).
            cache: KV cache updated in place (inference), or None.
            keep: (B, L) eq. 7 decisions for the masked training path, or None.
        """
        kwargs = {KEEP_KWARG: keep} if keep is not None else {}
        return self.decoder_layers(model)[index](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,  # transformers >= 5.24 (``past_key_values`` is deprecated there)
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
            **kwargs,
        )

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model(model).norm(hidden)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def new_cache(self, model: nn.Module) -> DynamicCache:
        """An empty dynamic KV cache; its layers may hold different lengths (pruned stages)."""
        return DynamicCache(config=model.config)

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """RoPE on (B, H, L, Dh) queries/keys with (B, L, Dh) cos/sin (Qwen's M-RoPE overrides)."""
        return apply_rotary_pos_emb(q, k, cos, sin)

    def rotary_rows(self, position_embeddings, rows: torch.Tensor, index: torch.Tensor):
        """(cos, sin) of one slot per sample: ``index`` (B,) -> each (B, 1, Dh)."""
        cos, sin = position_embeddings
        return cos[rows, index][:, None], sin[rows, index][:, None]

    def attention_probs(
        self,
        model: nn.Module,
        index: int,
        layer_input: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_index: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Softmax attention of ONE query per sample in layer ``index`` (FastV), recomputed from its input.

        Args:
            layer_input: (B, L, D) hidden states that entered the layer.
            position_embeddings: (cos, sin) of the layer.
            query_index: (B,) position (in the current sequence) of the query token.
            mask: (B, 1, L, L) bool mask the layer used.

        Returns:
            (B, H, L) attention probabilities of that query over all keys.
        """
        layer = self.decoder_layers(model)[index]
        attn = layer.self_attn
        b, length, _ = layer_input.shape
        normed = layer.input_layernorm(layer_input)
        rows = torch.arange(b, device=layer_input.device)
        q = attn.q_proj(normed[rows, query_index])[:, None].view(b, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)
        q, _ = self.apply_rotary(q, q, *self.rotary_rows(position_embeddings, rows, query_index))
        _, k = self.apply_rotary(k, k, *position_embeddings)
        k = repeat_kv(k, attn.num_key_value_groups)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, H, L)
        allowed = mask[rows, 0, query_index]  # (B, L)
        scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
        return scores.softmax(-1)

    def layer_keys(
        self,
        model: nn.Module,
        index: int,
        layer_input: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Rotary keys of layer ``index`` recomputed from its input, one per query head (DART).

        Returns:
            (B, L, H * Dh): the heads' keys side by side (grouped-query keys repeated per head).
        """
        layer = self.decoder_layers(model)[index]
        attn = layer.self_attn
        b, length, _ = layer_input.shape
        k = attn.k_proj(layer.input_layernorm(layer_input)).view(b, length, -1, attn.head_dim).transpose(1, 2)
        _, k = self.apply_rotary(k, k, *position_embeddings)
        return repeat_kv(k, attn.num_key_value_groups).transpose(1, 2).reshape(b, length, -1)

    # --------------------------------------------------------------------------------- FLOPs
    def component_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Top-level parts for FLOPs attribution: vision_tower, projector, llm, lm_head."""
        return {
            "vision_tower": model.model.vision_tower,
            "projector": model.model.multi_modal_projector,
            "llm": self.language_model(model),
            "lm_head": model.lm_head,
        }


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


def set_gradient_checkpointing_fn() -> Callable:
    """The checkpoint function used around decoder layers (non-reentrant: gradients reach the masks)."""
    from torch.utils.checkpoint import checkpoint

    return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)
