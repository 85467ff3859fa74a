"""Callbacks: inference-ratio sweep at validation (+ plot, + final table) and pruning pictures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from matplotlib.figure import Figure
from torchmetrics import MeanMetric

from lightning_lvp.eval.plots import accuracy_vs_tflops
from lightning_lvp.eval.teacher_forced import (  # noqa: F401  (count_schedule_flops, schedule_name: old import path)
    RelevanceStats,
    count_schedule_flops,
    model_inputs,
    per_stage_text,
    relevance_metrics,
    schedule_name,
    score_batch,
    stage_name,
    update_relevance,
)
from lightning_lvp.schedules import PAPER_RHOS, paper_schedule, paper_schedules  # noqa: F401  (old import path)

log = logging.getLogger(__name__)


class RatioSweep(L.Callback):
    """Validation under several inference schedules plus the unpruned model.

    Logs ``val/acc@<name>`` and ``val/tflops@<name>`` per schedule, a metric-vs-TFLOPs figure to
    TensorBoard, writes ``sweep.json`` into the log folder and prints the table when fit ends. On data
    with relevant patches it also logs, per pruned schedule and stage, ``val/relevant_kept/<stage>@<name>``
    and ``val/kept_overlap/<stage>@<name>`` (:class:`lightning_lvp.eval.teacher_forced.RelevanceStats`; absent
    otherwise), gathered over all ranks.

    Args:
        rhos: first-stage ratios; each becomes the paper's [rho, rho-0.2, rho-0.4] cut to the stage count
            (:func:`lightning_lvp.schedules.paper_schedule`, floored at 0.05).
        schedules: explicit per-stage schedules (used instead of ``rhos`` when given).
        include_base: also evaluate the unpruned model.
        every_n_epochs: run on every n-th validation epoch (always on the last).
    """

    def __init__(
        self,
        rhos: list[float] = PAPER_RHOS,
        schedules: list[list[float]] | None = None,
        include_base: bool = True,
        every_n_epochs: int = 1,
    ):
        self.rhos, self.explicit, self.include_base, self.every = list(rhos), schedules, include_base, every_n_epochs
        self.metrics: dict[str, MeanMetric] = {}
        self.relevance: dict[str, RelevanceStats] = {}
        self.flops: dict[str, float] = {}
        self.last: list[dict[str, Any]] = []

    def _schedules(self, pl_module) -> list[list[float] | None]:
        stages = pl_module.method.num_stages if pl_module.method is not None else 0
        scheds = [list(s) for s in self.explicit] if self.explicit else paper_schedules(self.rhos, stages)
        if not stages:
            scheds = []
        return ([None] if self.include_base else []) + scheds

    def _active(self, trainer) -> bool:
        return not trainer.sanity_checking and (
            (trainer.current_epoch + 1) % self.every == 0 or trainer.current_epoch + 1 >= (trainer.max_epochs or 1)
        )

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.metrics = {schedule_name(s): MeanMetric().to(pl_module.device) for s in self._schedules(pl_module)}
        stages = [stage_name(a) for a in pl_module.method.after_layers] if pl_module.method is not None else []
        self.relevance = {schedule_name(s): RelevanceStats(stages) for s in self._schedules(pl_module) if s is not None}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active(trainer):
            return
        stages = pl_module.method.num_stages if pl_module.method is not None else 0
        for sched in self._schedules(pl_module):
            name = schedule_name(sched)
            ratios = [1.0] * stages if sched is None and stages else sched  # rho = 1 is exactly the base
            res = score_batch(pl_module.model, batch, ratios)
            self.metrics[name].update(res["correct"].float().to(pl_module.device))
            if sched is not None:  # the base keeps everything: nothing to diagnose
                update_relevance(self.relevance[name], batch, res["kept_patches"])
            if name not in self.flops:
                self.flops[name] = count_schedule_flops(pl_module.model, batch, sched)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._active(trainer) or not self.metrics:
            return
        rows = []
        for sched in self._schedules(pl_module):
            name = schedule_name(sched)
            acc = float(self.metrics[name].compute())  # synced over ranks
            tflops = self.flops.get(name, float("nan")) / 1e12
            pl_module.log(f"val/acc@{name}", acc, sync_dist=False, rank_zero_only=True)
            pl_module.log(f"val/tflops@{name}", tflops, rank_zero_only=True)
            row = {"schedule": name, "ratios": sched, "accuracy": acc, "tflops": tflops}
            if name in self.relevance:
                row.update(gather_relevance(self.relevance[name]).compute())
                for key, value in relevance_metrics(row).items():
                    pl_module.log(f"val/{key}@{name}", value, rank_zero_only=True)
            rows.append(row)
        self.last = rows
        log_dir = trainer.log_dir  # a collective under DDP: every rank must call it
        if trainer.is_global_zero:
            self._plot(trainer, rows)
            if log_dir:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                from lightning_lvp.checkpoint import atomic_write_text  # a kill never leaves it half written

                atomic_write_text(Path(log_dir) / "sweep.json", json.dumps(rows, indent=2))

    def _plot(self, trainer, rows: list[dict[str, Any]]) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_figure"):
            return
        fig = accuracy_vs_tflops(
            rows, "schedule", xlabel="TFLOPs (1 sample, token-removing forward)", ylabel="val accuracy (%)"
        )
        experiment.add_figure("val/acc_vs_tflops", fig, global_step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must call it
        if trainer.is_global_zero and self.last:
            print(format_sweep(self.last, log_dir))


def gather_relevance(stats: RelevanceStats) -> RelevanceStats:
    """``stats`` merged over all ranks (a collective under DDP: every rank must call it); itself otherwise."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    parts: list[RelevanceStats | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, stats)
    merged = RelevanceStats(stats.stages)
    for part in parts:
        merged.merge(part)
    return merged


