"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama text model.

One image per sample, a fixed number of ``<image>`` tokens per image (one per patch, FACTS), 1-D
RoPE positions ``cumsum(mask) - 1``. The text-model parts are the :class:`VLMFamily` defaults.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from lightning_lvp.families.base import (
    ImageFeatures,
    MergedInputs,
    VisionDims,
    VLMFamily,
    check_image_tokens,
)


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The CLIP encoder layers (transformers 5: the tower is the ``CLIPVisionTransformer`` itself)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def vision_layer_number(model: nn.Module) -> int:
    """1-based number of the CLIP layer whose output LLaVA reads (0 = the embeddings)."""
    n = model.config.vision_config.num_hidden_layers
    return int(model.config.vision_feature_layer) % (n + 1)  # hidden_states has n + 1 entries


class _CatchLayerInput:
    """Context manager: a forward pre-hook that keeps the input of the selected CLIP layer.

    transformers 5.24 keeps only the selected hidden state, so VisionZip's CLS attention is
    recomputed from the layer's input (:func:`cls_attention_from_input`).
    """

    def __init__(self, model: nn.Module):
        self.model, self.captured, self.hook = model, {}, None

    def __enter__(self) -> dict:
        selected = vision_layer_number(self.model)
        if selected >= 1:
            layer = vision_layers(self.model)[selected - 1]

            def catch(_module, args):  # returns None: the layer's input is not changed
                self.captured["input"] = args[0]

            self.hook = layer.register_forward_pre_hook(catch)
        return self.captured

    def __exit__(self, *exc) -> bool:
        if self.hook is not None:
            self.hook.remove()
        return False


def cls_attention_from_input(model: nn.Module, layer_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS query's attention and the keys of the vision tower's selected layer (VisionZip).

    Recomputed from the layer's input (one query row; the tower itself runs SDPA and returns no
    attention map). Keys are ``k_proj`` of the layer-normed input, averaged over heads (VisionZip's
    similarity metric).

    Args:
        layer_input: (B, 1 + N, Dv) :attr:`ImageFeatures.vision_input`.

    Returns:
        cls_attention (B, Hv, 1 + N) softmax probabilities of the CLS query, keys (B, 1 + N, Dh).
    """
    number = vision_layer_number(model)
    if number < 1 or layer_input is None:
        raise ValueError(
            f"vision_feature_layer {model.config.vision_feature_layer} reads the patch embeddings: "
            "that layer has no attention to rank tokens with"
        )
    layer = vision_layers(model)[number - 1]
    attn = layer.self_attn
    b, t, _ = layer_input.shape
    normed = layer.layer_norm1(layer_input)
    keys = attn.k_proj(normed).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, Hv, T, Dh)
    query = attn.q_proj(normed[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = ((query @ keys.transpose(-1, -2)) * attn.scale).squeeze(2).softmax(-1)  # (B, Hv, T)
    return probs, keys.mean(1)


def check_shapes(input_ids: torch.Tensor, pixel_values: torch.Tensor, pixel_dims: int = 4) -> None:
    """Clear errors for a wrong ``input_ids`` / ``pixel_values`` rank or batch."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if pixel_values.dim() != pixel_dims or pixel_values.shape[0] != input_ids.shape[0]:
        names = "(batch, channels, height, width)" if pixel_dims == 4 else "(batch, crops, channels, height, width)"
        raise ValueError(
            f"pixel_values must be {names} with batch {input_ids.shape[0]}, got shape {tuple(pixel_values.shape)}"
        )


class LlavaFamily(VLMFamily):
    """LLaVA-1.5: ``LlavaForConditionalGeneration`` (model_type ``llava``)."""

    name = "llava"
    model_types = ("llava",)
    architectures = ("LlavaForConditionalGeneration",)
    vision_tower_flops = (
        "all CLIP layers run by transformers (24, although LLaVA reads layer -2), patch convolution included"
    )

    @property
    def model_class(self) -> type:
        return LlavaForConditionalGeneration

    def save(self, model: nn.Module, folder: str, processor_from: str | None = None) -> None:
        """``save_pretrained`` of the weights and config, plus the processor of ``processor_from`` if it has one."""
        from transformers import AutoProcessor

        model.save_pretrained(folder)
        if processor_from and os.path.isdir(processor_from):
            try:
                AutoProcessor.from_pretrained(processor_from).save_pretrained(folder)
            except (OSError, ValueError) as err:  # a bare config folder has no processor: nothing to copy
                raise ValueError(f"cannot copy the processor of {processor_from!r} to {folder!r}: {err}") from err

    def vision_dims(self, config) -> VisionDims:
        """:class:`VisionDims` (FACTS: one image token per patch, "full" keeps CLS)."""
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
        return VisionDims(vc.image_size, vc.patch_size, side, side * side, side * side + extra)

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor) -> ImageFeatures:
        """Runs the vision tower + projector as LLaVA does (feature layer, CLS dropped for "default")."""
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise NotImplementedError("lists of vision_feature_layer are not supported")
        with _CatchLayerInput(model) as captured:
            out = model.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                return_dict=True,
            )
        embeds = torch.stack(list(out.pooler_output))  # (B, N, D): pooler_output is a list per image in v5
        return ImageFeatures(
            embeds=embeds,
            vision_hidden=out.hidden_states[cfg.vision_feature_layer],
            vision_input=captured.get("input"),
        )

    def merge(self, model, input_ids, pixel_values, structure: str = "keep", **image_inputs) -> MergedInputs:
        """Embedding step of ``LlavaModel.forward`` (FACTS: reproduces it exactly), with a per-sample
        check and without ``.item()`` (so it also runs on the ``meta`` device).

        Args:
            input_ids: (B, T) with one image token per patch in every sample.
            pixel_values: (B, C, H, W), one image per sample.
        """
        self.check_image_inputs(image_inputs)
        check_shapes(input_ids, pixel_values)
        vision_mask = input_ids == self.image_token_id(model)
        feats = self.image_features(model, pixel_values)
        if input_ids.device.type != "meta":
            n = feats.embeds.shape[1]
            check_image_tokens(vision_mask.sum(1).tolist(), [n] * feats.embeds.shape[0], self.image_token_id(model))
        embeds = self.embed_tokens(model, input_ids)
        feats_flat = feats.embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(vision_mask.unsqueeze(-1), feats_flat)
        return MergedInputs(embeds, vision_mask, torch.zeros_like(vision_mask), feats)

    def vision_cls_attention(self, model, features: ImageFeatures):
        return cls_attention_from_input(model, features.vision_input)
