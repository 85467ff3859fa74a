"""What every LightningModule of this package shares: optimizer + LR schedule, atomic checkpoints, the
always-on callbacks, and the RNG states that make a resumed run match an uninterrupted one.

:class:`~lightning_lvp.training.module.LVPModule` (pruners on a frozen base) and
:class:`~lightning_lvp.training.demo_base.DemoBaseModule` (the CPU demo's base, from scratch) subclass
:class:`TrainingModule`; each keeps only its own model, steps and losses.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def warmup_cosine(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 0 (LLaVA / HF ``cosine``) or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingModule(L.LightningModule):
    """Base of the package's LightningModules. Subclasses set ``self.optimizer_fn`` and have the
    hyperparameters ``warmup_ratio`` (fraction of the steps with linear warm-up) and ``lr_schedule``
    (``"cosine"`` or ``"constant"``)."""

    def _record_config(self, **built: dict[str, Any] | None) -> None:
        """Stores the class_path/init_args configs of the init args that ``save_hyperparameters`` ignored.

        ``fit --ckpt_path`` in LightningCLI 2.6 re-parses the model's init args from the checkpoint's
        ``hyper_parameters`` (``LightningCLI._parse_ckpt_path``), so they must hold the WHOLE model config:
        without ``method`` the resumed run failed with "model.method is required", without ``optimizer``
        AdamW fell back to its defaults. Built by the CLI, the configs it gave are kept as they are; built
        in Python, each ``built`` spec (e.g. ``method=method_spec(method)``) is stored (the optimizer, a
        callable, is not).
        """
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters  # set by LightningCLI

        given = _given_hyperparameters.get() or {}
        for name, spec in built.items():
            self.hparams[name] = given.get(name, spec)
        if "optimizer" in given:
            self.hparams["optimizer"] = given["optimizer"]
        self._hparams_initial = copy.deepcopy(self._hparams)

    # -------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: is model.method set?")
        optimizer = self.optimizer_fn(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(self.hparams.warmup_ratio * total)) if self.hparams.warmup_ratio > 0 else 0  # >= 1 step
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, self.hparams.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------- run set-up and resume state
    def setup(self, stage: str) -> None:
        """Checkpoints are written atomically (a kill during a save never destroys ``last.ckpt``) and an
        unreadable one fails naming the file: :class:`~lightning_lvp.training.checkpoint_io.AtomicCheckpointIO`
        replaces the strategy's default ``TorchCheckpointIO`` (a plugin the user chose is kept)."""
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from lightning_lvp.training.checkpoint_io import AtomicCheckpointIO

        strategy = self.trainer.strategy
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def configure_callbacks(self) -> list[L.Callback]:
        """Always on: the bad-sample report (:class:`~lightning_lvp.data.skips.SkipReport`); for a
        step-based run, a progress bar counting steps instead of ``Epoch 0/-2``."""
        from lightning.pytorch.callbacks import RichProgressBar

        from lightning_lvp.data.skips import SkipReport
        from lightning_lvp.training.progress import StepProgressBar, step_based

        callbacks: list[L.Callback] = [SkipReport()]
        bar = self.trainer.progress_bar_callback
        if type(bar) is RichProgressBar and step_based(self.trainer):
            callbacks.append(StepProgressBar(leave=bar._leave, theme=bar.theme, console_kwargs=bar._console_kwargs))
        return callbacks

    def on_validation_epoch_start(self) -> None:
        """Validation may draw random numbers (Gumbel noise in ``forward_train``) from the global RNG: it
        runs on a copy of the RNG state, so training continues with the same noise whether or not (and
        how often) it validated, and a resumed run matches an uninterrupted one."""
        from lightning_lvp.checkpoint import rng_states

        self._rng_outside_validation = rng_states()

    def on_validation_epoch_end(self) -> None:
        from lightning_lvp.checkpoint import set_rng_states

        states, self._rng_outside_validation = getattr(self, "_rng_outside_validation", None), None
        if states is not None:
            set_rng_states(states)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """First batch after a resume: the RNG states of the moment the checkpoint was saved (the data order
        comes from the data module's own generators; this restores the Gumbel noise and dropout)."""
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states is not None:
            from lightning_lvp.checkpoint import set_rng_states

            set_rng_states(states)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The RNG states (those of training when saved during validation) for an exact resume."""
        from lightning_lvp.checkpoint import rng_states

        outside = getattr(self, "_rng_outside_validation", None)
        checkpoint["rng_states"] = outside or rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")  # applied at the next training batch


def rename_prefix(state_dict: dict[str, Any], old: str, new: str) -> None:
    """Renames the keys ``old...`` of ``state_dict`` to ``new...`` in place (a key already under ``new``
    wins: checkpoints written while a module was registered twice hold both)."""
    for key in [k for k in state_dict if k.startswith(old)]:
        value = state_dict.pop(key)
        state_dict.setdefault(new + key[len(old) :], value)
