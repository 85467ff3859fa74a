"""Floors for the comparison: random and uniform (spatial-stride) vision-token pruning."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.state import SeqState


class RandomPruning(PruningMethod):
    """Keeps a random subset of the alive vision tokens at each point.

    Every call draws one random value per (batch row, patch) from a generator seeded with ``seed``
    and keeps the highest; the result depends only on the seed, the row and the patch index, not on
    the slot layout (so a cached decode and a recomputation agree), and stages are nested (one
    random order per row). Row b gets the same order in every batch.

    Args:
        after_layers: pruning points (LLM layers, 1-based; 0 = LLM input).
        keep_ratios: kept fraction of the original vision tokens at each point.
        seed: seed of the per-call generator.
    """

    def __init__(
        self, after_layers: Sequence[int] = (1, 8, 16), keep_ratios: Sequence[float] = (0.5, 0.3, 0.1), seed: int = 0
    ):
        super().__init__(after_layers, keep_ratios)
        self.seed = int(seed)

    def scores(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        b = state.valid.shape[0]
        n = int(state.n_vision.max())
        gen = torch.Generator().manual_seed(self.seed)
        per_patch = torch.rand(b, max(n, 1), generator=gen).to(state.hidden.device)  # (B, N)
        return per_patch.gather(1, state.patch_index.clamp(min=0))


def uniform_keep(alive: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keeps ``counts[b]`` of the alive tokens of each row at evenly spaced ranks (in slot order).

    The i-th kept token is the one of rank floor((i + 0.5) * n / k) among the n alive ones (k <= n, so
    the ranks are distinct: the spacing n / k is at least 1).

    Args:
        alive: (B, L) bool candidates.
        counts: (B,) how many to keep (clamped to the candidates).

    Returns:
        (B, L) bool.
    """
    n = alive.sum(1)
    k = torch.minimum(counts, n)
    kmax = int(k.max()) if k.numel() else 0
    i = torch.arange(kmax, device=alive.device)[None, :]
    ranks = torch.floor((i + 0.5) * n[:, None].double() / k.clamp(min=1)[:, None].double()).long()  # (B, kmax)
    nmax = alive.shape[1]
    ranks = torch.where(i < k[:, None], ranks, nmax)  # unused columns go to a dump slot
    chosen = torch.zeros(alive.shape[0], nmax + 1, dtype=torch.bool, device=alive.device).scatter(1, ranks, True)
    rank_of_slot = (alive.long().cumsum(1) - 1).clamp(min=0)  # (B, L) rank among alive, in slot order
    return chosen.gather(1, rank_of_slot) & alive


class UniformPruning(PruningMethod):
    """Keeps the alive vision tokens at evenly spaced patch indices (a spatial stride in raster order).

    Slot order of the vision tokens is their patch order, so evenly spaced ranks are evenly spaced
    patch indices. In raster order a stride that divides the grid width keeps whole columns (e.g. 50 %
    of a 6x6 grid keeps columns 1, 3, 5); that is the plain stride baseline, kept as is.

    Args:
        after_layers: pruning points (LLM layers, 1-based; 0 = LLM input).
        keep_ratios: kept fraction of the original vision tokens at each point.
    """

    def __init__(self, after_layers: Sequence[int] = (1, 8, 16), keep_ratios: Sequence[float] = (0.5, 0.3, 0.1)):
        super().__init__(after_layers, keep_ratios)

    def select(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        keep = uniform_keep(state.alive_vision, self.counts(state, ctx, ratio))
        return (state.valid & ~state.vision) | keep
