"""``python -m lightning_lvp compare -c CONFIG --pruners PRUNERS --out DIR``: LVPruning vs the other methods."""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_lvp.commands.experiment import Experiment, run

DEFAULT_SCHEDULES = "paper:0.6,0.5,0.45"
PEERS = "visionzip,divprune,dart,pdrop"
NOTES = (
    "TFLOPs per sample (mean over the first --flops_samples samples, one at a time, LM head on the "
    "last position). Kept vision tokens: mean per sample after the last stage, and the kept fraction "
    "averaged over the LLM layers. FastV's keep ratio matches that layer mean of LVPruning at "
    "rho {rho:g}; random/uniform use LVPruning's points and schedule at rho {rho:g}. "
    "Peers (name_T): VisionZip, DivPrune (LLM input) and DART (after layer 2) keep the share T/576 of the "
    "vision tokens; PyramidDrop (layers L/4, L/2, 3L/4) has layer-mean kept share T/576 (rows it cannot reach "
    "are skipped). Kept vision counts image patches: VisionZip's CLS token (one more LLM token) is not one."
)


def validation_loader(
    experiment: Experiment, model_path: str, cache_dir: str = ".cache", batch_size: int | None = None,
    num_workers: int = 0,
):  # fmt: skip
    """The validation DataLoader of the config's data section (digits defaults without one)."""
    overrides: dict[str, Any] = {"num_workers": num_workers}
    if batch_size:
        overrides["val_batch_size"] = batch_size
    if experiment.data is None:
        from lightning_lvp.data.datamodule import LlavaDataModule

        experiment.data = {"class_path": f"{LlavaDataModule.__module__}.LlavaDataModule"}
        overrides["cache_dir"] = cache_dir
    return experiment.datamodule(model_path, **overrides).val_dataloader()


