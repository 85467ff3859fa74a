"""Old module path of :mod:`lightning_lvp.training.curriculum` (kept for user code)."""

from lightning_lvp.training.curriculum import TokenDropCurriculum, drop_vision_tokens, original_position_ids

__all__ = ["TokenDropCurriculum", "drop_vision_tokens", "original_position_ids"]
