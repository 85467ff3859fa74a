"""Token layout carried through the LLM, and the gather that removes tokens. Pure PyTorch.

After a removal every sample is re-packed to the same length L' (the largest kept count in the
batch) with filler slots on the LEFT marked ``valid=False``; kept tokens keep their ORIGINAL
position ids and their order (METHOD §4), so the last column is always the last real token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


def pack_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row, right-aligned, in order.

    Args:
        mask: (B, L) bool.

    Returns:
        index (B, K) long and valid (B, K) bool with K = max row count; rows with fewer entries are
        filled on the left with indices of False entries (``valid=False``).
    """
    k = int(mask.sum(1).max().item()) if mask.numel() else 0
    # Stable ascending sort of 0/1 keys puts the False entries first and the True ones last, each in order.
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, mask.shape[1] - k :]
    return order, mask.gather(1, order)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for x of shape (B, L, ...) and index (B, K) -> (B, K, ...)."""
    if x.dim() == 2:
        return x.gather(1, index)
    expanded = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


@dataclass
class SeqState:
    """Hidden states and token layout of the current (possibly pruned) sequence.

    Attributes:
        hidden: (B, L, D) hidden states.
        position_ids: (B, L) ORIGINAL rotary positions.
        valid: (B, L) bool, False for padding and filler slots.
        vision: (B, L) bool, True for (alive) vision tokens.
        key_text: (B, L) bool, text tokens the pruner may use as keys (the prompt by default).
        orig_index: (B, L) index of each slot in the input sequence.
        patch_index: (B, L) index of the image patch a vision slot came from, -1 for text.
        n_vision: (B,) number of vision tokens each sample had on entry (ratios refer to it).
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor
    vision: torch.Tensor
    key_text: torch.Tensor
    orig_index: torch.Tensor
    patch_index: torch.Tensor
    n_vision: torch.Tensor

    @property
    def alive_vision(self) -> torch.Tensor:
        """(B, L) bool: vision tokens still present."""
        return self.vision & self.valid

    def select(self, keep: torch.Tensor) -> SeqState:
        """Physically removes the tokens where ``keep`` is False (one gather per field).

        Args:
            keep: (B, L) bool over the current slots; filler/padding slots are dropped as well.

        Returns:
            The re-packed state of length max_b(kept_b).
        """
        index, valid = pack_index(keep & self.valid)
        per_token = {
            f.name: gather_rows(getattr(self, f.name), index)
            for f in fields(self)
            if f.name not in ("n_vision", "valid")
        }
        new = replace(self, valid=valid, **per_token)
        new.vision = new.vision & valid
        new.key_text = new.key_text & valid
        return new


def consecutive_positions(valid: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Positions renumbered 0, 1, 2, ... over the valid slots, shifted so the last slot gets ``end``.

    The layout of methods whose authors renumber the positions after removing tokens before the
    LLM (VisionZip, DivPrune). Rotary attention depends only on position differences, so this is
    their layout, while the last token (and every token generated after it) keeps its original
    position: the cached decode path needs no change.

    Args:
        valid: (B, L) bool, rows left-packed.
        end: (B, 1) original position of each row's last token.

    Returns:
        (B, L) positions (``end`` minus the number of valid slots after each slot; arbitrary on fillers).
    """
    if end.dim() != 2:
        raise ValueError(
            "renumbered positions (the VisionZip / DivPrune layout) are defined for 1-D RoPE: M-RoPE (t, h, w) "
            f"positions (Qwen2.5-VL) cannot be renumbered, got end of shape {tuple(end.shape)}"
        )
    later = valid.flip(1).long().cumsum(1).flip(1) - valid.long()
    return end - later


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions for left- or right-padded rows: cumsum(mask) - 1, 0 on padding.

    Llama with ``position_ids=None`` would use arange and ignore left padding (FACTS).
    """
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def causal_mask(valid_keys: torch.Tensor, query_len: int) -> torch.Tensor:
    """Boolean attention mask (True = may attend) over the current slots.

    The queries are the last ``query_len`` slots. Causality follows slot order (kept tokens keep
    their order, so this is the original causal order). Every query may attend to itself, so rows
    of padding queries never become empty (their outputs are unused).

    Args:
        valid_keys: (B, Lk) bool.
        query_len: number of query slots (Lk for prefill, 1 for a decode step).

    Returns:
        (B, 1, query_len, Lk) bool.
    """
    lk = valid_keys.shape[1]
    device = valid_keys.device
    q_pos = torch.arange(lk - query_len, lk, device=device)[:, None]
    k_pos = torch.arange(lk, device=device)[None, :]
    causal = k_pos <= q_pos  # (Lq, Lk)
    mask = causal[None] & valid_keys[:, None, :]
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]
