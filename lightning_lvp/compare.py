"""LVPruning against the training-free baselines on one validation set: accuracy, TFLOPs, kept tokens.

``python -m lightning_lvp compare -c CONFIG.yaml --pruners PRUNERS --out DIR`` (lightning_lvp/commands/compare.py)
evaluates (teacher-forced, :func:`~lightning_lvp.eval.teacher_forced.evaluate_schedule`, token-removing path):

* the unpruned model;
* LVPruning at rho 0.6 / 0.5 / 0.45 (schedules [rho, rho - 0.2, rho - 0.4, ...], METHOD §2; ``--schedules``);
* CLS-knee (two stages, its own dynamic counts; :mod:`lightning_lvp.methods.knee`);
* FastV after layer K with the keep ratio whose kept vision tokens, averaged over the LLM layers,
  equal LVPruning's at ``--match_rho`` (the LLM's linear FLOPs then match);
* random and uniform pruning at LVPruning's pruning points with its ``--match_rho`` schedule
  (the same kept count at every layer);

and writes ``comparison.csv``, ``comparison.json``, ``comparison.md`` (table + command, for
docs/RESULTS.md) and ``comparison.png`` (accuracy vs TFLOPs) into ``--out``.

TFLOPs: :func:`lightning_lvp.flops.count_forward` (FlopCounterMode on the real model, LM head on the
last position) on the first ``--flops_samples`` validation samples, ONE sample at a time without
padding (a batch is re-packed to its longest row, so dynamic-count methods would be over-counted),
averaged: TFLOPs per sample.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lightning_lvp import adapter
from lightning_lvp.checkpoint import atomic_save_figure, atomic_write, atomic_write_text
from lightning_lvp.eval.plots import accuracy_vs_tflops
from lightning_lvp.eval.teacher_forced import (
    RELEVANCE_KEYS,
    evaluate_schedule,
    model_inputs,
    relevance_columns,
    relevance_metrics,
)
from lightning_lvp.methods import ClsKneePruning, FastV, PruningMethod, RandomPruning, UniformPruning
from lightning_lvp.methods.peers import PAPER_TOKENS, peer_entries
from lightning_lvp.model import PrunedLlava
from lightning_lvp.schedules import PAPER_RHOS, format_schedule, paper_schedule

log = logging.getLogger(__name__)
PEER_NAMES = ("visionzip", "divprune", "dart", "pdrop")  # the methods papers compare against (issue #15)
RESULT_FILES = ("comparison.csv", "comparison.json", "comparison.md", "comparison.png")
# name, method class, pruning points, schedule, accuracy, samples, TFLOPs per sample, TFLOPs / base - 1,
# vision tokens on entry, kept after the last stage (mean), its fraction, kept fraction averaged over layers
COLUMNS = tuple(
    "name method after_layers ratios accuracy n tflops flops_change n_vision kept_vision kept_frac_final "
    "kept_frac_layers seconds".split()
)


@dataclass
class Entry:
    """One row of the comparison: a method (None = unpruned) and its inference schedule."""

    name: str
    method: PruningMethod | None
    ratios: list[float | None] | None


def lvp_schedule(rho: float, stages: int) -> list[float]:
    """The paper's schedule for ``rho`` (:func:`lightning_lvp.schedules.paper_schedule`)."""
    return paper_schedule(rho, stages)


def lvp_row_name(schedule: Sequence[float | None], stages: int) -> str:
    """``lvp_rho0.5`` for the paper's schedule of rho 0.5, else ``lvp_`` + the schedule (``lvp_0.5,0.4,0.3``)."""
    first = schedule[0]
    if first is not None and list(schedule) == lvp_schedule(first, stages):
        return f"lvp_rho{first:g}"
    return "lvp_" + format_schedule(schedule)


