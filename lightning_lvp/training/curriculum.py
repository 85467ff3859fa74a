"""Token-drop curriculum for training a tiny LLaVA from scratch on the digits grids.

Each training sample shows only ``n`` of its vision tokens (always the ones flagged in
``relevant_mask``, the others at random); hidden tokens are removed through the attention mask while
every token keeps its ORIGINAL position id. ``n`` grows by ``growth`` whenever the training accuracy
at the current ``n`` passes ``threshold`` (``docs/DATA.md``: without it position look-up from scratch
learns far slower; a fixed schedule failed).

Both the attention mask and the position ids must be given to the HF forward: with gapped position
ids and no mask, transformers reads the batch as packed sequences (``shared/FACTS.md``).
Pure torch, no Lightning.
"""

from __future__ import annotations

import math

import torch


def original_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of the unpruned sequence: ``cumsum(mask) - 1`` (0 at left padding).

    Args:
        attention_mask: (B, T) 1 = real token, 0 = padding.

    Returns:
        (B, T) Long.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def drop_vision_tokens(
    batch: dict, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hides all but ``n`` vision tokens per sample from attention, keeping the relevant ones.

    Args:
        batch: a collated batch with ``attention_mask`` and ``vision_mask`` (B, T) and optionally
            ``relevant_mask`` (B, T) Bool (those tokens are always kept, even beyond ``n``).
        n: vision tokens to keep per sample (relevant ones first, the rest drawn uniformly).
        generator: random source for the choice (on the batch's device).

    Returns:
        attention_mask: (B, T) Long, 0 at padding and at hidden vision tokens.
        position_ids: (B, T) Long, the original positions (computed from the unpruned mask).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    mask = batch["attention_mask"]
    position_ids = original_position_ids(mask)
    vision = batch["vision_mask"] & mask.bool()  # (B, T)
    relevant = batch.get("relevant_mask", torch.zeros_like(vision)) & vision
    scores = torch.rand(vision.shape, generator=generator, device=vision.device)  # random order among the others
    scores = torch.where(relevant, 2.0, scores).masked_fill(~vision, -1.0)
    ranks = scores.argsort(-1, descending=True).argsort(-1)  # (B, T) rank of each token, 0 = kept first
    keep_count = torch.clamp(relevant.sum(-1), min=n)  # (B,)
    hidden = vision & (ranks >= keep_count[:, None])
    return mask.masked_fill(hidden, 0), position_ids


class TokenDropCurriculum:
    """Grows the number of shown vision tokens as training accuracy allows.

    Accuracy is counted over windows of ``window`` training samples at the current ``n``; at the end
    of a window ``n`` becomes ``min(max_n, ceil(n * growth))`` when the accuracy passed ``threshold``,
    and the window restarts either way.

    Args:
        max_n: vision tokens per image (the curriculum is done once ``n`` reaches it).
        start_n: first ``n``. 1 (only the relevant tokens) lets the model learn to read a digit before it
            must find it; starting at 4 stayed at chance for 400 steps on the digits grids (docs/DATA.md).
        growth: factor applied to ``n`` at each step up.
        threshold: window accuracy that must be exceeded to step up.
        window: training samples per accuracy window.
    """

    def __init__(
        self, max_n: int, start_n: int = 1, growth: float = 1.5, threshold: float = 0.8, window: int = 256
    ) -> None:
        if max_n < 1 or not 1 <= start_n <= max_n:
            raise ValueError(f"need 1 <= start_n <= max_n, got start_n={start_n}, max_n={max_n}")
        if growth <= 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_n, self.growth, self.threshold, self.window = max_n, growth, threshold, window
        self.n = start_n
        self.correct = 0
        self.seen = 0

    @property
    def done(self) -> bool:
        """All vision tokens are shown."""
        return self.n >= self.max_n

    def update(self, correct: torch.Tensor) -> bool:
        """Counts a batch of per-sample results at the current ``n``.

        Args:
            correct: (B,) Bool, e.g. from ``answer_accuracy``.

        Returns:
            True when ``n`` grew.
        """
        self.correct += int(correct.sum())
        self.seen += correct.numel()
        if self.seen < self.window:
            return False
        passed = self.correct / self.seen > self.threshold and not self.done
        if passed:
            self.n = min(self.max_n, math.ceil(self.n * self.growth))
        self.correct = self.seen = 0
        return passed

    def apply(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``drop_vision_tokens(batch, self.n)``; the unchanged mask and original positions once done."""
        if self.done:
            return batch["attention_mask"], original_position_ids(batch["attention_mask"])
        return drop_vision_tokens(batch, self.n, generator)

    def state_dict(self) -> dict:
        """Everything needed to resume (n and the current window's counts)."""
        return {"n": self.n, "correct": self.correct, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output."""
        self.n, self.correct, self.seen = int(state["n"]), int(state["correct"]), int(state["seen"])
