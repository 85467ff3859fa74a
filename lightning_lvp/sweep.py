"""The ratio-sweep job behind ``python -m lightning_lvp sweep -c CONFIG --pruners DIR_OR_CKPT``
(lightning_lvp/commands/sweep.py): "how far can I prune?".

Evaluates a list or range of inference schedules on the config's validation data with the
token-REMOVING inference path and writes, per schedule, the accuracy, TFLOPs (token-removing
forward of one validation sample), mean kept vision tokens per stage and latency (and, on data with
relevant patches, ``relevant_kept/<stage>`` and ``kept_overlap/<stage>``: :mod:`lightning_lvp.eval.teacher_forced`), as
``results.csv`` / ``results.json``, ``acc_vs_tflops.png`` and TensorBoard scalars in ``--out``.

Resumable: schedules already in ``results.json`` are skipped (and listed at WARNING). Rows measured
differently never mix: ``results.json`` records the settings (config path and sha256, pruner path and
the sha256 of their files, model fingerprint, batch size, batch limit), and other settings in the same
``--out`` are an error naming what differs unless ``--overwrite``. Every file is written atomically,
results.json last, after each schedule; TensorBoard is rebuilt from it on resume.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from tqdm import tqdm

from lightning_lvp.checkpoint import atomic_save_figure, atomic_write, atomic_write_text
from lightning_lvp.eval.plots import accuracy_vs_tflops
from lightning_lvp.eval.teacher_forced import (
    count_schedule_flops,
    evaluate_schedule,
    per_stage_text,
    relevance_columns,
    relevance_metrics,
)
from lightning_lvp.io import load_method  # noqa: F401  (load_method: old import path)
from lightning_lvp.model import PrunedLlava

log = logging.getLogger(__name__)
RESULTS = "results.json"


def check_settings(out: Path, settings: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """Rows already done in ``out`` with the same settings (resume, said at WARNING), or an error naming
    the settings that differ (rows measured differently are never mixed)."""
    path = out / RESULTS
    if not path.exists():
        return []
    saved = read_results(path)
    if saved.get("settings") != settings:
        if not overwrite:
            raise FileExistsError(
                f"{path} holds results of other settings, measured differently ({settings_difference(saved.get('settings'), settings)}); "
                "use another --out or pass --overwrite to discard them"
            )
        log.warning("discarding the results in %s (--overwrite)", path)
        return []
    rows = saved.get("rows", [])
    if rows:
        log.warning("reusing %d rows of %s measured with the same settings: %s", len(rows), path,
                    ", ".join(r["name"] for r in rows))  # fmt: skip
    return rows


def write_results(out: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """results.csv and the plot, then results.json (the record a resume reads), each atomically: a kill
    leaves every file whole, and results.json never holds a row the CSV lacks."""
    out.mkdir(parents=True, exist_ok=True)
    fields = ["name", "ratios", "accuracy", "tflops", "kept_tokens", "n_vision", "ms_per_sample", "n"]
    relevance = relevance_columns(rows)  # relevant_kept/<stage>, kept_overlap/<stage>: only where defined
    with atomic_write(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + relevance, restval="")
        writer.writeheader()
        for r in rows:
            values = {k: json.dumps(r[k]) if isinstance(r[k], list) else r[k] for k in fields}
            writer.writerow({**values, **relevance_metrics(r)})
    fig = accuracy_vs_tflops(
        rows, on_line=lambda r: r["ratios"] is not None, line_label="pruned", markers={"base": ("*", "k")}
    )
    FigureCanvasAgg(fig)
    atomic_save_figure(fig, out / "acc_vs_tflops.png", dpi=120)
    atomic_write_text(out / RESULTS, json.dumps({"settings": settings, "rows": rows}, indent=2))


def evaluate_one(model: PrunedLlava, loader, first_batch, ratios, max_batches) -> dict[str, Any]:
    res = evaluate_schedule(model, loader, ratios, max_batches=max_batches)
    res["tflops"] = count_schedule_flops(model, first_batch, ratios) / 1e12
    res["ms_per_sample"] = 1000 * res["seconds"] / max(1, res["n"])
    return res


def run_sweep(
    model: PrunedLlava,
    loader,
    schedules: list[list[float | None]],
    settings: dict[str, Any],
    out: str | Path,
    include_base: bool = True,
    max_batches: int | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Evaluates the unpruned model (``include_base``) and each schedule on ``loader``, writing the results
    into ``out`` after every row; rows already there with the same ``settings`` are reused.

    Args:
        model: the pruned model (its method is the one swept; dropped for the base row).
        loader: validation batches with labels.
        schedules: the inference schedules (:mod:`lightning_lvp.schedules`).
        settings: what the rows are measured with (:func:`measurement_settings`).
        max_batches: validation batches per schedule (None: all).
        overwrite: discard results of other settings in ``out``.
    """
    method = model.method
    first = next(iter(loader))
    out = Path(out)
    rows = check_settings(out, settings, overwrite)
    done = {json.dumps(r["ratios"]) for r in rows}
    todo = ([None] if include_base else []) + [s for s in schedules if s is not None]
    writer = _tensorboard(out, rows)
    for sched in tqdm(todo, desc="sweep", unit="schedule"):
        if json.dumps(sched) in done:
            log.info("skipping %s (already in %s)", sched, out / RESULTS)
            continue
        if sched is None:
            model.method = None
            res = evaluate_one(model, loader, first, None, max_batches)
            model.method = method
        else:
            res = evaluate_one(model, loader, first, sched, max_batches)
        res["name"] = "base" if sched is None else "[" + ", ".join(f"{r:g}" for r in sched) + "]"
        res["ratios"] = sched
        if rows and res["n"] != rows[0]["n"]:
            raise ValueError(
                f"{res['name']} was measured on {res['n']} samples but the rows in {out / RESULTS} on {rows[0]['n']}: "
                "the validation data changed under the same settings; use another --out or --overwrite"
            )
        rows.append(res)
        write_results(out, settings, rows)  # after every schedule: an interruption loses at most one
        _add_points(writer, rows, len(rows) - 1)
        if writer is not None:
            writer.flush()  # TensorBoard shows what results.json holds, row by row
    if writer is not None:
        writer.close()
    return rows


