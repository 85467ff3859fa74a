"""Old module path of :mod:`lightning_lvp.training.callbacks` (kept so saved LightningCLI configs with
``class_path: lightning_lvp.callbacks.RatioSweep`` / ``PruningPictures`` and user code still load)."""

from lightning_lvp.schedules import PAPER_RHOS, paper_schedule, paper_schedules
from lightning_lvp.training.callbacks import (
    PruningPictures,
    RatioSweep,
    count_schedule_flops,
    draw_pruning,
    format_sweep,
    gather_relevance,
    question_text,
    schedule_name,
)

__all__ = [
    "PAPER_RHOS",
    "PruningPictures",
    "RatioSweep",
    "count_schedule_flops",
    "draw_pruning",
    "format_sweep",
    "gather_relevance",
    "paper_schedule",
    "paper_schedules",
    "question_text",
    "schedule_name",
]
