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

from lightning_lvp.families.base import ImageFeatures, MergedInputs, UnsupportedMethodError, VisionDims, VLMFamily

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


def tokens_per_image(config: Qwen2_5_VLConfig, image_grid_thw: torch.Tensor) -> list[int]:
    """LLM tokens of each image: t * h * w / merge^2 (``Qwen2_5_VLProcessor.replace_image_token``).

    Args:
        image_grid_thw: (n_images, 3) patch grid (t, h, w) of each image.
    """
    merge = config.vision_config.spatial_merge_size
    return (image_grid_thw.prod(-1) // merge**2).tolist()


def images_per_sample(
    config: Qwen2_5_VLConfig, input_ids: torch.Tensor, image_grid_thw: torch.Tensor
) -> list[list[int]]:
    """Which images (rows of ``image_grid_thw``) each sample's image tokens take, in order.

    Raises:
        ValueError: naming the sample, if its image-token count does not match whole images, or the
            batch has more images than placeholders.
    """
    counts = tokens_per_image(config, image_grid_thw)
    per_sample = (input_ids == config.image_token_id).sum(1).tolist()
    result, nxt = [], 0
    for b, want in enumerate(per_sample):
        mine, have = [], 0
        while have < want and nxt < len(counts):
            mine.append(nxt)
            have += counts[nxt]
            nxt += 1
        if want == 0:
            raise ValueError(f"sample {b} has no image token ({config.image_token_id}) in input_ids")
        if have != want:
            raise ValueError(
                f"sample {b} has {want} image tokens ({config.image_token_id}) but its images {mine} give {have} "
                f"features (image_grid_thw {image_grid_thw[mine].tolist()}: t * h * w / 4 tokens each)"
            )
        result.append(mine)
    if nxt != len(counts):
        raise ValueError(f"image_grid_thw has {len(counts)} images but the samples' image tokens take only {nxt}")
    return result


def check_inputs(config: Qwen2_5_VLConfig, input_ids, pixel_values, image_grid_thw) -> None:
    """Clear errors for wrong ranks / a patch count that does not match ``image_grid_thw``."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if image_grid_thw is None:
        raise ValueError("Qwen2.5-VL needs image_grid_thw (n_images, 3) from its image processor")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (n_images, 3), got shape {tuple(image_grid_thw.shape)}")
    rows = int(image_grid_thw.prod(-1).sum())
    if pixel_values.dim() != 2 or pixel_values.shape[0] != rows:
        raise ValueError(
            f"pixel_values must be flat patches ({rows}, {pixel_row_width(config)}) for image_grid_thw "
            f"{image_grid_thw.tolist()}, got shape {tuple(pixel_values.shape)}"
        )


class Qwen2_5_VLFamily(VLMFamily):
    """Qwen2.5-VL: ``Qwen2_5_VLForConditionalGeneration`` (model_type ``qwen2_5_vl``).

    Extra image input: ``image_grid_thw`` (n_images, 3); ``pixel_values`` are the processor's flat
    patches of all images of the batch, sample by sample. Several images in one sample work: their
    tokens form one pool per sample (ratios are fractions of the sample's total).
    """

    name = "qwen2_5_vl"
    model_types = (MODEL_TYPE,)
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    vision_tower_flops = (
        "the windowed-attention ViT (every block, full-attention ones included) and the 2x2 patch merger, "
        "patch embedding included"
    )
    image_input_names = ("image_grid_thw",)

    @property
    def model_class(self) -> type:
        return Qwen2_5_VLForConditionalGeneration

    def vision_dims(self, config) -> VisionDims:
        """Dynamic resolution: no fixed count (:func:`tokens_per_image` of each image's grid)."""
        raise ValueError(
            "Qwen2.5-VL has dynamic resolution: the vision-token count depends on each image's size "
            "(t * h * w / 4 of its image_grid_thw, lightning_lvp.families.qwen2_5_vl.tokens_per_image)"
        )

    # ------------------------------------------------------------------------------ image side
    def image_features(self, model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """The windowed vision encoder + 2x2 merger, untouched: one (N_i, D) tensor per image."""
        out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return list(out.pooler_output)  # split per image by ``get_image_features``

    def merge(self, model, input_ids, pixel_values, structure: str = "keep", **image_inputs) -> MergedInputs:
        """Embedding step of ``Qwen2_5_VLModel.forward`` with a per-sample check.

        Args:
            input_ids: (B, T); each sample's ``<|image_pad|>`` runs take the next images in order.
            pixel_values: (sum_i t_i h_i w_i, C * T_p * p * p) flat patches.
            image_grid_thw: (n_images, 3) (in ``image_inputs``).

        Returns:
            :class:`MergedInputs` without ``position_ids`` (they need the attention mask:
            :meth:`position_ids`).
        """
        grid = image_inputs.pop("image_grid_thw", None)
        self.check_image_inputs(image_inputs)
        if structure != "keep":
            raise ValueError(
                f"Qwen2.5-VL has no structure tokens among its image tokens: structure must be 'keep', got {structure!r}"
            )
        check_inputs(model.config, input_ids, pixel_values, grid)
        images_per_sample(model.config, input_ids, grid)  # raises, naming the sample
        vision = input_ids == self.image_token_id(model)
        feats = self.image_features(model, pixel_values, grid)
        embeds = self.embed_tokens(model, input_ids)
        embeds = embeds.masked_scatter(vision.unsqueeze(-1), torch.cat(feats, 0).to(embeds.dtype))
        features = ImageFeatures(embeds=feats, vision_hidden=None)  # no CLS: see patch_cls_similarity
        return MergedInputs(embeds, vision, torch.zeros_like(vision), features, decode_state={"image_grid_thw": grid})

    def expand_image_inputs(self, model, input_ids, image_inputs: dict, expand_size: int) -> dict:
        """Each sample's images (patch rows and grid rows) repeated ``expand_size`` times, sample by sample."""
        pix, grid = image_inputs["pixel_values"], image_inputs["image_grid_thw"]
        starts = [0, *grid.prod(-1).cumsum(0).tolist()]
        pix_out, grid_out = [], []
        for images in images_per_sample(model.config, input_ids, grid):
            rows = torch.arange(starts[images[0]], starts[images[-1] + 1], device=pix.device)
            pix_out += [pix[rows]] * expand_size
            grid_out += [grid[images]] * expand_size
        return {**image_inputs, "pixel_values": torch.cat(pix_out), "image_grid_thw": torch.cat(grid_out)}

    def sample_image_inputs(self, model, input_ids, image_inputs: dict, index: int) -> dict:
        """Sample ``index``'s own images: its patch rows of the flat ``pixel_values`` and its grid rows."""
        pix, grid = image_inputs["pixel_values"], image_inputs["image_grid_thw"]
        starts = [0, *grid.prod(-1).cumsum(0).tolist()]
        images = images_per_sample(model.config, input_ids, grid)[index]
        rows = slice(starts[images[0]], starts[images[-1] + 1])
        return {**image_inputs, "pixel_values": pix[rows], "image_grid_thw": grid[images]}

    def patch_cls_similarity(self, features: ImageFeatures) -> torch.Tensor:
        raise UnsupportedMethodError(NO_CLS)

    def vision_cls_attention(self, model, features: ImageFeatures):
        raise UnsupportedMethodError(NO_CLS)

    def project_vision(self, model, vision_states: torch.Tensor) -> torch.Tensor:
        raise UnsupportedMethodError(
            "Qwen2.5-VL's merger maps 2 x 2 patch groups, not single tower states: no per-token projector"
        )

    # ------------------------------------------------------------------------------- positions
    def rope_positions(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw):
        """HF's own 3-D M-RoPE positions of the UNPRUNED prompt and its ``rope_deltas``.

        Returns:
            position_ids (B, T, 3) (t, h, w) per token (padding: 0), rope_deltas (B, 1): decoded token
            k after a prompt of n real tokens sits at n + k + rope_delta in all three components.
        """
        token_type = (input_ids == model.config.image_token_id).int()  # mm_token_type_ids: 1 = image
        pos, deltas = model.model.get_rope_index(input_ids, token_type, image_grid_thw, attention_mask=attention_mask)
        return pos.permute(1, 2, 0).contiguous(), deltas  # (3, B, T) -> (B, T, 3)

    def position_ids(self, model, input_ids, attention_mask, merged: MergedInputs) -> torch.Tensor:
        """(B, T, 3) original positions; records ``rope_deltas`` in ``merged.decode_state`` for decoding."""
        grid = merged.decode_state.pop("image_grid_thw")  # decode_state keeps batch-first tensors only (beams)
        pos, deltas = self.rope_positions(model, input_ids, attention_mask, grid)
        merged.decode_state["rope_deltas"] = deltas
        return pos

    def decode_position_ids(self, model, position_ids: torch.Tensor, decode_state: dict) -> torch.Tensor:
        """generate()'s (B, 1) ``cumsum(mask) - 1`` -> (B, 1, 3): ``text + rope_deltas`` in t, h and w.

        As ``Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation``; the deltas come
        from the UNPRUNED prompt, so decoding continues exactly as the unpruned model's.
        """
        deltas = decode_state["rope_deltas"].to(position_ids.device)
        return (position_ids + deltas)[..., None].expand(-1, -1, 3)

    def rotary(self, model, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin), each (B, L, head_dim), of the ORIGINAL (t, h, w) positions ``position_ids`` (B, L, 3).

        ``Qwen2_5_VLRotaryEmbedding`` takes (3, B, L) and interleaves the t/h/w frequency sections
        (``mrope_section``); the result has Llama's layout, so the default ``apply_rotary`` holds.
        """
        if position_ids.dim() != 3 or position_ids.shape[-1] != 3:
            raise ValueError(f"Qwen2.5-VL needs (batch, seq_len, 3) M-RoPE positions, got {tuple(position_ids.shape)}")
        return self.language_model(model).rotary_emb(hidden, position_ids.permute(2, 0, 1))

    def run_layer(self, model, index, hidden, mask, position_ids, position_embeddings, cache=None, keep=None):
        """One ``Qwen2_5_VLDecoderLayer`` as ``Qwen2_5_VLTextModel.forward`` calls it: ``position_ids=None``
        for unpacked 3-D positions (only flash-attention reads them; the rotary is in ``position_embeddings``)."""
        return super().run_layer(model, index, hidden, mask, None, position_embeddings, cache, keep)

    def dummy_batch(self, config, text_tokens: int = 30, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """FLOPs input: one 1,024 x 768 px image (999 tokens) + ``text_tokens`` text tokens (:func:`dummy_batch`)."""
        return dummy_batch(config, text_tokens, batch_size)

    def dummy_description(self, config, height: int = 768, width: int = 1024) -> str:
        """The FLOPs input image in words (printed with the FLOPs convention)."""
        t, h, w = image_grid(config, height, width)
        p = config.vision_config.patch_size
        n = tokens_per_image(config, torch.tensor([[t, h, w]]))[0]
        return (
            f"1 image of {width} x {height} px (resized to {w * p} x {h * p} px, {w} x {h} patches: {n} vision tokens)"
        )

    def component_modules(self, model) -> dict[str, nn.Module]:
        """FLOPs parts: the vision tower (patch embedding + blocks; the merger inside it counts as the
        projector, ``flops._component_flops`` keeps nested parts apart), the 2x2 merger, the LLM, the LM head."""
        visual = model.model.visual
        return {
            "vision_tower": visual,
            "projector": visual.merger,
            "llm": self.language_model(model),
            "lm_head": model.lm_head,
        }


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
):
    """Qwen2-VL's image processor resize (``image_processing_pil_qwen2_vl.smart_resize``, its default pixel bounds)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    return hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def image_grid(config: Qwen2_5_VLConfig, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one still image of ``height`` x ``width`` px after the processor's resize.

    1,024 x 768 (width x height) -> 756 x 1,036 px -> (1, 54, 74) patches -> 27 x 37 = 999 LLM tokens.
    """
    vc = config.vision_config
    h, w = smart_resize(height, width, factor=vc.patch_size * vc.spatial_merge_size)
    return 1, h // vc.patch_size, w // vc.patch_size


def dummy_batch(
    config: Qwen2_5_VLConfig, text_tokens: int = 30, batch_size: int = 1, height: int = 768, width: int = 1024
) -> dict[str, torch.Tensor]:
    """``batch_size`` x (one text token, <vision_start>, the image tokens, <vision_end>, the rest of the text).

    Zeros as ``pixel_values`` (FLOPs on the meta device do not depend on them).
    """
    if text_tokens < 3:
        raise ValueError(f"text_tokens must be >= 3 (a text key plus <vision_start> / <vision_end>), got {text_tokens}")
    grid = torch.tensor([image_grid(config, height, width)] * batch_size)
    n_vision = tokens_per_image(config, grid[:1])[0]
    text = [1] * (text_tokens - 3)
    row = text[:1] + [config.vision_start_token_id] + [config.image_token_id] * n_vision
    row += [config.vision_end_token_id] + text[1:] + [1]  # text_tokens tokens besides the image tokens
    ids = torch.tensor([row] * batch_size)
    pixels = torch.zeros(int(grid.prod(-1).sum()), pixel_row_width(config))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_grid_thw": grid}


NO_CLS = (
    "Qwen2.5-VL's vision encoder has no CLS token: CLS-knee and VisionZip (CLS similarity / attention) cannot "
    "run on it; use LVPruning, FastV, random, uniform, DART or DivPrune"
)
