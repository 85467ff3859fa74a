"""``python -m lightning_lvp sweep -c CONFIG --pruners DIR_OR_CKPT``: accuracy and TFLOPs per schedule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lightning_lvp.commands.experiment import Experiment, run

DEFAULT_SCHEDULES = "paper:0.3:0.8:0.05"


def sweep(
    pruners: str,
    schedules: str | None = None,
    step: float = 0.2,
    min_ratio: float = 0.05,
    include_base: bool = True,
    model_path: str | None = None,
    max_batches: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    out: str = "runs/sweep",
    overwrite: bool = False,
    structure: Literal["keep", "prune"] | None = None,
    experiment: Experiment | None = None,
) -> int:
    """Evaluates a list or range of inference schedules on the config's validation data ("how far can I prune?").

    Token-removing inference path; per schedule the accuracy, TFLOPs, kept vision tokens per stage and
    latency (and relevance diagnostics on data with relevant patches) go to results.csv / results.json,
    acc_vs_tflops.png and TensorBoard in out. Resumable: rows measured with the same settings are reused.

    Args:
        pruners: exported pruner folder, a training checkpoint (.ckpt / DeepSpeed folder) or a training-free
            method by name (e.g. divprune).
        schedules: schedules in the common syntax (lightning_lvp/schedules.py): 0.5,0.3,0.1 or paper:0.5 or
            paper:0.3:0.8:0.05, ';' between several; default: the config's RatioSweep callback (schedules,
            else rhos by the paper's rule), else paper:0.3:0.8:0.05.
        step: ratio decrease per stage of the paper rule: [rho, rho-step, rho-2*step].
        min_ratio: floor of the paper rule's stage ratios.
        include_base: also evaluate the unpruned model.
        model_path: base model folder (default: the config's model.init_args.model_path).
        max_batches: validation batches per schedule (default: all).
        batch_size: validation batch size (overrides data.init_args.val_batch_size).
        num_workers: data loader workers (overrides data.init_args.num_workers).
        out: output folder (resumed if it holds results of the same settings).
        overwrite: discard results of other settings in out.
        structure: policy for image tokens that are not patches (LLaVA-NeXT's image_newline tokens, docs/FAMILIES.md):
            keep (structure, never pruned) or prune (like patches); default: the config's model.init_args.structure,
            else keep.
    """
    import torch

    from lightning_lvp.model import PrunedLlava
    from lightning_lvp.sweep import RESULTS, format_table, measurement_settings, run_sweep

    experiment = experiment or Experiment()
    path = experiment.model_path(model_path, "sweep")
    structure = experiment.structure(structure)
    model = PrunedLlava.from_pretrained(path, pruners, structure=structure)
    loader = experiment.datamodule(path, val_batch_size=batch_size, num_workers=num_workers).val_dataloader()
    scheds = experiment.schedules(schedules, model.method.num_stages, DEFAULT_SCHEDULES, step, min_ratio)
    settings = measurement_settings(
        experiment.config_path(), pruners, path, batch_size=batch_size, max_batches=max_batches
    )
    if structure != "keep":  # (absent for the default: results of earlier runs stay reusable)
        settings["structure"] = structure
    if experiment.overrides():  # --model.* / --data.* on the command line change what is measured
        settings["overrides"] = experiment.overrides()
    with torch.no_grad():  # not torch.set_grad_enabled(False): sweep() called in-process must not leak it
        rows = run_sweep(model, loader, scheds, settings, out, include_base, max_batches, overwrite)
    print(format_table(rows))
    out = Path(out)
    print(f"results: {out / RESULTS}, {out / 'results.csv'}, {out / 'acc_vs_tflops.png'}")
    return 0


RENAMED = {
    "--rhos": "--schedules paper:START:STOP:STEP (or paper:0.6,0.5)",
    "--schedule": "--schedules (one value, ';' between schedules)",
    "--no_base": "--include_base false",
    "--config-file": "-c",
}


def main(argv: Sequence[str]) -> int:
    return run(sweep, argv, "python -m lightning_lvp sweep", renamed=RENAMED, lists={"--schedules": ";"})
