"""Old module path of :mod:`lightning_lvp.training.progress` (kept for user code)."""

from lightning_lvp.training.progress import StepProgressBar, step_based

__all__ = ["StepProgressBar", "step_based"]