def layer_fractions(after_layers: Sequence[int], kept: Sequence[float], num_layers: int) -> list[float]:
    """Kept fraction of the vision tokens each LLM layer (1..num_layers) runs on.

    Args:
        after_layers: pruning points (0 = LLM input); stage s acts from layer after_layers[s] + 1 on.
        kept: kept fraction after each stage.
        num_layers: LLM depth.
    """
    out = []
    for layer in range(1, num_layers + 1):
        done = [f for a, f in zip(after_layers, kept, strict=True) if a < layer]
        out.append(done[-1] if done else 1.0)
    return out


def matched_single_stage_ratio(
    after_layers: Sequence[int], ratios: Sequence[float], num_layers: int, k: int, n_vision: int
) -> float:
    """Keep ratio r of a single stage after layer k whose layer-averaged kept fraction equals the schedule's.

    Solves (k + (L - k) r) / L = mean(layer_fractions); r is clipped to [1 / n_vision, 1].
    """
    if not 0 <= k < num_layers:
        raise ValueError(f"FastV k must be in [0, {num_layers}) for an LLM with {num_layers} layers, got {k}")
    target = sum(layer_fractions(after_layers, ratios, num_layers)) / num_layers
    r = (num_layers * target - k) / (num_layers - k)
    return float(min(1.0, max(r, 1.0 / n_vision)))


def build_entries(
    lvp: PruningMethod,
    num_layers: int,
    n_vision: int,
    rhos: Sequence[float] = PAPER_RHOS,
    match_rho: float = 0.5,
    fastv_k: int = 2,
    knee_args: dict[str, Any] | None = None,
    seed: int = 0,
    peers: Sequence[str] = PEER_NAMES,
    peer_tokens: Sequence[int] = PAPER_TOKENS,
    schedules: Sequence[Sequence[float | None]] | None = None,
) -> list[Entry]:
    """The rows of the comparison (see the module docstring); ``peers`` at ``peer_tokens`` of 576
    (:func:`lightning_lvp.methods.peers.peer_entries`); LVPruning's rows at ``schedules`` when given,
    else at the paper's schedule of each of ``rhos``."""
    stages = lvp.num_stages
    entries = [Entry("base", None, None)]
    lvp_rows = [list(s) for s in schedules] if schedules is not None else [lvp_schedule(r, stages) for r in rhos]
    entries += [Entry(lvp_row_name(s, stages), lvp, s) for s in lvp_rows]
    knee = ClsKneePruning(**(knee_args or {}))
    entries.append(Entry("cls_knee", knee, list(knee.keep_ratios)))  # None = the knee decides
    matched = lvp_schedule(match_rho, stages)
    r = round(matched_single_stage_ratio(lvp.after_layers, matched, num_layers, fastv_k, n_vision), 4)
    want = sum(layer_fractions(lvp.after_layers, matched, num_layers)) / num_layers
    got = sum(layer_fractions([fastv_k], [r], num_layers)) / num_layers
    if abs(got - want) > 0.01:
        msg = "compare: FastV after layer %d cannot match the layer-mean kept fraction %.3f of a %d-layer LLM (%s -> %.3f)"
        log.warning(msg, fastv_k, want, num_layers, r, got)
    entries.append(Entry("fastv", FastV(k=fastv_k, keep_ratio=r), [r]))
    entries.append(Entry("random", RandomPruning(lvp.after_layers, matched, seed=seed), matched))
    entries.append(Entry("uniform", UniformPruning(lvp.after_layers, matched), matched))
    if peers:
        entries += [Entry(*row) for row in peer_entries(num_layers, n_vision, peer_tokens, peers)]
    return entries