def measurement_settings(config: str | None, pruners: str, model_path: str, **numbers: Any) -> dict[str, Any]:
    """What a row of results was measured with: the config (path and sha256 of its text), the pruners (path
    and sha256 of their files, see :func:`pruners_fingerprint`), the model (path and fingerprint) and the
    numbers that change what is measured (batch size, batch limit, ...). Two folders' rows mix only when
    these are equal."""
    from lightning_lvp.io import file_fingerprint, model_fingerprint, pruner_source_fingerprint

    pruner_path = Path(pruners)
    pruner_hash = pruner_source_fingerprint(pruners)
    return {
        "config": ";".join(str(Path(c).resolve()) for c in config.split(";")) if config else None,
        "config_sha256": ";".join(file_fingerprint(Path(c)) for c in config.split(";")) if config else None,
        "pruners": str(pruner_path.resolve()) if pruner_path.exists() else pruners,
        "pruners_sha256": pruner_hash,
        "model_path": model_path,
        "model_fingerprint": model_fingerprint(model_path),
        **numbers,
    }


def settings_difference(saved: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """``key: saved -> current`` for every setting that differs."""
    saved = saved or {}
    keys = sorted(set(saved) | set(current))
    return "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k))


def read_results(path: Path) -> dict[str, Any]:
    """A results JSON, or an error naming the file when it is truncated or foreign."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is truncated or not a results file ({e}); move it away or pass --overwrite") from None
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path} is not a results file of this program (no 'rows'); use another --out")
    return data


def _add_points(writer, rows: list[dict[str, Any]], step: int) -> None:
    """TensorBoard points of ``rows[step]`` (x = the row's index)."""
    if writer is None:
        return
    res = rows[step]
    writer.add_scalar("sweep/accuracy", res["accuracy"], step)
    writer.add_scalar("sweep/tflops", res["tflops"], step)
    for key, value in relevance_metrics(res).items():
        writer.add_scalar(f"sweep/{key}", value, step)
    writer.add_text("sweep/schedule", res["name"], step)


def _tensorboard(out: Path, rows: list[dict[str, Any]]):
    """A fresh TensorBoard folder holding the points of the ``rows`` already done: results.json is the
    record, so a point lost to a kill (after the JSON, before TensorBoard) comes back on resume."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    for old in (out / "tensorboard").glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(out / "tensorboard"))
    for step in range(len(rows)):
        _add_points(writer, rows, step)
    writer.flush()
    return writer


def format_table(rows: list[dict[str, Any]]) -> str:
    """The sweep's rows as a plain-text table (relevance columns on data with relevant patches)."""
    relevance = bool(relevance_columns(rows))
    extra = f" {'relevant kept':>16} {'kept overlap':>16}" if relevance else ""
    lines = [f"{'schedule':<22} {'accuracy':>9} {'n':>6} {'TFLOPs':>10} {'kept tokens':>22} {'ms/sample':>10}{extra}"]
    for r in rows:
        kept = ",".join(f"{k:.1f}" for k in r["kept_tokens"])
        line = (f"{r['name']:<22} {100 * r['accuracy']:>8.1f}% {r['n']:>6} {r['tflops']:>10.2e} {kept:>22} "
                f"{r['ms_per_sample']:>10.2f}")  # fmt: skip
        if relevance:
            line += f" {per_stage_text(r.get('relevant_kept')):>16} {per_stage_text(r.get('kept_overlap')):>16}"
        lines.append(line)
    if relevance:
        lines.append(
            "relevant kept / kept overlap per stage: recall of the relevant patches; Jaccard of the kept sets "
            "of two questions about one image (1.00 = question-blind)"
        )
    return "\n".join(lines)