def format_sweep(rows: list[dict[str, Any]], log_dir: str | None) -> str:
    """The table printed at the end of fit (relevance columns only when the data has relevant patches)."""
    base = next((r for r in rows if r["schedule"] == "base"), None)
    lines = ["", "Ratio sweep (validation, token-removing inference path):"]
    stages = next((list(r[k]) for r in rows for k in ("relevant_kept", "kept_overlap") if r.get(k)), [])
    width = max(14, 5 * len(stages))
    extra = f" {'relevant kept':>{width}} {'kept overlap':>{width}}" if stages else ""
    lines.append(f"{'schedule':<10} {'ratios':<22} {'accuracy':>9} {'TFLOPs':>10} {'vs base':>8}{extra}")
    for r in rows:
        rel = f"{r['tflops'] / base['tflops']:.2f}x" if base and base["tflops"] else ""
        ratios = "-" if r["ratios"] is None else str(r["ratios"])
        line = f"{r['schedule']:<10} {ratios:<22} {100 * r['accuracy']:>8.1f}% {r['tflops']:>10.2e} {rel:>8}"
        if stages:
            line += f" {per_stage_text(r.get('relevant_kept'), stages):>{width}}"
            line += f" {per_stage_text(r.get('kept_overlap'), stages):>{width}}"
        lines.append(line)
    if stages:
        lines.append(
            f"relevant kept: recall of the relevant patches after each stage ({'/'.join(stages)}); kept overlap: "
            "Jaccard index of the kept sets of two questions about one image (1.00 = question-blind)"
        )
    if log_dir:
        lines.append(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent})")
    return "\n".join(lines)


class PruningPictures(L.Callback):
    """Logs validation images with the patches kept at each stage highlighted (TensorBoard figure).

    Args:
        num_images: how many images of the first validation batch to draw.
        ratios: inference schedule to draw (None = the method's keep_ratios).
    """

    def __init__(self, num_images: int = 4, ratios: list[float] | None = None):
        self.num_images, self.ratios = num_images, ratios

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or pl_module.method is None:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_figure"):
            return
        n = min(self.num_images, batch["input_ids"].shape[0])
        sub = {k: (v[:n] if torch.is_tensor(v) else v[:n] if isinstance(v, list) else v) for k, v in batch.items()}
        with torch.no_grad():
            out = pl_module.model.forward_infer(**model_inputs(sub), ratios=self.ratios)
        fig = draw_pruning(sub, out.kept_patches, pl_module.method.after_layers, _tokenizer(trainer))
        experiment.add_figure("val/pruning", fig, global_step=trainer.global_step)


def _tokenizer(trainer):
    processor = getattr(getattr(trainer, "datamodule", None), "processor", None)
    return getattr(processor, "tokenizer", None)


def question_text(batch: dict[str, Any], i: int, tokenizer) -> str:
    """The last words of sample i's prompt (its question), for figure titles."""
    if tokenizer is None:
        return ""
    ids = batch["input_ids"][i][batch["prompt_mask"][i].bool()].tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text[-48:]


def draw_pruning(batch: dict[str, Any], kept: list[torch.Tensor], after_layers: list[int], tokenizer=None):
    """Figure: one row per sample, the image then the kept patches after each stage.

    Args:
        batch: with ``pixel_values`` (B, C, H, W).
        kept: per stage (B, N) bool over the image's patches (row-major grid).
    """
    pix = batch["pixel_values"].float()
    b, grid = pix.shape[0], int(round(kept[0].shape[1] ** 0.5))
    relevant = batch.get("relevant_mask")
    fig = Figure(figsize=(2.2 * (len(kept) + 1), 2.3 * b))  # object API: no pyplot state, no backend choice
    axes = fig.subplots(b, len(kept) + 1, squeeze=False)
    for i in range(b):
        img = pix[i].permute(1, 2, 0)
        img = ((img - img.min()) / (img.max() - img.min() + 1e-8)).cpu().numpy()
        axes[i, 0].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        axes[i, 0].set_title(question_text(batch, i, tokenizer), fontsize=6)
        for s, k in enumerate(kept):
            mask = k[i].reshape(grid, grid).float().cpu()
            mask = torch.nn.functional.interpolate(mask[None, None], size=img.shape[:2], mode="nearest")[0, 0]
            shown = img * (0.25 + 0.75 * mask.numpy()[..., None])
            axes[i, s + 1].imshow(shown.squeeze())
            if relevant is not None:  # outline the patches that decide the answer
                _outline(axes[i, s + 1], relevant[i][batch["vision_mask"][i].bool()], grid, img.shape[0] / grid)
            where = f"after layer {after_layers[s]}" if after_layers[s] else "LLM input"
            axes[i, s + 1].set_title(f"{where}: {int(k[i].sum())} kept", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _outline(ax, relevant: torch.Tensor, grid: int, cell: float) -> None:
    """Draws a red square around each relevant patch (relevant: (N,) bool, row-major)."""
    from matplotlib.patches import Rectangle

    for p in relevant.nonzero()[:, 0].tolist():
        r, c = divmod(p, grid)
        ax.add_patch(Rectangle((c * cell - 0.5, r * cell - 0.5), cell, cell, fill=False, edgecolor="red", lw=1.2))
