"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"), training-free, one stage inside the LLM.

After LLM layer K (2 in the paper) a few PIVOT tokens are chosen: the ``pivot_image`` vision tokens
and the ``pivot_text`` prompt tokens after the image with the largest L1 norm of their layer-K keys
(rotary keys, all heads side by side). Then, pivot by pivot, the ``per_pivot`` remaining vision
tokens LEAST similar to the pivot (cosine similarity of the final-normed layer-K outputs) are kept:
the tokens most duplicated with the pivots are the ones dropped. Kept = the image pivots plus
``per_pivot`` tokens per pivot, ``per_pivot = floor(k / (pivot_image + pivot_text))`` with
k = round(rho N), so slightly fewer or more than k (e.g. 4 + 8 x 16 = 132 for k = 128 of 576).

DART needs no attention map: it reads keys and hidden states only, every layer runs plain SDPA
(``tests/test_methods_dart.py`` checks no attention probability is ever computed).

Checked against the authors' code as LightCompress ships it (``token_reduction/dart.py``; the
authors' GitHub repository cannot be fetched here): keys of the pruned layer, L1 norms, the final
norm before the cosine similarity, per-pivot top-k of the negated similarity, text pivots among the
tokens after the image, kept tokens at their original positions. The authors visit the pivots in
CPython's iteration order of the ``set`` of their sequence indices; we do the same with the tokens'
original positions (equal to those indices for an unpadded prompt), so the greedy order matches.
Text pivots are chosen among the prompt tokens (``key_text``) after the last vision token, so an
answer in the sequence (teacher forcing) or generated tokens never influence the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_lvp.methods.base import PruningMethod, StageContext, topk_keep
from lightning_lvp.state import SeqState


def pivot_order(positions: list[int]) -> list[int]:
    """Indices into ``positions`` in CPython's iteration order of ``set(positions)`` (the authors' loop order)."""
    rank = {p: i for i, p in enumerate(positions)}
    return [rank[p] for p in set(positions)]


def text_after_image(state: SeqState) -> torch.Tensor:
    """(B, L) bool: prompt (``key_text``) tokens after the last vision slot."""
    slots = torch.arange(state.valid.shape[1], device=state.valid.device)[None, :]
    last_vision = torch.where(state.alive_vision, slots, -1).max(1).values
    return state.key_text & state.valid & (slots > last_vision[:, None])


def dart_keep(
    keys: torch.Tensor,
    normed: torch.Tensor,
    vision: torch.Tensor,
    text: torch.Tensor,
    positions: torch.Tensor,
    counts: torch.Tensor,
    pivot_image: int,
    pivot_text: int,
) -> torch.Tensor:
    """DART's kept vision tokens (module docstring), batched.

    Args:
        keys: (B, L, E) layer-K keys (pivot scores: L1 norm).
        normed: (B, L, D) final-normed layer-K outputs (duplication: cosine similarity).
        vision: (B, L) bool, the alive vision tokens.
        text: (B, L) bool, the text-pivot candidates.
        positions: (B, L) original positions (pivot visiting order).
        counts: (B,) target number of kept vision tokens k.
        pivot_image, pivot_text: number of pivots of each kind.

    Returns:
        (B, L) bool, the kept vision tokens.
    """
    norms = keys.float().abs().sum(-1)  # (B, L) L1 norms
    n_img = torch.clamp(vision.sum(1), max=pivot_image)
    n_txt = torch.clamp(text.sum(1), max=pivot_text)
    img_piv = topk_keep(norms, vision, n_img)
    txt_piv = topk_keep(norms, text, n_txt)
    per_pivot = counts // (n_img + n_txt).clamp(min=1)
    kept = img_piv.clone()
    unit = F.normalize(normed.float(), dim=-1)
    for b in range(vision.shape[0]):  # at most pivot_image + pivot_text pivots per row
        img_slots = img_piv[b].nonzero().squeeze(1)
        txt_slots = txt_piv[b].nonzero().squeeze(1)
        img_slots = img_slots[norms[b, img_slots].argsort(descending=True, stable=True)]  # topk order, as theirs
        txt_slots = txt_slots[norms[b, txt_slots].argsort(descending=True, stable=True)]
        pivots = torch.cat([img_slots, txt_slots])
        order = pivot_order(positions[b, pivots].tolist())
        similarity = unit[b] @ unit[b, pivots].T  # (L, P) cosine similarity of every token to each pivot
        remaining = vision[b] & ~img_piv[b]
        for p in order:
            take = topk_keep(-similarity[None, :, p], remaining[None], per_pivot[b : b + 1])[0]
            kept[b] |= take
            remaining &= ~take
    return kept & vision


class DART(PruningMethod):
    """Drop the vision tokens most duplicated with a few pivot tokens, after LLM layer ``k``.

    Args:
        k: LLM layer (1-based) whose keys and outputs are read; pruning acts from layer k + 1 (paper: 2).
        keep_ratio: target kept fraction of the original vision tokens (see the module docstring for
            the exact count).
        pivot_image: number of vision pivots (paper: 4).
        pivot_text: number of text pivots among the prompt tokens after the image (paper: 4).
    """

    def __init__(self, k: int = 2, keep_ratio: float = 0.222, pivot_image: int = 4, pivot_text: int = 4):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"DART k must be an LLM layer >= 1 (it reads that layer's keys), got {k!r}")
        if pivot_image < 1 or pivot_text < 0:
            raise ValueError(f"DART needs pivot_image >= 1 and pivot_text >= 0, got {pivot_image}, {pivot_text}")
        super().__init__([k], [keep_ratio])
        self.pivot_image, self.pivot_text = int(pivot_image), int(pivot_text)

    def select(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        if ctx.layer_keys is None or ctx.final_norm is None:
            raise ValueError("DART needs ctx.layer_keys and ctx.final_norm (it must run after an LLM layer, k >= 1)")
        keep = dart_keep(
            ctx.layer_keys(),
            ctx.final_norm(state.hidden),
            state.alive_vision,
            text_after_image(state),
            # M-RoPE (t, h, w) positions (Qwen2.5-VL) have no 1-D order to visit: the slots' input indices
            state.position_ids if state.position_ids.dim() == 2 else state.orig_index,
            self.counts(state, ctx, ratio),
            self.pivot_image,
            self.pivot_text,
        )
        return (state.valid & ~state.vision) | keep
