"""2-process CPU DDP fit (gloo): logged kept ratios and losses are the means over ranks."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from cli_fixtures import small_data_args, tiny_model_folder

REPO = Path(__file__).resolve().parents[1]


def test_ddp_two_processes_log_global_means(tmp_path):
    model_dir = tiny_model_folder(tmp_path / "model")
    probe = tmp_path / "probe"
    cmd = [
        sys.executable,
        "-m",
        "lightning_lvp",
        "fit",
        "-c",
        str(REPO / "experiments" / "demo.yaml"),
        f"--model.init_args.model_path={model_dir}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.callbacks+=ddp_probe.RankProbe",
        f"--trainer.callbacks.init_args.out_dir={probe}",
        *small_data_args(tmp_path / "cache"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[json.loads(x) for x in (probe / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(events[0])
    acc.Reload()
    for key in ("kept_ratio/input", "kept_ratio/layer4", "loss_causal", "loss_ratio"):
        logged = [e.value for e in acc.Scalars(f"train/{key}")]
        means = [(a[key] + b[key]) / 2 for a, b in zip(*ranks)]
        assert len(logged) == 3
        for got, want in zip(logged, means):
            assert abs(got - want) < 1e-5, (key, logged, means)
    # the DistributedSampler deals the two questions of each image to different ranks: the kept-set
    # overlap exists only because RatioSweep merges the ranks' accumulators
    overlap = [e.value for e in acc.Scalars("val/kept_overlap/input@rho0.5")]
    assert len(overlap) == 1 and 0.0 <= overlap[0] <= 1.0
    assert len(acc.Scalars("val/relevant_kept/layer4@rho0.5")) == 1
    differs = any(abs(a["loss_causal"] - b["loss_causal"]) > 1e-6 for a, b in zip(*ranks))
    assert differs, "the two ranks should see different data"