def single_samples(loader: Iterable[dict[str, Any]], count: int, llava=None) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` samples of ``loader`` as unpadded batches of one.

    Args:
        llava: the base model; its family picks each sample's own image inputs
            (``VLMFamily.sample_image_inputs``: Qwen2.5-VL's flat patches); None = LLaVA-1.5's batch-first ones.
    """
    family = adapter.family_for(llava) if llava is not None else None
    out: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        inputs = model_inputs(batch)
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        text_keys = ("input_ids", "attention_mask", "prompt_mask")
        images = {k: v for k, v in inputs.items() if k not in text_keys}
        for i in range(mask.shape[0]):
            if len(out) == count:
                return out
            one = {k: v[i : i + 1, mask[i]] for k, v in inputs.items() if k in text_keys}
            if family is None:
                one.update({k: v[i : i + 1] for k, v in images.items()})
            else:
                one.update(family.sample_image_inputs(llava, inputs["input_ids"], images, i))
            out.append(one)
        if len(out) == count:
            break
    return out


def mean_tflops(model: PrunedLlava, samples: Sequence[dict[str, torch.Tensor]], ratios) -> float:
    """Mean TFLOPs per sample of the inference forward + LM head on the last position."""
    from lightning_lvp.flops import count_forward

    device = next(model.parameters()).device
    totals = [count_forward(model, {k: v.to(device) for k, v in s.items()}, ratios)[0]["total"] for s in samples]
    return sum(totals) / len(totals) / 1e12


def vision_tokens(llava, samples: Sequence[dict[str, torch.Tensor]], structure: str = "keep") -> int:
    """The fewest vision tokens of one sample among ``samples`` (the ratios' reference count: LLaVA-1.5's 576
    per image; LLaVA-NeXT's and Qwen2.5-VL's depend on each image's size)."""
    model = PrunedLlava(llava, None, structure=structure)
    device = next(llava.parameters()).device
    with torch.no_grad():
        counts = [
            int(model.initial_state(**{k: v.to(device) for k, v in s.items()})[0].n_vision.min()) for s in samples
        ]
    return min(counts)


def evaluate_entry(
    llava, entry: Entry, loader, samples, num_layers: int, max_batches: int | None, structure: str = "keep"
) -> dict[str, Any]:
    """One comparison row: accuracy and kept tokens over ``loader``, TFLOPs on ``samples``."""
    model = PrunedLlava(llava, entry.method, structure=structure).eval()
    res = evaluate_schedule(model, loader, entry.ratios, max_batches=max_batches)
    n_vision = res["n_vision"]
    kept = [k / n_vision for k in res["kept_tokens"]] if n_vision else []
    layers = entry.method.after_layers if entry.method else []
    fractions = layer_fractions(layers, kept, num_layers)
    return {
        "name": entry.name,
        "method": type(entry.method).__name__ if entry.method else "none",
        "after_layers": list(layers),
        "ratios": entry.ratios,
        "accuracy": res["accuracy"],
        "accuracy_by_type": res["accuracy_by_type"],
        "n": res["n"],
        "tflops": mean_tflops(model, samples, entry.ratios) if samples else float("nan"),
        "n_vision": n_vision,
        "kept_vision": res["kept_tokens"][-1] if res["kept_tokens"] else n_vision,
        "kept_per_stage": res["kept_tokens"],
        "kept_frac_final": kept[-1] if kept else 1.0,
        "kept_frac_layers": sum(fractions) / len(fractions),
        "seconds": res["seconds"],
        **{k: res[k] for k in RELEVANCE_KEYS if k in res},  # {stage: value}, only on data with relevant patches
    }


def run_comparison(
    llava,
    lvp: PruningMethod,
    loader: Iterable[dict[str, Any]],
    rhos: Sequence[float] = PAPER_RHOS,
    match_rho: float = 0.5,
    fastv_k: int = 2,
    knee_args: dict[str, Any] | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    flops_samples: int = 4,
    peers: Sequence[str] = PEER_NAMES,
    peer_tokens: Sequence[int] = PAPER_TOKENS,
    done: Sequence[dict[str, Any]] = (),
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    schedules: Sequence[Sequence[float | None]] | None = None,
    structure: str = "keep",
    skipped: list[dict[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluates every entry of :func:`build_entries`; returns one dict per row (see :data:`COLUMNS`).

    A method the model's family cannot run (:class:`~lightning_lvp.families.base.UnsupportedMethodError`:
    CLS-knee and VisionZip need a CLS token Qwen2.5-VL has not; VisionZip on LLaVA-NeXT) is skipped with a
    warning naming the reason, and listed in ``skipped`` (``{"name", "reason"}``) when a list is given.

    Args:
        llava: the base LlavaForConditionalGeneration (frozen; shared by all rows).
        lvp: the LVPruning method (loaded pruners), bound to ``llava``'s LLM.
        loader: re-iterable validation batches with labels (docs/DESIGN.md).
        flops_samples: samples (one at a time) the TFLOPs are averaged over; 0 = no FLOPs (NaN).
        done: rows of an interrupted run with the same settings, reused by name (said at WARNING).
        on_row: called with the rows so far after every row (compare writes its files there, so a kill
            keeps every finished row).
        schedules: LVPruning's inference schedules (instead of the paper's schedule of each of ``rhos``).
        structure: the LLaVA-NeXT newline policy of every row (``PrunedVLM(structure=...)``).
    """
    from lightning_lvp.families.base import UnsupportedMethodError

    samples = single_samples(loader, max(flops_samples, 1), llava)
    if not samples:
        raise ValueError("the validation loader yielded no samples")
    n_vision = vision_tokens(llava, samples, structure)
    samples = samples[:flops_samples]
    num_layers = adapter.text_dims(llava.config).num_layers
    entries = build_entries(
        lvp, num_layers, n_vision, rhos, match_rho, fastv_k, knee_args, seed, peers, peer_tokens, schedules
    )
    finished = {r["name"]: r for r in done}
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if entry.name in finished:
            log.warning("compare: reusing the row %s of the interrupted run (same settings)", entry.name)
            rows.append(finished[entry.name])
        else:
            log.info("compare: evaluating %s (%s)", entry.name, entry.ratios)
            try:
                rows.append(evaluate_entry(llava, entry, loader, samples, num_layers, max_batches, structure))
            except UnsupportedMethodError as err:
                log.warning("compare: row %s skipped: %s", entry.name, err)
                if skipped is not None:
                    skipped.append({"name": entry.name, "reason": str(err)})
                continue
        if rows[-1]["n"] != rows[0]["n"]:
            raise ValueError(f"compare: {entry.name} was measured on {rows[-1]['n']} samples, base on {rows[0]['n']}")
        base = rows[0]["tflops"]
        rows[-1]["flops_change"] = rows[-1]["tflops"] / base - 1.0 if base else float("nan")
        if on_row is not None:
            on_row(rows)
    return rows


# ------------------------------------------------------------------------------------- outputs
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " ".join("auto" if v is None else f"{v:g}" for v in value)  # None: the method decides
    return "-" if value is None else str(value)


def _last_stage(values: dict[str, float] | None) -> str:
    """``0.85 (layer4)``: the value after a row's last stage (rows prune at different points), ``-`` if absent."""
    if not values:
        return "-"
    stage, value = list(values.items())[-1]
    return f"{value:.2f} ({stage})"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (accuracy in %, TFLOPs per sample, kept vision tokens; on data with
    relevant patches also the relevant-patch recall and the kept-set overlap after each row's last stage)."""
    relevance = bool(relevance_columns(rows))
    head = (
        "| method | schedule | accuracy | n | TFLOPs | FLOPs vs base | kept vision (final) | kept vision (layer mean) |"
    )
    head += " relevant kept (final) | kept overlap (final) |" if relevance else ""
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        sched = _cell(r["ratios"])
        line = (
            f"| {r['name']} | {sched} | {100 * r['accuracy']:.1f} % | {r['n']} | {r['tflops']:.4g} | "
            f"{100 * r['flops_change']:+.1f} % | {r['kept_vision']:.1f} / {r['n_vision']:.0f} "
            f"({100 * r['kept_frac_final']:.1f} %) | {100 * r['kept_frac_layers']:.1f} % |"
        )
        if relevance:
            line += f" {_last_stage(r.get('relevant_kept'))} | {_last_stage(r.get('kept_overlap'))} |"
        lines.append(line)
    return "\n".join(lines)


PEER_MARKERS = {"visionzip": ("P", "C5"), "divprune": ("v", "C6"), "dart": ("<", "C7"), "pdrop": (">", "C8")}
BASELINE_MARKERS = {
    "base": ("*", "k"),
    "cls_knee": ("s", "C1"),
    "fastv": ("^", "C2"),
    "random": ("x", "C3"),
    "uniform": ("D", "C4"),
}


def plot_accuracy_vs_tflops(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy (%) against TFLOPs per sample; the LVPruning points joined by a line (:mod:`lightning_lvp.eval.plots`)."""
    fig = accuracy_vs_tflops(
        rows,
        on_line=lambda r: r["name"].startswith("lvp_"),
        line_label="LVPruning",
        markers={
            **BASELINE_MARKERS,
            **{
                r["name"]: PEER_MARKERS[r["name"].split("_")[0]]
                for r in rows
                if r["name"].split("_")[0] in PEER_MARKERS
            },
        },
        title="accuracy vs compute",
        size=(6.4, 4.4),
    )
    FigureCanvasAgg(fig)
    atomic_save_figure(fig, path, dpi=120)


def existing_results(out: Path) -> list[Path]:
    """Result files of a previous run in ``out``."""
    return [out / f for f in RESULT_FILES if (out / f).exists()]


def write_results(
    rows: Sequence[dict[str, Any]], out: str | Path, meta: dict[str, Any], overwrite: bool = False
) -> list[Path]:
    """Writes CSV, Markdown and PNG, then the JSON (the record a resume reads), each atomically.

    Raises:
        FileExistsError: result files exist and ``overwrite`` is False.
    """
    out = Path(out)
    found = existing_results(out)
    if found and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, found))} already exist; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f for f in RESULT_FILES]
    relevance = relevance_columns(rows)  # relevant_kept/<stage>, kept_overlap/<stage> where defined
    with atomic_write(paths[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS + tuple(relevance))
        for r in rows:
            metrics = relevance_metrics(r)
            writer.writerow(
                [_cell(r[c]) for c in COLUMNS] + [_cell(metrics[c]) if c in metrics else "" for c in relevance]
            )
    command = meta.get("command", "")
    atomic_write_text(paths[2], f"{markdown_table(rows)}\n\nCommand: `{command}`\n\n{meta.get('notes', '')}\n")
    plot_accuracy_vs_tflops(rows, paths[3])
    atomic_write_text(paths[1], json.dumps({**meta, "rows": list(rows)}, indent=2))
    return paths


def compare_settings(model_path: str, pruners: str, config: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """What the rows are measured with: model, pruners (sha256 of their files), config (sha256), batch
    size, batch limit, FLOPs samples and every row-defining option (``options``)."""
    from lightning_lvp.io import file_fingerprint, model_fingerprint, pruner_source_fingerprint

    return {
        "model": str(model_path),
        "model_fingerprint": model_fingerprint(model_path),
        "pruners": str(pruners),
        "pruners_sha256": pruner_source_fingerprint(pruners),
        "data_sha256": ";".join(file_fingerprint(c) for c in config.split(";")) if config else None,
        **options,
    }


def previous_rows(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[list[dict[str, Any]], str | None]:
    """(rows to reuse, refusal message): the finished rows of an interrupted run with the same settings;
    a refusal when ``out`` holds a finished run or one of other settings (unless ``overwrite``)."""
    found = existing_results(out)
    if not found or overwrite:
        if found:
            log.warning("compare: overwriting %s", ", ".join(map(str, found)))
        return [], None
    path = out / "comparison.json"
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [], f"{path} is truncated or not a comparison; pass --overwrite to replace it"
    if saved.get("settings") != settings:
        from lightning_lvp.sweep import settings_difference

        return [], (f"refusing to overwrite {', '.join(map(str, found))} (measured with other settings: "
                    f"{settings_difference(saved.get('settings'), settings)}); pass --overwrite")  # fmt: skip
    if saved.get("complete"):
        return [], f"refusing to overwrite {', '.join(map(str, found))} (a finished comparison); pass --overwrite"
    rows = saved.get("rows", [])
    log.warning("compare: resuming the interrupted comparison in %s: reusing %d finished rows", out, len(rows))
    return rows, None
