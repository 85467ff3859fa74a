"""End-to-end check of the lmms-eval plugin with the REAL lmms-eval client (issue #13), offline, on CPU.

Run it with the eval environment's Python (``scripts/eval_e2e.sh`` builds that environment and calls
this script)::

    .venv-eval/bin/python scripts/lmms_e2e.py --out runs/lmms_e2e

Steps:
1. a small digits set (``lightning_lvp.data.digits``, validation split) written as LLaVA question /
   ground-truth JSONL files and as the data file of a LOCAL lmms-eval task (task YAML + utils.py under
   ``--include_path``; prompt = ``build_prompt("gqa", ..., suffix=False)`` (the demo model was
   trained on the bare question), score = ``gqa_exact_match``, the same
   functions the ``evaluate`` command uses);
2. pruner folders: LVPruning (``--lvp_pruners`` or, by default, seeded UNTRAINED decision modules on
   the LLM input and after layers 2, 4, keeping [0.5, 0.3, 0.1] -- this checks the plumbing, not the
   method; pruning the input at random makes the score differ from the unpruned one, which a
   check of equal scores needs, since the demo base answers inside layer 1: docs/RESULTS.md) and
   FastV (K=2, keep 25 %);
3. for the unpruned model, LVPruning and FastV: ``lmms-eval --model lightning_lvp ...`` (its own CLI,
   ``--batch_size auto``, ``--device cpu``), then ``python -m lightning_lvp evaluate`` on the same
   items; the results JSON must exist (lmms-eval exits 0 even when a run failed) and both scores must
   be equal;
4. optionally (``--processes 2``) the unpruned run again under ``accelerate launch --multi_gpu
   --num_processes 2`` (CPU processes, gloo): both ranks must run, the gathered samples must hold
   every document exactly once, and the score must not change.

Writes ``OUT/summary.json``; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = "digits_e2e"
BENCHMARK = "gqa"  # prompt suffix and exact-match scorer shared by both sides
MAX_NEW_TOKENS = 16

TASK_YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
  until: ["</s>"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = f'''"""lmms-eval task functions for the digits e2e check (written by scripts/lmms_e2e.py)."""
from PIL import Image

from lightning_lvp.eval.benchmarks import build_prompt
from lightning_lvp.eval.scorers import gqa_exact_match


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return build_prompt("{BENCHMARK}", doc, suffix=False)


def process_results(doc, results):
    return {{"exact_match": gqa_exact_match(results[0].strip(), doc["answer"])}}
'''


def build_items(out: Path, n_images: int) -> tuple[Path, Path, Path, Path]:
    """Digits validation items -> (image root, questions JSONL, ground truth JSONL, lmms data JSONL)."""
    from lightning_lvp.data.digits import DigitsConfig, ensure_digits_dataset

    root = ensure_digits_dataset(DigitsConfig(train_images=1, val_images=n_images), out / "digits")
    entries = json.loads((root / "val.json").read_text())
    q_path, gt_path, data_path = out / "questions.jsonl", out / "ground_truth.jsonl", out / "lmms_data.jsonl"
    with q_path.open("w") as q, gt_path.open("w") as gt, data_path.open("w") as data:
        for e in entries:
            text = e["conversations"][0]["value"].replace("<image>", "").strip()
            answer = e["conversations"][1]["value"]
            q.write(json.dumps({"question_id": e["id"], "image": e["image"], "text": text}) + "\n")
            gt.write(json.dumps({"question_id": e["id"], "answer": answer}) + "\n")
            data.write(
                json.dumps(
                    {"question_id": e["id"], "image_path": str(root / e["image"]), "text": text, "answer": answer}
                )
                + "\n"
            )
    return root, q_path, gt_path, data_path


def write_task(out: Path, data_path: Path) -> Path:
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(data=data_path))
    (folder / "utils.py").write_text(TASK_UTILS)
    return folder


def write_pruners(out: Path, model: str, lvp_pruners: str | None) -> dict[str, str | None]:
    """Pruner folders per method name (None = unpruned)."""
    import torch

    from lightning_lvp import adapter
    from lightning_lvp.io import save_pruners
    from lightning_lvp.methods import FastV, LVPruning
    from lightning_lvp.model import PrunedLlava

    llava = adapter.load_llava(model)
    folders: dict[str, str | None] = {"unpruned": None}
    if lvp_pruners:
        folders["lvpruning"] = lvp_pruners
    else:
        torch.manual_seed(0)
        lvp = LVPruning(
            after_layers=[0, 2, 4], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_blocks=2, num_heads=4
        )
        PrunedLlava(llava, lvp)
        folders["lvpruning"] = str(save_pruners(lvp, out / "pruners_lvp", overwrite=True))
    fastv = FastV(k=2, keep_ratio=0.25)
    PrunedLlava(llava, fastv)
    folders["fastv"] = str(save_pruners(fastv, out / "pruners_fastv", overwrite=True))
    return folders


def offline_env() -> dict[str, str]:
    env = dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run(cmd: list[str], log_path: Path) -> tuple[int, float]:
    """Runs ``cmd`` with its output in ``log_path``; returns (exit code, seconds)."""
    start = time.time()
    with log_path.open("w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=offline_env(), cwd=REPO).returncode
    return rc, time.time() - start


def lmms_command(model: str, pruners: str | None, tasks: Path, output: Path, processes: int) -> list[str]:
    model_args = f"pretrained={model},max_new_tokens={MAX_NEW_TOKENS}" + (f",pruners={pruners}" if pruners else "")
    args = [
        "--model",
        "lightning_lvp",
        "--model_args",
        model_args,
        "--tasks",
        TASK,
        "--include_path",
        str(tasks),
        "--batch_size",
        "auto",
        "--device",
        "cpu",
        "--output_path",
        str(output),
        "--log_samples",
    ]
    if processes > 1:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        # --multi_gpu is accelerate's multi-process launcher (torchrun); without CUDA each process runs on
        # the CPU with gloo. (--cpu would start ONE process whatever --num_processes says.)
        return [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "lmms_eval",
            *args,
        ]
    return [sys.executable, "-m", "lmms_eval", *args]


def lmms_result(output: Path) -> tuple[float | None, str | None, list[int]]:
    """(exact_match, results file, doc ids of the logged samples) of the newest run under ``output``."""
    files = sorted(glob.glob(str(output / "**" / "*_results.json"), recursive=True), key=os.path.getmtime)
    if not files:
        return None, None, []
    res = json.loads(Path(files[-1]).read_text())
    score = res["results"][TASK]["exact_match,none"]
    samples = glob.glob(str(Path(files[-1]).parent / f"*samples_{TASK}*.jsonl"))
    docs = [json.loads(line)["doc_id"] for f in samples for line in open(f) if line.strip()]
    return float(score), files[-1], docs


def evaluate_command(model: str, pruners: str | None, root: Path, q: Path, gt: Path, answers: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "lightning_lvp",
        "evaluate",
        "--benchmark",
        BENCHMARK,
        "--questions",
        str(q),
        "--ground_truth",
        str(gt),
        "--image_folder",
        str(root),
        "--model_path",
        model,
        "--batch_size",
        "8",
        "--max_new_tokens",
        str(MAX_NEW_TOKENS),
        "--answers",
        str(answers),
        "--overwrite",
        "--prompt_suffix",
        "false",
    ]
    return cmd + (["--pruners", pruners] if pruners else [])


def evaluate_result(log_path: Path) -> float | None:
    text = log_path.read_text()
    start = text.rfind('{\n  "metrics"')
    return None if start < 0 else float(json.loads(text[start:])["metrics"]["accuracy"])


def check_method(name: str, pruners: str | None, args, paths, out: Path, processes: int = 1) -> dict:
    root, q, gt, _, tasks = paths
    tag = name if processes == 1 else f"{name}_x{processes}"
    rc, secs = run(lmms_command(args.model, pruners, tasks, out / "lmms" / tag, processes), out / f"lmms_{tag}.log")
    lmms_score, results_file, docs = lmms_result(out / "lmms" / tag)
    log_text = (out / f"lmms_{tag}.log").read_text(errors="replace")
    ranks = sorted({r for r in range(processes) if f"Running on rank {r} " in log_text})
    row = {
        "method": name,
        "processes": processes,
        "lmms_rc": rc,
        "lmms_seconds": round(secs, 1),
        "results_json": results_file,
        "lmms_exact_match": lmms_score,
        "logged_samples": len(docs),
        "distinct_docs": len(set(docs)),
        "ranks_seen": ranks,
    }
    if processes == 1:
        erc, esecs = run(
            evaluate_command(args.model, pruners, root, q, gt, out / f"answers_{name}.jsonl"),
            out / f"evaluate_{name}.log",
        )
        row.update(
            evaluate_rc=erc,
            evaluate_seconds=round(esecs, 1),
            evaluate_accuracy=evaluate_result(out / f"evaluate_{name}.log"),
        )
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/lmms_e2e", help="output folder (data, task, logs, results)")
    p.add_argument("--model", default=str(REPO / "assets" / "demo_base"), help="llava-hf model folder")
    p.add_argument("--lvp_pruners", default=None, help="trained LVPruning pruners (default: seeded untrained modules)")
    p.add_argument("--n_images", type=int, default=20, help="digit grids (2 questions each)")
    p.add_argument(
        "--processes", type=int, default=1, help="also run the unpruned model under accelerate with N CPU processes"
    )
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root, q, gt, data = build_items(out, args.n_images)
    paths = (root, q, gt, data, write_task(out, data))
    n_items = sum(1 for _ in q.open())
    rows = [
        check_method(name, folder, args, paths, out)
        for name, folder in write_pruners(out, args.model, args.lvp_pruners).items()
    ]
    if args.processes > 1:
        rows.append(check_method("unpruned", None, args, paths, out, args.processes))
    failures = []
    for r in rows:
        if r["results_json"] is None:
            failures.append(f"{r['method']} x{r['processes']}: no results JSON (lmms-eval rc {r['lmms_rc']})")
            continue
        want = r.get("evaluate_accuracy", rows[0].get("evaluate_accuracy"))
        if want is None or abs(r["lmms_exact_match"] - want) > 1e-9:
            failures.append(f"{r['method']} x{r['processes']}: lmms-eval {r['lmms_exact_match']} != evaluate {want}")
        if r["logged_samples"] != n_items or r["distinct_docs"] != n_items:
            failures.append(
                f"{r['method']} x{r['processes']}: {r['logged_samples']} logged samples "
                f"({r['distinct_docs']} distinct), {n_items} items"
            )
        if r["ranks_seen"] != list(range(r["processes"])):
            failures.append(f"{r['method']} x{r['processes']}: ranks seen {r['ranks_seen']}")
    summary = {"items": n_items, "model": args.model, "rows": rows, "failures": failures}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"items": n_items, "failures": failures}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
