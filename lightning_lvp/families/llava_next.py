"""LLaVA-NeXT / v1.6 (``LlavaNextForConditionalGeneration``): anyres images, a count per image.

Each image becomes a base view (the whole image resized to the tower's side) plus crops of the
best-fitting ``image_grid_pinpoints`` resolution; all views run through CLIP separately. The
LLM sees, per image: the base view's patches, then the crops' patches re-assembled into one grid,
unpadded to the image's aspect ratio, with one ``image_newline`` token after every grid row
(``LlavaNextModel.pack_image_features``). So the number of ``<image>`` tokens depends on the image
size: a batch mixes counts.

Choices (docs/FAMILIES.md):

* **Newline tokens** (``PrunedVLM(structure=...)``): ``"keep"`` (default) treats them as structure:
  always kept, never counted among the vision tokens the ratios refer to, never pruner keys;
  ``"prune"`` treats them as vision tokens like the patches (counted, ranked, removable; their
  vision-tower state is zero, so their CLS similarity is 0).
* **Which token is which patch** comes from running HF's own ``pack_image_features`` on a tensor of
  (crop, token) indices instead of features: the layout is HF's by construction, never re-derived.
* **CLS for crops** (CLS-knee stage 1, ``patch_cls_similarity``): every token is compared with the
  CLS state of the view it came from (the base view's CLS for base patches, a crop's own CLS for that
  crop's patches), in the selected CLIP layer. This is the per-view CLS that VisionZip's LLaVA-NeXT
  variant ranks each view with; a global CLS would compare states of different forward passes.
  ``vision_hidden`` column 0 holds the base view's CLS.
* Positions are 1-D RoPE, ``cumsum(mask) - 1`` as in LLaVA-1.5; the text side is the default.
"""

from __future__ import annotations

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from lightning_lvp.families.base import ImageFeatures, MergedInputs, VisionDims, VLMFamily, check_image_tokens
from lightning_lvp.families.llava import LlavaFamily, _CatchLayerInput, check_shapes

NEWLINE = -1  # crop index of an image_newline token in a layout


class _ConfigOnly:
    """Stands in for ``self`` of ``LlavaNextModel.pack_image_features``, which reads only ``self.config``."""

    def __init__(self, config):
        self.config = config


