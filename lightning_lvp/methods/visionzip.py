"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models"), training-free, text-agnostic, before the LLM.

In the vision tower's selected layer (the one LLaVA reads):

1. DOMINANT tokens: the patches receiving the most attention from the CLS token (sum over heads).
2. CONTEXTUAL tokens: of the remaining patches in patch order, every ``step``-th one
   (``step = max(1, M // c)``, the first c of them) is a target; every other remaining patch is
   assigned to the target whose key is most similar (cosine of the head-averaged keys), and each
   target becomes ``h_target + mean(h_assigned)`` (vision space, before the projector).
3. Optionally the CLS token itself goes to the LLM as well (the authors do: "dominant" counts it).

Kept = CLS (optional) + dominant + contextual = k = round(rho N); the contextual share is
``contextual_fraction`` (the authors' 54 + 10, 108 + 20, 161 + 30 for 64 / 128 / 192 tokens are
all 5/32). ``contextual_fraction=0`` is the dominant-only variant.

Checked against the authors' code (PyPI ``visionzip==0.1.3`` sdist; golden outputs in
``tests/golden/visionzip.json`` made by ``benchmarks/peers/visionzip_golden.py``). Layouts:

* ``"authors"``: the image block becomes [CLS, dominant in patch order, contextual in target order],
  contiguous, as the authors feed it to the LLM. The authors renumber every position; we shift the
  text BEFORE the image and the image block instead (by the number of removed tokens), so the text
  after the image and every generated token keep their original positions: rotary attention
  depends only on position differences, so this equals their layout (up to rounding).
* ``"original"``: the framework's convention (METHOD §4): kept patches stay in patch order at their
  original positions; a merged token takes its target's slot and position. No CLS token.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_lvp.methods.base import PruningMethod, StageContext, keep_counts, topk_keep
from lightning_lvp.state import SeqState, consecutive_positions, gather_rows, pack_index


def split_counts(total: int, contextual_fraction: float, cls_to_llm: bool) -> tuple[int, int]:
    """(dominant patches, contextual tokens) for ``total`` kept tokens (CLS included if passed on)."""
    contextual = int(round(total * contextual_fraction))
    dominant = total - contextual - int(cls_to_llm)
    if dominant < 0 or (dominant == 0 and contextual == 0 and not cls_to_llm):
        raise ValueError(
            f"VisionZip cannot keep {total} tokens with contextual_fraction={contextual_fraction} and "
            f"cls_to_llm={cls_to_llm}: raise keep_ratio or lower contextual_fraction"
        )
    return dominant, contextual


def visionzip_tokens(
    cls_attention: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dominant and contextual tokens of one batch of images (module docstring, steps 1-2).

    Args:
        cls_attention: (B, H, 1 + N) attention of the CLS query, CLS first.
        keys: (B, 1 + N, Dh) head-averaged keys of the same layer.
        hidden: (B, 1 + N, Dv) output of the same layer.
        dominant: number of dominant patches d.
        contextual: number of contextual tokens c (0 = dominant only).

    Returns:
        dominant patch indices (B, d) ascending, target patch indices (B, c) ascending, and the
        contextual tokens (B, c, Dv) in target order.
    """
    b, t, _ = hidden.shape
    n = t - 1
    if dominant + contextual > n:
        raise ValueError(f"VisionZip: {dominant} dominant + {contextual} contextual tokens exceed the {n} patches")
    score = cls_attention[:, :, 1:].float().sum(1)  # (B, N)
    all_patches = torch.ones(b, n, dtype=torch.bool, device=hidden.device)
    dom_mask = topk_keep(score, all_patches, torch.full((b,), dominant, device=hidden.device))
    dom = pack_index(dom_mask)[0]  # (B, d) ascending
    if contextual == 0:
        return dom, dom[:, :0], hidden.new_zeros(b, 0, hidden.shape[-1])
    rest = pack_index(~dom_mask)[0]  # (B, M) remaining patches, ascending
    m = rest.shape[1]
    step = max(1, m // contextual)
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[torch.arange(0, m, step, device=hidden.device)[:contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]  # patch indices
    patch_keys = keys[:, 1:] / keys[:, 1:].norm(dim=-1, keepdim=True)
    patch_hidden = hidden[:, 1:]
    similarity = gather_rows(patch_keys, others) @ gather_rows(patch_keys, targets).transpose(1, 2)  # (B, M - c, c)
    assign = F.one_hot(similarity.argmax(-1), contextual).to(hidden.dtype)  # (B, M - c, c)
    counts = assign.sum(1).clamp(min=1)[..., None]  # (B, c, 1)
    merged = (assign.transpose(1, 2) @ gather_rows(patch_hidden, others)) / counts
    return dom, targets, gather_rows(patch_hidden, targets) + merged


class VisionZip(PruningMethod):
    """Dominant (CLS-attended) + contextual (key-merged) vision tokens before the LLM.

    Args:
        keep_ratio: kept tokens (CLS included when passed on) as a fraction of the original vision tokens.
        contextual_fraction: share of the kept tokens that are contextual (authors: 5/32; 0 = dominant only).
        cls_to_llm: pass the CLS token to the LLM (the authors do); needs ``layout="authors"``.
        layout: "authors" or "original" (module docstring).
    """

    def __init__(
        self,
        keep_ratio: float = 64 / 576,
        contextual_fraction: float = 5 / 32,
        cls_to_llm: bool = True,
        layout: Literal["authors", "original"] = "authors",
    ):
        super().__init__([0], [keep_ratio])
        if not 0.0 <= contextual_fraction < 1.0:
            raise ValueError(f"VisionZip contextual_fraction must be in [0, 1), got {contextual_fraction}")
        if layout not in ("authors", "original"):
            raise ValueError(f"VisionZip layout must be 'authors' or 'original', got {layout!r}")
        if cls_to_llm and layout != "authors":
            raise ValueError("VisionZip cls_to_llm=True needs layout='authors' (the CLS token has no slot of its own)")
        self.contextual_fraction, self.cls_to_llm, self.layout = float(contextual_fraction), bool(cls_to_llm), layout

    def apply(self, state: SeqState, ctx: StageContext, ratio: float | None) -> SeqState:
        if ctx.vision_attention is not None:  # first: a family without CLS attention (Qwen2.5-VL, LLaVA-NeXT)
            cls_attention, keys = ctx.vision_attention()  # raises its own clear error here
        if ctx.vision_attention is None or ctx.project is None or ctx.vision_hidden is None:
            raise ValueError(
                "VisionZip needs ctx.vision_attention, ctx.project and ctx.vision_hidden (the vision tower)"
            )
        n = state.n_vision
        if bool((state.alive_vision.sum(1) != n).any()) or bool((n != n[0]).any()):
            raise ValueError("VisionZip must be the first stage, on images with the same number of patches")
        total = int(keep_counts(ratio, n, ctx.stage)[0])
        dominant, contextual = split_counts(total, self.contextual_fraction, self.cls_to_llm)
        dom, targets, merged = visionzip_tokens(cls_attention, keys, ctx.vision_hidden, dominant, contextual)
        b, d = state.hidden.shape[0], state.hidden.shape[-1]
        patch_embeds = state.hidden[state.alive_vision].view(b, int(n[0]), d)  # vision slots are in patch order
        merged = ctx.project(merged.to(ctx.vision_hidden.dtype)).to(state.hidden.dtype)
        if self.layout == "original":
            return self._original(state, dom, targets, patch_embeds, merged)
        blocks = [gather_rows(patch_embeds, dom), merged]
        patches = [dom, targets]
        if self.cls_to_llm:
            cls = ctx.project(ctx.vision_hidden[:, :1]).to(state.hidden.dtype)
            blocks.insert(0, cls)
            patches.insert(0, torch.full_like(dom[:, :1], -1))
        return self._authors(state, torch.cat(blocks, 1), torch.cat(patches, 1))

    @staticmethod
    def _original(state: SeqState, dom, targets, patch_embeds, merged) -> SeqState:
        """Kept patches in their own slots; each merged token replaces its target's embedding."""
        keep_patch = torch.zeros(patch_embeds.shape[:2], dtype=torch.bool, device=dom.device)
        keep_patch.scatter_(1, torch.cat([dom, targets], 1), True)
        embeds = patch_embeds.scatter(1, targets[..., None].expand_as(merged), merged)
        keep = (state.valid & ~state.vision) | (
            state.alive_vision & keep_patch.gather(1, state.patch_index.clamp(min=0))
        )
        new = state.select(keep)
        at_slots = gather_rows(embeds, new.patch_index.clamp(min=0))
        new.hidden = torch.where(new.alive_vision[..., None], at_slots, new.hidden)
        return new

    @staticmethod
    def _authors(state: SeqState, block: torch.Tensor, patches: torch.Tensor) -> SeqState:
        """The first K vision slots hold ``block`` (B, K, D) contiguously; earlier tokens shift right."""
        k = block.shape[1]
        end = state.position_ids[:, -1:]  # original position of the last token (rows are left-packed)
        rank = state.alive_vision.long().cumsum(1)
        keep = (state.valid & ~state.vision) | (state.alive_vision & (rank <= k))
        new = state.select(keep)
        slots = new.alive_vision
        new.hidden = new.hidden.masked_scatter(slots[..., None], block)
        new.patch_index = new.patch_index.masked_scatter(slots, patches)
        new.position_ids = torch.where(new.valid, consecutive_positions(new.valid, end), new.position_ids)
        return new
