"""Reporting bad samples during fit: per-epoch counts, TensorBoard scalars, a summary and the ids on disk.

:class:`SkipReport` reads what the data module recorded (``LlavaDataModule.filter_reports`` for the
entries dropped when the JSON was read, ``LlavaDataModule.tallies`` for the samples skipped when they
were loaded) and

* at the end of every training epoch and every validation run logs the skips per reason at WARNING
  and as TensorBoard scalars ``skipped/<split>`` (total) and ``skipped/<split>/<reason>``;
* writes every dropped or skipped entry as one JSON line ``{"split", "stage", "id", "file", "reason",
  "epoch", "step"}`` to ``skipped_entries.jsonl`` in the run's log folder (as soon as it is seen, so a
  killed run loses none) and prints the file's path;
* prints one summary line at the end of fit.

:class:`~lightning_lvp.training.module.LVPModule` adds it to every fit (``configure_callbacks``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)
JSONL = "skipped_entries.jsonl"


def format_counts(counts: Counter | dict) -> str:
    """``"reason=n, ..."`` sorted by reason (``"none"`` when empty)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def _gather(trainer: L.Trainer, counts: Counter) -> Counter:
    """The counts summed over the ranks (each rank loads its own shard)."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return Counter(counts)
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, dict(counts))
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


class SkipReport(L.Callback):
    """Reports the data module's dropped and skipped samples (see the module docstring).

    Works with any data module that has ``filter_reports`` (list of
    :class:`~lightning_lvp.data.llava_dataset.FilterReport`) and ``tallies`` (split ->
    :class:`~lightning_lvp.data.collate.SkipTally`); does nothing for others.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self._setup_written = False
        self._totals: dict[str, Counter] = {}

    # ------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _datamodule(trainer: L.Trainer):
        dm = getattr(trainer, "datamodule", None)
        return dm if dm is not None and hasattr(dm, "tallies") else None

    def _write(self, records: list[dict]) -> None:
        """Appends records to the JSONL file (flushed, so a kill keeps them)."""
        if not records or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def _drain(self, trainer: L.Trainer, split: str) -> None:
        """Writes the load-time skips of ``split`` recorded since the last call."""
        dm = self._datamodule(trainer)
        if dm is None or split not in dm.tallies:
            return
        tally = dm.tallies[split]
        records, tally.records[:] = list(tally.records), []
        stamp = {"stage": "load", "epoch": trainer.current_epoch, "step": trainer.global_step}
        self._write([{**r, **stamp} for r in records])

    # --------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = self._datamodule(trainer)
        log_dir = trainer.log_dir  # a collective under DDP: every rank calls it
        if dm is None or self._setup_written:
            return
        folder = Path(log_dir or trainer.default_root_dir)
        name = JSONL if trainer.global_rank == 0 else f"skipped_entries.rank{trainer.global_rank}.jsonl"
        self.path = folder / name
        self._setup_written = True
        dropped: Counter = Counter()
        records = []
        for report in getattr(dm, "filter_reports", []):
            dropped.update(report.dropped)
            records += [{"split": "setup", "stage": "setup", **e, "epoch": None, "step": None} for e in report.entries]
        if trainer.global_rank == 0 and records:
            self._write(records)
            log.warning(
                "dropped %d entries when reading the data (%s); their ids: %s",
                len(records),
                format_counts(dropped),
                self.path,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._drain(trainer, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._drain(trainer, "val")

    def _report(self, trainer: L.Trainer, split: str, when: str) -> None:
        dm = self._datamodule(trainer)
        if dm is None or split not in dm.tallies:
            return
        self._drain(trainer, split)
        counts = _gather(trainer, dm.tallies[split].epoch)
        if not trainer.is_global_zero:
            return
        self._totals.setdefault(split, Counter()).update(counts)
        n = sum(counts.values())
        if n:
            log.warning(
                "%s %s: skipped %d bad samples (%s); ids in %s", split, when, n, format_counts(counts), self.path
            )
        if trainer.logger is not None:
            metrics = {f"skipped/{split}": float(n), **{f"skipped/{split}/{k}": float(v) for k, v in counts.items()}}
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "train", f"epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "val", f"at step {trainer.global_step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._datamodule(trainer)
        if dm is None:
            return
        if not trainer.is_global_zero:
            return
        dropped: Counter = Counter()
        for report in getattr(dm, "filter_reports", []):
            dropped.update(report.dropped)
        parts = [f"dropped when reading {sum(dropped.values())} ({format_counts(dropped)})"]
        for split in ("train", "val"):
            total = self._totals.get(split, Counter())
            parts.append(f"{split} skipped {sum(total.values())} ({format_counts(total)})")
        where = f"; ids in {self.path}" if self.path is not None and self.path.exists() else ""
        print(f"Bad samples in this fit: {'; '.join(parts)}{where}")
