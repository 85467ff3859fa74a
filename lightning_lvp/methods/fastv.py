"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"), training-free.

After LLM layer K the vision tokens are ranked by the attention they receive from the last prompt
token in layer K (mean over heads) and only the top ones go on. The scores are one softmax row
recomputed from layer K's input (``ctx.attention_row``), so every layer, layer K included, still
runs SDPA and no attention matrix is materialised.
"""

from __future__ import annotations

import torch

from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.state import SeqState


def last_prompt_index(state: SeqState) -> torch.Tensor:
    """(B,) slot of the last prompt token (last ``key_text & valid`` slot; the last slot if none).

    With an answer in the sequence (teacher-forced evaluation) this is the token that predicts the
    first answer token, so the ranking never sees the answer; in generation it is the last slot.
    """
    keys = state.key_text & state.valid
    slots = torch.arange(keys.shape[1], device=keys.device)[None, :]
    last = torch.where(keys, slots, -1).max(1).values
    return torch.where(last >= 0, last, keys.shape[1] - 1)


class FastV(PruningMethod):
    """Keep the vision tokens most attended by the last prompt token after layer ``k``.

    Args:
        k: LLM layer (1-based) whose attention ranks the tokens; pruning takes effect from layer k+1
            (FastV's K = 2).
        keep_ratio: kept fraction of the original vision tokens (FastV's R is the pruned share:
            R = 50 % is keep_ratio = 0.5).
    """

    def __init__(self, k: int = 2, keep_ratio: float = 0.5):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an LLM layer >= 1 (FastV ranks with that layer's attention), got {k!r}")
        super().__init__([k], [keep_ratio])

    def scores(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        """(B, L) attention from the last prompt token to every slot, mean over heads."""
        if ctx.attention_row is None:
            raise ValueError("FastV needs ctx.attention_row (it must run after an LLM layer)")
        return ctx.attention_row(last_prompt_index(state)).float().mean(1)
