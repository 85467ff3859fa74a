"""Kill and resume (issue #16): the CLI resumes a run with its own config, EXACTLY (bitwise equal to an
uninterrupted run), ``--ckpt_path last`` finds the run's checkpoint or fails, checkpoint writes are atomic
and an unreadable checkpoint is an error naming the file."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from cli_fixtures import tiny_model_folder

from lightning_lvp.checkpoint import (
    CheckpointReadError,
    atomic_write,
    atomic_write_text,
    load_checkpoint_file,
)
from lightning_lvp.cli import main, run_lightning_cli
from lightning_lvp.training.checkpoint_io import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]


class Killed(Exception):
    """Stands for a SIGKILL in the in-process kill test."""


class KillAt(L.Callback):
    """Stops the run (as a kill would) when training reaches ``step``."""

    def __init__(self, step: int = 7):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny_llava"))


def run_args(model_dir: Path, root: Path, cache: Path, steps: int = 10, extra: list[str] = ()) -> list[str]:
    """``fit -c <root>/run.yaml``: experiments/demo.yaml shrunk IN THE FILE (the command line carries no
    model or data value, as `fit -c CONFIG --ckpt_path CKPT` of issue #16, which LightningCLI then failed to
    re-parse). 10 steps over an 8-image (16-question, 4-batch) epoch cross two epoch ends; validation (which
    draws Gumbel noise) and last.ckpt every 3 steps."""
    cfg = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    cfg["trainer"].update(max_steps=steps, val_check_interval=3, limit_val_batches=1, default_root_dir=str(root))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "runs")
    cfg["model"]["init_args"]["model_path"] = str(model_dir)
    data = cfg["data"]["init_args"]
    data.update(cache_dir=str(cache), batch_size=4, val_batch_size=8, num_workers=0)
    data["digits"].update(train_images=8, val_images=8)
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return ["fit", "-c", str(root / "run.yaml"), *extra]


def final_state(cli) -> tuple[dict, dict, list[float]]:
    method = {k: v.clone() for k, v in cli.model.method.state_dict().items()}
    optimizer = cli.trainer.optimizers[0].state_dict()
    lr = cli.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    return method, optimizer, lr


def test_interrupted_run_resumed_from_the_cli_ends_bitwise_equal(model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    uninterrupted = run_lightning_cli(run_args(model_dir, tmp_path / "whole", cache))
    assert type(uninterrupted.trainer.progress_bar_callback).__name__ == "StepProgressBar"  # not "Epoch 0/-2"
    whole = final_state(uninterrupted)
    killed = run_args(model_dir, tmp_path / "cut", cache, extra=["--trainer.callbacks+=test_resume.KillAt"])
    with pytest.raises(Killed):
        run_lightning_cli(killed)  # dies mid-epoch 1, after the step-6 checkpoint
    ckpt = load_checkpoint_file(glob.glob(str(tmp_path / "cut" / "runs" / "**" / "last.ckpt"), recursive=True)[0])
    assert ckpt["global_step"] == 6 and "rng_states" in ckpt
    assert ckpt["hyper_parameters"]["method"]["class_path"] == "lightning_lvp.methods.LVPruning"
    assert ckpt["hyper_parameters"]["optimizer"]["init_args"]["weight_decay"] == 0.0  # the config's, not AdamW's
    # resume with exactly the run's config (no override of any model or data value) and --ckpt_path last
    resumed = final_state(run_lightning_cli(run_args(model_dir, tmp_path / "cut", cache, extra=["--ckpt_path=last"])))
    assert "resuming from" in capsys.readouterr().out
    method_a, opt_a, lr_a = whole
    method_b, opt_b, lr_b = resumed
    assert method_a.keys() == method_b.keys() and len(method_a) > 50
    different = [k for k in method_a if not torch.equal(method_a[k], method_b[k])]
    assert different == [], f"{len(different)} of {len(method_a)} pruner tensors differ after resume"
    assert lr_a == lr_b
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_ckpt_path_last_without_a_checkpoint_fails_loudly(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt_path last: no last.ckpt in the runs of"):
        main(run_args(model_dir, tmp_path, tmp_path / "cache", steps=1, extra=["--ckpt_path=last"]))
    assert not list((tmp_path / "runs").glob("**/*.ckpt"))  # and nothing was trained from scratch


def test_truncated_and_foreign_checkpoints_are_errors_naming_the_file(model_dir, tmp_path):
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.ones(2)}, foreign)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for path, message in (
        (truncated, "cannot be read"),
        (empty, "cannot be read"),
        (foreign, "not a Lightning checkpoint"),
    ):
        with pytest.raises(CheckpointReadError) as error:  # from the command line, before any training
            main(run_args(model_dir, tmp_path / "b", tmp_path / "cache", steps=4, extra=[f"--ckpt_path={path}"]))
        assert str(path) in str(error.value) and message in str(error.value)
    # the trainer's checkpoint IO (validate/test, Python use) names it too
    with pytest.raises(CheckpointReadError, match="truncated.ckpt"):
        AtomicCheckpointIO().load_checkpoint(truncated)
    assert AtomicCheckpointIO().load_checkpoint(good)["global_step"] == 3


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half of a new")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    # a checkpoint save goes through a temporary file in the SAME folder, never $TMPDIR
    seen = []
    real_replace = os.replace
    io = AtomicCheckpointIO()
    try:
        os.replace = lambda src, dst: seen.append((Path(src).parent, Path(dst))) or real_replace(src, dst)
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "sub" / "x.ckpt")
    finally:
        os.replace = real_replace
    assert seen == [(tmp_path / "sub", tmp_path / "sub" / "x.ckpt")]
    assert torch.equal(io.load_checkpoint(tmp_path / "sub" / "x.ckpt")["state_dict"]["w"], torch.ones(3))


@pytest.mark.slow
def test_sigkill_during_fit_then_resume_from_the_command_line(model_dir, tmp_path):
    """A real SIGKILL of `python -m lightning_lvp fit` once its step-6 checkpoint exists (with $TMPDIR on
    another folder), then `fit --ckpt_path last` from the command line: ends equal to an uninterrupted run."""
    cache = tmp_path / "cache"
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmpdir"), "PYTHONPATH": str(REPO / "tests")}
    (tmp_path / "tmpdir").mkdir()
    whole = final_state(run_lightning_cli(run_args(model_dir, tmp_path / "whole", cache, steps=12)))
    args = run_args(model_dir, tmp_path / "cut", cache, steps=12)
    proc = subprocess.Popen([sys.executable, "-m", "lightning_lvp", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    ckpt = tmp_path / "cut" / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint_file(ckpt)["global_step"] >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = load_checkpoint_file(ckpt)["global_step"]  # the file is whole (atomic write)
    assert 6 <= step < 12
    out = subprocess.run([sys.executable, "-m", "lightning_lvp", *args, "--ckpt_path=last"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = load_checkpoint_file(tmp_path / "cut" / "runs" / "demo" / "version_1" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 12
    method = whole[0]
    for name, value in method.items():
        assert torch.equal(value, resumed["state_dict"]["method." + name]), name
