"""The real CLI entry with shipped configs shrunk by flags (litgpt test_full / template fast_dev_run style)."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from cli_fixtures import small_data_args, tiny_model_folder

from lightning_lvp.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny_llava"))


def scalar_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | {f"image:{t}" for t in acc.Tags()["images"]}
    return tags


def fit_args(model_dir: Path, root: Path, steps: int = 2, extra: list[str] = ()) -> list[str]:
    return [
        "fit",
        "-c",
        str(REPO / "experiments" / "demo.yaml"),
        f"--model.init_args.model_path={model_dir}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        *small_data_args(root.parent / "digits_cache"),
        *extra,
    ]


def test_fit_logs_ratios_losses_and_sweep_and_keeps_llava_frozen(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    before = load_file(str(model_dir / "model.safetensors"))
    main(fit_args(model_dir, tmp_path))
    tags = scalar_tags(tmp_path / "runs")
    for tag in (
        "train/loss_causal",
        "train/loss_ratio",
        "train/kept_ratio/input",
        "train/loss_distill",  # the demo's opt-in distillation term
        "train/kept_ratio/layer4",
        "val/kept_ratio/layer2",
        "val/acc",
        "val/acc@base",
        "val/acc@rho0.5",
        "val/tflops@rho0.45",
        "val/relevant_kept/input@rho0.5",  # digits entries carry relevant patches
        "val/kept_overlap/layer4@rho0.6",
        "image:val/pruning",  # kept patches per stage drawn on validation images
        "image:val/acc_vs_tflops",  # the sweep plot
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    out = capsys.readouterr().out
    assert "Ratio sweep" in out and "rho0.6" in out and "TensorBoard logs" in out
    assert "relevant kept" in out and "kept overlap" in out
    ckpt = torch.load(glob.glob(str(tmp_path / "runs" / "**" / "last.ckpt"), recursive=True)[0], weights_only=False)
    assert not any(k.startswith("model.llava.") for k in ckpt["state_dict"]), "checkpoint holds the frozen LLaVA"
    assert any(k.startswith("method.decision.") for k in ckpt["state_dict"])
    after = load_file(str(model_dir / "model.safetensors"))  # base folder untouched: same tensors, same values
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"fit changed the base model's weights on disk: {changed[:5]}"


def test_resume_continues_from_checkpoint(model_dir, tmp_path):
    main(fit_args(model_dir, tmp_path / "a", steps=2))
    last = glob.glob(str(tmp_path / "a" / "runs" / "**" / "last.ckpt"), recursive=True)[0]
    first = torch.load(last, weights_only=False)
    main(fit_args(model_dir, tmp_path / "b", steps=4, extra=[f"--ckpt_path={last}"]))
    resumed = torch.load(
        glob.glob(str(tmp_path / "b" / "runs" / "**" / "last.ckpt"), recursive=True)[0], weights_only=False
    )
    assert first["global_step"] == 2 and resumed["global_step"] == 4
    key = next(k for k in first["state_dict"] if k.startswith("method."))
    assert not torch.equal(first["state_dict"][key], resumed["state_dict"][key])
    # export: pruner-only folder from the checkpoint, loadable on its own, same weights
    from lightning_lvp import adapter
    from lightning_lvp.io import load_pruners

    assert main(["export", f"--ckpt_path={last}", f"--out={tmp_path / 'pruners'}"]) == 0
    method = load_pruners(tmp_path / "pruners", adapter.text_dims(adapter.load_config(str(model_dir))))
    for name, value in method.state_dict().items():
        assert torch.equal(value, first["state_dict"]["method." + name])
    with pytest.raises(FileExistsError, match="already holds pruners"):
        main(["export", f"--ckpt_path={last}", f"--out={tmp_path / 'pruners'}"])


def test_bad_config_values_name_the_field(model_dir, tmp_path):
    with pytest.raises(ValueError, match="keep_ratios must be non-increasing"):
        main(fit_args(model_dir, tmp_path, extra=["--model.init_args.method.init_args.keep_ratios=[0.5,0.6,0.1]"]))
    with pytest.raises(ValueError, match=r"after_layers \[1, 2, 7\] out of range for an LLM with 6 layers"):
        main(fit_args(model_dir, tmp_path, extra=["--model.init_args.method.init_args.after_layers=[1,2,7]"]))
    with pytest.raises(ValueError, match="model.warmup_ratio must be in"):
        main(fit_args(model_dir, tmp_path, extra=["--model.init_args.warmup_ratio=1.5"]))


def test_demo_base_config_reproduces_a_loadable_base(tmp_path):
    """experiments/demo_base.yaml (shrunk) trains a base from scratch and saves it like assets/demo_base."""
    from safetensors.torch import load_file

    from lightning_lvp import adapter

    out = tmp_path / "base"
    main(
        [
            "fit",
            "-c",
            str(REPO / "experiments" / "demo_base.yaml"),
            f"--model.init_args.model_path={REPO / 'assets' / 'demo_init'}",
            f"--model.init_args.save_base_to={out}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            *small_data_args(tmp_path / "cache"),
        ]
    )
    shipped = adapter.load_config(str(REPO / "assets" / "demo_base"))
    assert adapter.text_dims(adapter.load_config(str(out))) == adapter.text_dims(shipped)
    assert (
        load_file(str(out / "model.safetensors")).keys()
        == load_file(str(REPO / "assets" / "demo_base" / "model.safetensors")).keys()
    )
    assert (out / "tokenizer.json").read_text() == (REPO / "assets" / "demo_base" / "tokenizer.json").read_text()
    model = adapter.load_llava(str(out))  # loads with our attention, frozen
    assert not any(p.requires_grad for p in model.parameters())