def compare(
    pruners: str,
    out: str,
    model_path: str | None = None,
    overwrite: bool = False,
    cache_dir: str = ".cache",
    batch_size: int | None = None,
    num_workers: int = 0,
    max_batches: int | None = None,
    flops_samples: int = 4,
    schedules: str | None = None,
    match_rho: float = 0.5,
    fastv_k: int = 2,
    knee_layer: int = 2,
    knee_keep_ratio: float = 0.5,
    knee_min_keep: int | float = 0.05,
    knee_max_keep: int | float = 1.0,
    seed: int = 0,
    peers: str = PEERS,
    peer_tokens: str = "64,128,192",
    device: str = "cpu",
    structure: Literal["keep", "prune"] | None = None,
    experiment: Experiment | None = None,
) -> int:
    """LVPruning vs the unpruned model, CLS-knee, FastV, random, uniform and the peer methods on one data set.

    Teacher-forced accuracy, TFLOPs and kept tokens per row on the config's validation data (digits
    defaults without a data section): comparison.{csv,json,md,png} in out. Exit code 2 when out holds a
    finished comparison or one of other settings (without --overwrite); an interrupted one is resumed.

    Args:
        pruners: LVPruning pruner folder (pruners.json) or a training checkpoint.
        out: output folder for comparison.{csv,json,md,png}.
        model_path: base model folder (default: the config's model.init_args.model_path).
        overwrite: replace result files of a previous run in out.
        cache_dir: digits cache folder when the config has no data section.
        batch_size: validation batch size (overrides data.init_args.val_batch_size).
        num_workers: DataLoader workers.
        max_batches: evaluate at most this many validation batches per row (default: all).
        flops_samples: samples the TFLOPs are averaged over (0: skip).
        schedules: LVPruning's schedules in the common syntax (lightning_lvp/schedules.py), e.g.
            paper:0.6,0.5,0.45 or 0.5,0.3,0.1; default: the config's RatioSweep callback, else
            paper:0.6,0.5,0.45.
        match_rho: LVPruning rho whose kept counts the FastV, random and uniform rows match.
        fastv_k: FastV: LLM layer whose attention ranks the tokens.
        knee_layer: CLS-knee: LLM layer of stage 2 (0 = stage 1 only).
        knee_keep_ratio: CLS-knee: stage-2 keep ratio.
        knee_min_keep: CLS-knee: stage-1 minimum (an int count or a fraction).
        knee_max_keep: CLS-knee: stage-1 maximum (an int count or a fraction).
        seed: seed of random pruning.
        peers: peer methods, a comma list ('' = none) of visionzip, divprune, dart, pdrop.
        peer_tokens: peer budgets as kept tokens of LLaVA-1.5's 576 (same share here), a comma list.
        device: torch device.
        structure: policy for image tokens that are not patches (LLaVA-NeXT's image_newline tokens, docs/FAMILIES.md):
            keep (structure, never pruned) or prune (like patches); default: the config's model.init_args.structure,
            else keep.
    """
    from lightning_lvp.compare import compare_settings, markdown_table, previous_rows, run_comparison, write_results
    from lightning_lvp.model import PrunedLlava

    experiment = experiment or Experiment()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    path = experiment.model_path(model_path, "compare")
    structure = experiment.structure(structure)
    options = {k: v for k, v in locals().items() if k in OPTIONS}
    settings = compare_settings(path, pruners, experiment.config_path(), options)
    if structure != "keep":  # (absent for the default: interrupted runs of before stay resumable)
        settings["structure"] = structure
    if experiment.overrides():
        settings["overrides"] = experiment.overrides()
    done, refusal = previous_rows(Path(out), settings, overwrite)
    if refusal:
        print(f"compare: {refusal}", file=sys.stderr)
        return 2
    pruned = PrunedLlava.from_pretrained(path, pruners, device=device, structure=structure)
    lvp = pruned.method
    loader = validation_loader(experiment, path, cache_dir, batch_size, num_workers)
    knee = dict(llm_layer=knee_layer or None, keep_ratio=knee_keep_ratio, min_keep=knee_min_keep,
                max_keep=knee_max_keep)  # fmt: skip
    meta = {
        "command": "python -m lightning_lvp compare " + shlex.join(experiment.argv),
        "model": path,
        "pruners": pruners,
        "settings": settings,
        "notes": NOTES.format(rho=match_rho),
    }
    skipped: list[dict[str, str]] = []  # rows the model's family cannot run (e.g. VisionZip without a CLS token)
    rows = run_comparison(
        pruned.llava,
        lvp,
        loader,
        match_rho=match_rho,
        fastv_k=fastv_k,
        knee_args=knee,
        seed=seed,
        max_batches=max_batches,
        flops_samples=flops_samples,
        peers=[x for x in peers.split(",") if x],
        peer_tokens=[int(x) for x in peer_tokens.split(",") if x],
        done=done,
        on_row=lambda rows: write_results(rows, out, {**meta, "complete": False}, overwrite=True),
        schedules=experiment.schedules(schedules, lvp.num_stages, DEFAULT_SCHEDULES),
        structure=structure,
        skipped=skipped,
    )
    if skipped:
        meta["skipped"] = skipped
    paths = write_results(rows, out, {**meta, "complete": True}, overwrite=True)
    print(markdown_table(rows))
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


# the options that define the rows (recorded in the settings; a resume needs them equal)
OPTIONS = (
    "cache_dir", "batch_size", "max_batches", "flops_samples", "schedules", "match_rho", "fastv_k", "knee_layer",
    "knee_keep_ratio", "knee_min_keep", "knee_max_keep", "seed", "peers", "peer_tokens", "device",
)  # fmt: skip


def _old_model_flag(value: str) -> str | None:
    """``--model FOLDER`` (the base model before) -> the new spelling; ``--model CLASS_OR_YAML`` is fit's section."""
    if Path(value).is_dir() or ("/" in value and not value.endswith((".yaml", ".yml", ".json"))):
        return f"--model_path {value} (--model is now fit's model section, as in -c CONFIG)"
    return None


def _old_data_flag(value: str) -> str | None:
    """``--data CONFIG.yaml`` (a whole experiment YAML before) -> ``-c CONFIG.yaml``."""
    if value.endswith((".yaml", ".yml")) and Path(value).is_file():
        import yaml

        if "data" in (yaml.safe_load(Path(value).read_text()) or {}):
            return f"-c {value} (compare reads the config's data section as fit does)"
    return None


RENAMED = {"--model": _old_model_flag, "--data": _old_data_flag, "--rhos": "--schedules paper:0.6,0.5,0.45"}


def main(argv: Sequence[str]) -> int:
    return run(compare, argv, "python -m lightning_lvp compare", renamed=RENAMED, lists={"--schedules": ";"})