class LlavaNextFamily(VLMFamily):
    """LLaVA-NeXT: ``LlavaNextForConditionalGeneration`` (model_type ``llava_next``), input ``image_sizes``."""

    name = "llava_next"
    model_types = ("llava_next",)
    architectures = ("LlavaNextForConditionalGeneration",)
    vision_tower_flops = (
        "all CLIP layers (24, although LLaVA reads layer -2) on the base image and every anyres crop, "
        "patch convolution included"
    )
    image_input_names = ("image_sizes",)
    structure_policies = ("keep", "prune")
    save = LlavaFamily.save

    @property
    def model_class(self) -> type:
        return LlavaNextForConditionalGeneration

    def vision_dims(self, config) -> VisionDims:
        """Dimensions of ONE view; ``tokens_per_image`` = the base view's tokens (an image has more)."""
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
        return VisionDims(vc.image_size, vc.patch_size, side, side * side, side * side + extra)

    # ------------------------------------------------------------------------------ layout
    def num_views(self, config, image_size) -> int:
        """Base view + crops of an image of ``image_size`` (height, width) (HF's count)."""
        return image_size_to_num_patches(
            image_size=[int(x) for x in image_size],
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )

    @torch.no_grad()
    def layouts(self, model_or_config, image_sizes) -> list[torch.Tensor]:
        """Per image, (n_i, 2) long: (view index in the batch's concatenated views, token in the view).

        Newline tokens have view index ``NEWLINE``. Computed by HF's ``LlavaNextModel.pack_image_features``
        on index tensors (float64 holds the integers exactly), so the order is the LLM's placeholder
        order. That method reads only ``self.config``, so a config (no weights) is enough.
        """
        cfg = getattr(model_or_config, "config", model_or_config)
        per_view = self.vision_dims(cfg).tokens_per_image
        index, offset = [], 0
        for size in image_sizes:
            n = self.num_views(cfg, size)
            view = torch.arange(offset, offset + n, dtype=torch.float64)[:, None].expand(n, per_view)
            token = torch.arange(per_view, dtype=torch.float64)[None, :].expand(n, per_view)
            index.append(torch.stack([view, token], -1))  # (n_views, per_view, 2)
            offset += n
        sizes = torch.as_tensor([[int(x) for x in s] for s in image_sizes])
        marker = torch.full((2,), float(NEWLINE), dtype=torch.float64)
        holder = _ConfigOnly(cfg)
        packed, _ = LlavaNextModel.pack_image_features(holder, index, sizes, cfg.vision_feature_select_strategy, marker)
        return [p.long() for p in packed]

    def placeholder_count(self, model_or_config, image_size) -> int:
        """``<image>`` tokens one image of ``image_size`` (height, width) needs in ``input_ids``."""
        return int(self.layouts(model_or_config, [image_size])[0].shape[0])

    def dummy_description(self, config, side: int = 672) -> str:
        """The FLOPs input image in words (printed with the FLOPs convention)."""
        lay = self.layouts(config, [(side, side)])[0]
        newlines = int((lay[:, 0] == NEWLINE).sum())
        views = self.num_views(config, (side, side))
        return (
            f"1 image of {side} x {side} px (anyres: {views} views of {config.vision_config.image_size} px, "
            f"{lay.shape[0] - newlines} vision tokens + {newlines} image_newline tokens kept as structure)"
        )

    def dummy_batch(self, config, text_tokens: int = 30, batch_size: int = 1, side: int = 672) -> dict:
        """FLOPs input: one ``side`` x ``side`` px image + ``text_tokens`` text tokens (BOS, image, the rest).

        At 672 px with llava-v1.6's pinpoints: 2 x 2 crops + the base view = 5 views of 336 px, 576 base
        + 2,304 crop patches + 48 newlines = 2,928 ``<image>`` tokens (2,880 vision tokens under "keep").
        Zeros as ``pixel_values`` (shape-only FLOPs do not depend on them).
        """
        if text_tokens < 1:
            raise ValueError(f"text_tokens must be >= 1 (the decision modules need a text key), got {text_tokens}")
        n = self.placeholder_count(config, (side, side))
        text_id = 1 if config.image_token_id != 1 else 2
        row = [text_id] + [config.image_token_id] * n + [text_id] * (text_tokens - 1)
        ids = torch.tensor([row] * batch_size)
        vc = config.vision_config
        views = self.num_views(config, (side, side))
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.zeros(batch_size, views, vc.num_channels, vc.image_size, vc.image_size),
            "image_sizes": torch.tensor([[side, side]] * batch_size),
        }

    # ------------------------------------------------------------------------------- merge
    def merge(self, model, input_ids, pixel_values, structure: str = "keep", image_sizes=None, **image_inputs):
        """Embedding step of ``LlavaNextModel.forward`` with per-sample checks and the token roles.

        Args:
            input_ids: (B, T), each sample's placeholders expanded for its own image size.
            pixel_values: (B, V_max, C, H, W) views per image (zero-padded past each image's count).
            structure: newline policy, "keep" (structure) or "prune" (like patches).
            image_sizes: (B, 2) original (height, width) of each image.
        """
        self.check_image_inputs(image_inputs)
        check_shapes(input_ids, pixel_values, pixel_dims=5)
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (batch, 2): each image's (height, width)")
        if structure not in self.structure_policies:
            raise ValueError(f"structure must be one of {self.structure_policies}, got {structure!r}")
        cfg = model.config
        placeholders = input_ids == self.image_token_id(model)
        with _CatchLayerInput(model):  # keeps the tower's output format identical to LLaVA-1.5's call
            out = model.model.get_image_features(
                pixel_values=pixel_values,
                image_sizes=image_sizes,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                return_dict=True,
            )
        feats = list(out.pooler_output)  # per image (n_i, D)
        check_image_tokens(placeholders.sum(1).tolist(), [f.shape[0] for f in feats], self.image_token_id(model))
        embeds = self.embed_tokens(model, input_ids)
        flat = torch.cat(feats).to(embeds.dtype)
        embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), flat)
        layouts = self.layouts(model, image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)
        newline = torch.zeros_like(placeholders)
        newline[placeholders] = torch.cat([lay[:, 0] == NEWLINE for lay in layouts]).to(newline.device)
        if structure == "prune":
            vision, struct = placeholders, torch.zeros_like(placeholders)
        else:
            vision, struct = placeholders & ~newline, newline
            layouts = [lay[lay[:, 0] != NEWLINE] for lay in layouts]
        tower = out.hidden_states[cfg.vision_feature_layer]  # (sum V_i, 1 + S, Dv), CLS first
        features = self._vision_states(tower, layouts, cfg.vision_feature_select_strategy, feats)
        return MergedInputs(embeds, vision, struct, features)

    def _vision_states(self, tower: torch.Tensor, layouts, strategy: str, embeds) -> ImageFeatures:
        """``vision_hidden`` (B, 1 + N, Dv) and ``token_cls`` (B, N, Dv) in patch order (zeros at newlines)."""
        shift = 1 if strategy == "default" else 0  # "default" dropped CLS: token t is tower column t + 1
        n = max(lay.shape[0] for lay in layouts)
        b, dv = len(layouts), tower.shape[-1]
        hidden = tower.new_zeros(b, 1 + n, dv)
        token_cls = tower.new_zeros(b, n, dv)
        for i, lay in enumerate(layouts):
            lay = lay.to(tower.device)
            real = lay[:, 0] != NEWLINE
            view, tok = lay[:, 0].clamp(min=0), lay[:, 1] + shift
            states = tower[view, tok] * real[:, None]  # (n_i, Dv)
            hidden[i, 1 : 1 + lay.shape[0]] = states
            token_cls[i, : lay.shape[0]] = tower[view, 0] * real[:, None]
            hidden[i, 0] = tower[view[real][0], 0]  # the base view's CLS (base patches come first)
        return ImageFeatures(embeds=embeds, vision_hidden=hidden, token_cls=token_cls)
