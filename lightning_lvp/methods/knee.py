"""CLS-similarity knee pruning (METHOD §6, seed 002), a training-free two-stage method.

Stage 1 (``after_layer=0``, the LLM input): cosine similarity of every image patch to the CLS token
in the vision tower's selected layer, sorted per image; the knee of the descending curve is the
point farthest from the chord joining its first and last points, and the patches past the knee
are dropped. Each image keeps its own number of tokens (clamped to ``[min_keep, max_keep]``).

Stage 2 (after LLM layer ``llm_layer``): the surviving vision tokens are ranked by their relevance
to the instruction text (the ``key_text`` tokens) and the least relevant are dropped; optionally
the least relevant prompt text tokens too.

The seed is an abstract only; where it is silent we chose (and say so here):

* similarity = cosine between the selected layer's hidden states (LLaVA's ``vision_feature_layer``,
  before the projector), CLS first in ``ctx.vision_hidden``;
* knee = argmax of the vertical distance below the chord of the descending-sorted curve (equal to
  the perpendicular distance up to a per-curve constant, so invariant to scaling either axis); the
  knee patch itself is kept (count = knee index + 1); a curve with no point below its chord (no long
  tail) keeps every patch; ties go to the first index;
* stage-2 relevance: ``"cosine"`` = mean cosine similarity of a token's hidden state (output of
  ``llm_layer``) with the prompt text tokens' hidden states (cheap, default), or ``"attention"`` =
  mean attention (over heads and prompt-text queries) it receives in that layer (one extra query
  row per prompt token);
* stage-2 keep ratio counts the vision tokens alive after stage 1 (``ratio_of="alive"``, default: the
  stage-1 count is dynamic) or the original ones (``"original"``, the package's convention);
* text pruning (off by default) only ever drops prompt (``key_text``) tokens, never the first valid
  token (the attention sink, usually ``<s>``) nor the last prompt token (it predicts the first answer
  token, FastV's query), and never answer tokens or later turns (they are not ``key_text``), so
  ``PrunedLlava.label_logits`` still finds every answer token and its predecessor.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_lvp.methods.base import PruningMethod, StageContext, keep_counts, topk_keep
from lightning_lvp.state import SeqState, pack_index


def find_knee(curve: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Knee of descending-sorted curves: the point farthest below the chord from first to last point.

    Args:
        curve: (B, M) or (M,) values sorted in descending order; entries at or past ``lengths[b]`` are ignored.
        lengths: (B,) number of points of each curve (default: all M).

    Returns:
        (B,) or () long: knee index per curve; ``lengths - 1`` where no point lies below the chord
        (a straight or concave curve has no long tail).
    """
    squeeze = curve.dim() == 1
    y = curve.double().reshape(-1, curve.shape[-1])  # (B, M)
    b, m = y.shape
    n = torch.full((b,), m, device=y.device) if lengths is None else lengths.to(y.device).long().reshape(b)
    x = torch.arange(m, device=y.device, dtype=y.dtype)[None, :]
    last = y.gather(1, (n - 1).clamp(min=0)[:, None])  # (B, 1)
    slope = (last - y[:, :1]) / (n - 1).clamp(min=1)[:, None].to(y.dtype)
    below = (y[:, :1] + slope * x) - y  # chord minus curve, (B, M)
    below = below.masked_fill(x >= n[:, None], float("-inf"))
    best, knee = below.max(1)  # first index among ties
    tol = 1e-9 * (y[:, 0] - last[:, 0]).abs()  # a straight line is "below" only by rounding
    knee = torch.where(best > tol, knee, n - 1)
    return knee[0] if squeeze else knee


def resolve_count(spec: int | float, n: torch.Tensor) -> torch.Tensor:
    """(B,) token count of a bound: an int is a count, a float a fraction of ``n`` (rounded, >= 1)."""
    if isinstance(spec, float):
        return torch.floor(spec * n.double() + 0.5).long().clamp(min=1)
    return torch.full_like(n, int(spec)).clamp(min=1)


def _check_bound(name: str, value: int | float) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, float) and 0.0 < value <= 1.0
    )
    if not ok:
        raise ValueError(f"{name} must be an int count >= 1 or a float fraction in (0, 1], got {value!r}")


