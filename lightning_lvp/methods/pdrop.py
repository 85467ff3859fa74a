"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models
via Pyramid Visual Redundancy Reduction"), training-free (inference-only) mode.

The LLM is split into stages at ``layers`` (paper: 8, 16, 24 of 32). At the end of each stage the
vision tokens are ranked by the attention they receive from the LAST INSTRUCTION token (mean over
heads) and a fraction lambda of them is kept, so after stage s a fraction lambda^s of the original
vision tokens remains (paper: lambda = 0.5).

Checked against the authors' code (github.com/Cooperx521/PyramidDrop,
``llava/model/modeling_llama_pdrop.py``, ``pdrop_rank_drop``): the attention is computed with the
query/key projections of the layer that FOLLOWS the stage boundary (``self.layers[rank_layer]``)
applied to the boundary's hidden states (``ctx.next_attention_row``; FastV instead uses the
attention of the layer just run), softmax over all keys under the causal mask, then the image
columns; the query at inference is the last prompt token. Where we differ: counts are
k_s = round(lambda^s N) (theirs ``int(N lambda^s)``, equal whenever lambda^s N is an integer, as
for 576 x 0.5^s); positions stay original as everywhere in the framework.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.methods.fastv import last_prompt_index
from lightning_lvp.state import SeqState


def pyramid_ratios(lam: float, stages: int) -> list[float]:
    """[lambda, lambda^2, ..., lambda^stages]: kept fraction of the original vision tokens after each stage."""
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"PyramidDrop lambda must be in (0, 1], got {lam}")
    return [lam ** (s + 1) for s in range(stages)]


class PyramidDrop(PruningMethod):
    """Stage-wise drop ranked by the last instruction token's attention (training-free mode).

    Args:
        layers: stage boundaries (LLM layers, 1-based, each >= 1); paper: (8, 16, 24) for 32 layers.
        lam: kept fraction per stage lambda; the schedule is lambda^s of the original tokens.
        keep_ratios: explicit kept fractions per boundary instead of ``lam`` (non-increasing).
    """

    def __init__(
        self, layers: Sequence[int] = (8, 16, 24), lam: float = 0.5, keep_ratios: Sequence[float] | None = None
    ):
        layers = list(layers)
        if any(not isinstance(x, int) or x < 1 for x in layers):
            raise ValueError(f"PyramidDrop layers must be LLM layers >= 1 (it ranks with the next layer), got {layers}")
        ratios = pyramid_ratios(lam, len(layers)) if keep_ratios is None else list(keep_ratios)
        super().__init__(layers, ratios)
        self.lam = float(lam)

    def scores(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        """(B, L) attention of the last prompt token in the next layer, mean over heads."""
        if ctx.next_attention_row is None:
            raise ValueError("PyramidDrop needs ctx.next_attention_row (a stage boundary before the last LLM layer)")
        return ctx.next_attention_row(last_prompt_index(state)).float().mean(1)
