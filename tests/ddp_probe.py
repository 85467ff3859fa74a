"""Callback used by test_ddp.py: writes each rank's un-reduced training values per step."""

import json
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, **pl_module.last_step_values}) + "\n")