def cls_similarity(vision_hidden: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, Dv) selected-layer states, CLS first -> (B, N) cosine similarity of each patch to CLS."""
    v = vision_hidden.float()
    return F.cosine_similarity(v[:, 1:], v[:, :1], dim=-1)


def patch_cls_similarity(ctx: StageContext) -> torch.Tensor:
    """(B, N) similarity to CLS: the family's (``ctx.cls_similarity``; per crop on LLaVA-NeXT) or column 0's."""
    return ctx.cls_similarity() if ctx.cls_similarity is not None else cls_similarity(ctx.vision_hidden)


def slot_values(per_patch: torch.Tensor, state: SeqState) -> torch.Tensor:
    """(B, N) per-patch values -> (B, L) over the current slots (``-inf`` at non-vision slots)."""
    vals = per_patch.gather(1, state.patch_index.clamp(min=0))
    return vals.masked_fill(~state.alive_vision, float("-inf"))


class ClsKneePruning(PruningMethod):
    """Two-stage CLS-similarity knee pruning (seed 002; choices where it is silent: module docstring).

    Args:
        llm_layer: LLM layer (1-based) after which stage 2 runs; None = stage 1 only.
        keep_ratio: stage-2 kept fraction of the vision tokens (see ``ratio_of``).
        min_keep: lower bound of the stage-1 count: int = tokens, float = fraction of the original ones.
        max_keep: upper bound of the stage-1 count, same convention (``min_keep`` wins if they cross).
        relevance: stage-2 relevance to the prompt text: "cosine" (hidden-state similarity) or
            "attention" (attention received from the prompt tokens in layer ``llm_layer``).
        ratio_of: "alive" = ``keep_ratio`` is a fraction of the vision tokens that survived stage 1;
            "original" = of the original vision tokens (the package's convention).
        text_keep_ratio: stage-2 kept fraction of the prunable prompt text tokens; None = keep all text.
    """

    def __init__(
        self,
        llm_layer: int | None = 2,
        keep_ratio: float = 0.5,
        min_keep: int | float = 0.05,
        max_keep: int | float = 1.0,
        relevance: Literal["cosine", "attention"] = "cosine",
        ratio_of: Literal["alive", "original"] = "alive",
        text_keep_ratio: float | None = None,
    ):
        if llm_layer is not None and (not isinstance(llm_layer, int) or llm_layer < 1):
            raise ValueError(f"llm_layer must be an LLM layer >= 1 or None, got {llm_layer!r}")
        layers, ratios = ([0], [None]) if llm_layer is None else ([0, llm_layer], [None, keep_ratio])
        super().__init__(layers, ratios)
        _check_bound("min_keep", min_keep)
        _check_bound("max_keep", max_keep)
        if type(min_keep) is type(max_keep) and min_keep > max_keep:
            raise ValueError(f"min_keep ({min_keep}) must be <= max_keep ({max_keep})")
        if relevance not in ("cosine", "attention"):
            raise ValueError(f"relevance must be 'cosine' or 'attention', got {relevance!r}")
        if ratio_of not in ("alive", "original"):
            raise ValueError(f"ratio_of must be 'alive' or 'original', got {ratio_of!r}")
        if text_keep_ratio is not None and not 0.0 < text_keep_ratio <= 1.0:
            raise ValueError(f"text_keep_ratio must be in (0, 1] or None, got {text_keep_ratio!r}")
        self.min_keep, self.max_keep = min_keep, max_keep
        self.relevance, self.ratio_of, self.text_keep_ratio = relevance, ratio_of, text_keep_ratio

    # ------------------------------------------------------------------------------- stage 1
    def knee_counts(self, sims: torch.Tensor, state: SeqState) -> torch.Tensor:
        """(B,) stage-1 counts: knee index + 1 of the sorted slot similarities, clamped to the bounds."""
        alive = state.alive_vision
        n_alive = alive.sum(1)
        curve = sims.masked_fill(~alive, float("-inf")).sort(1, descending=True).values
        counts = find_knee(curve, n_alive) + 1
        lo = resolve_count(self.min_keep, state.n_vision)
        hi = torch.maximum(resolve_count(self.max_keep, state.n_vision), lo)
        return torch.minimum(counts.clamp(min=lo, max=hi), n_alive)

    def _stage1(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        if ctx.vision_hidden is None and ctx.cls_similarity is None:  # the family's raises if it has no CLS
            raise ValueError("ClsKneePruning stage 1 needs ctx.vision_hidden (the vision tower's selected layer)")
        sims = slot_values(patch_cls_similarity(ctx), state)
        # A number here replaces the knee by a fixed fraction (CLS top-k ablation).
        counts = self.knee_counts(sims, state) if ratio is None else keep_counts(ratio, state.n_vision, ctx.stage)
        return topk_keep(sims, state.alive_vision, counts)

    # ------------------------------------------------------------------------------- stage 2
    def _cosine_relevance(self, state: SeqState) -> torch.Tensor:
        """(B, L) mean cosine similarity of each slot with the prompt text tokens (self excluded)."""
        keys = (state.key_text & state.valid).float()  # (B, L)
        h = F.normalize(state.hidden.float(), dim=-1)  # (B, L, D)
        total = h @ (h * keys[..., None]).sum(1, keepdim=True).transpose(1, 2)  # (B, L, 1)
        self_term = keys  # a key's similarity with itself is 1
        n_other = keys.sum(1, keepdim=True) - keys
        return (total.squeeze(-1) - self_term) / n_other.clamp(min=1)

    def _attention_relevance(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        """(B, L) mean attention received from the prompt text queries (self excluded, over the
        queries that may see the slot under the causal mask)."""
        if ctx.attention_row is None:
            raise ValueError("relevance='attention' needs ctx.attention_row (stage 2 must follow an LLM layer)")
        qi, qvalid = pack_index(state.key_text & state.valid)  # (B, Nq)
        b, length = state.valid.shape
        received = state.hidden.new_zeros(b, length, dtype=torch.float32)
        seen = torch.zeros_like(received)
        slots = torch.arange(length, device=qi.device)[None, :]
        for j in range(qi.shape[1]):
            q = qi[:, j]
            w = qvalid[:, j].float()[:, None]
            visible = ((slots <= q[:, None]) & (slots != q[:, None])).float() * w  # causal, not self
            received += ctx.attention_row(q).float().mean(1) * visible
            seen += visible
        return received / seen.clamp(min=1)

    def relevance_scores(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        """(B, L) relevance of every slot to the prompt text (higher = keep)."""
        if self.relevance == "attention":
            return self._attention_relevance(state, ctx)
        return self._cosine_relevance(state)

    def prunable_text(self, state: SeqState) -> torch.Tensor:
        """(B, L) prompt text slots that text pruning may drop (never the first valid slot nor the
        last prompt token; answers and later turns are not ``key_text``)."""
        keys = state.key_text & state.valid & ~state.vision
        slots = torch.arange(keys.shape[1], device=keys.device)[None, :]
        last_key = torch.where(keys, slots, -1).max(1, keepdim=True).values
        first_valid = torch.where(state.valid, slots, keys.shape[1]).min(1, keepdim=True).values
        return keys & (slots != last_key) & (slots != first_valid)

    def _stage2_counts(self, state: SeqState, ctx: StageContext, ratio: float) -> torch.Tensor:
        if self.ratio_of == "original":
            return keep_counts(ratio, state.n_vision, ctx.stage)
        return torch.floor(ratio * state.alive_vision.sum(1).double() + 0.5).long().clamp(min=1)

    def _stage2(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        if ratio is None:
            raise ValueError(f"ClsKneePruning needs a keep ratio at stage {ctx.stage} (stage 2)")
        scores = self.relevance_scores(state, ctx)
        keep = topk_keep(scores, state.alive_vision, self._stage2_counts(state, ctx, ratio))
        text = state.valid & ~state.vision
        if self.text_keep_ratio is None:
            return keep | text
        prunable = self.prunable_text(state)
        n_text = torch.floor(self.text_keep_ratio * prunable.sum(1).double() + 0.5).long()
        return keep | (text & ~prunable) | topk_keep(scores, prunable, n_text)

    def select(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        if ctx.stage == 0:
            return self._stage1(state, ctx, ratio) | (state.valid & ~state.vision)
        return self._stage2(state, ctx, ratio)

    def scores(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        """Stage 1: CLS similarity per slot; stage 2: relevance to the prompt text."""
        if ctx.stage == 0:
            return slot_values(patch_cls_similarity(ctx), state)
        return self.relevance_scores(state, ctx)
