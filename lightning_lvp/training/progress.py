"""A progress bar that counts optimizer steps in step-based runs (``trainer.max_steps``).

Lightning's ``RichProgressBar`` labels its bar ``Epoch {e}/{max_epochs - 1}``, which reads ``Epoch 0/-2``
when ``max_epochs`` is -1 (step-based training, as the demo), and counts the batches of the epoch.
:class:`StepProgressBar` shows ``Step (epoch e)`` with ``global_step / max_steps`` instead;
:class:`~lightning_lvp.training.module.LVPModule` swaps it in for a default rich bar of a step-based run.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def step_based(trainer: L.Trainer) -> bool:
    """True when training stops at ``max_steps`` and not at an epoch count."""
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar shows optimizer steps out of ``max_steps`` in step-based runs."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if step_based(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not step_based(self.trainer):
            return super()._get_train_description(current_epoch)
        description = f"Step (epoch {current_epoch})"
        return f"{description:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if step_based(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()
