"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning"), training-free.

The kept vision tokens solve a Max-Min Diversity Problem greedily (paper Alg. 1) in the cosine
distance ``d(i, j) = 1 - cos(x_i, x_j)`` of the tokens' hidden states at the pruning point (the
LLM input embeddings, i.e. the projected image features, by default): the first token is the one
whose nearest neighbour is farthest, each next one the candidate whose distance to the selected
set (its nearest selected token) is largest. Text-agnostic.

Checked against the authors' code (github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``):
the first pick's score is the SECOND smallest entry of each column of the distance matrix (the
smallest is the token's distance to itself), ties go to the first index (``argmax``). Where we
differ, deliberately: already selected tokens are excluded from later picks (the authors rely on
their distance to themselves being 0, so exact duplicates could be picked twice and the kept
count fall short); the count is k = round(rho N) of the framework (theirs: Python's ``round``,
which differs only at exact halves); kept tokens keep their original positions by default
(METHOD §4); ``positions="consecutive"`` gives the authors' renumbering (golden outputs of their
code: ``tests/test_peers_golden.py``).
"""

from __future__ import annotations

import torch

from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.state import SeqState, consecutive_positions, gather_rows, pack_index


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L, L) pairwise cosine distances ``1 - cos``, in float32."""
    unit = x.float() / x.float().norm(dim=-1, keepdim=True)
    return 1.0 - unit @ unit.transpose(1, 2)


def max_min_diverse(features: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Greedy Max-Min diversity selection (DivPrune Alg. 1), batched with per-row counts.

    Args:
        features: (B, L, D) token features.
        candidates: (B, L) bool, the tokens that may be selected (only they count as neighbours).
        counts: (B,) how many to select per row (clamped to the number of candidates).

    Returns:
        (B, L) bool, the selected tokens.
    """
    index, candidates_packed = pack_index(candidates)  # the candidates only: (B, K) slots
    chosen = _max_min_packed(gather_rows(features, index), candidates_packed, counts)
    return torch.zeros_like(candidates).scatter(1, index, chosen) & candidates


def _max_min_packed(features: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`max_min_diverse` on packed rows (candidates right-aligned, fillers ``False``)."""
    dist = cosine_distances(features)  # (B, K, K), dist[b, i, j]
    counts = torch.minimum(counts, candidates.sum(1))
    inf = torch.tensor(float("inf"), device=dist.device)
    # Step 0: per column j, the second smallest distance over candidate rows i (nearest other token).
    over_rows = torch.where(candidates[:, :, None], dist, inf)
    score = over_rows.topk(min(2, dist.shape[1]), dim=1, largest=False).values[:, -1, :]  # (B, L)
    chosen = torch.zeros_like(candidates)
    rows = torch.arange(dist.shape[0], device=dist.device)
    nearest = None  # (B, L): distance of each token to its nearest selected token
    for step in range(int(counts.max()) if counts.numel() else 0):
        pick = score.masked_fill(~candidates | chosen, float("-inf")).argmax(1)  # (B,) first index among ties
        active = step < counts
        chosen[rows[active], pick[active]] = True
        to_pick = dist[rows, pick]  # (B, L): row ``pick`` = distances from the new token
        nearest = to_pick if nearest is None else torch.minimum(nearest, to_pick)
        score = nearest
    return chosen & candidates


class DivPrune(PruningMethod):
    """Keep the most diverse vision tokens (max-min cosine distance), one stage.

    Args:
        keep_ratio: kept fraction of the original vision tokens.
        after_layer: pruning point; 0 = the LLM input (the paper's LLaVA setting), l = after LLM layer l.
        positions: "original" (the framework's convention) or "consecutive" (the authors' renumbering,
            :func:`~lightning_lvp.state.consecutive_positions`; LLM input only).
    """

    def __init__(self, keep_ratio: float = 0.098, after_layer: int = 0, positions: str = "original"):
        super().__init__([after_layer], [keep_ratio])
        if positions not in ("original", "consecutive"):
            raise ValueError(f"DivPrune positions must be 'original' or 'consecutive', got {positions!r}")
        if positions == "consecutive" and after_layer != 0:
            raise ValueError(
                "DivPrune positions='consecutive' needs after_layer=0 (no cached layer may change positions)"
            )
        self.positions = positions

    def select(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        keep = max_min_diverse(state.hidden, state.alive_vision, self.counts(state, ctx, ratio))
        return (state.valid & ~state.vision) | keep

    def apply(self, state: SeqState, ctx: StageContext, ratio: float | None) -> SeqState:
        new = state.select(self.select(state, ctx, ratio))
        if self.positions == "consecutive":
            end = state.position_ids[:, -1:]  # rows are left-packed: the last slot is the last token
            new.position_ids = torch.where(new.valid, consecutive_positions(new.valid, end), new.position_ids)
        return new
