"""DemoBaseModule (lightning_lvp/training/demo_base.py): the demo base trained from scratch, apart from LVPModule.

The loss and gradients equal those of the pruning model's masked forward without a method (what
``LVPModule(train_base=True)`` trained before #12), so experiments/demo_base.yaml trains the same base.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_fixtures import small_data_args, tiny_model_folder

from lightning_lvp.cli import main
from lightning_lvp.data.datamodule import LlavaDataModule
from lightning_lvp.data.digits import DigitsConfig
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.model import PrunedLlava
from lightning_lvp.training.demo_base import DemoBaseModule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_base")
    folder = tiny_model_folder(root / "model")
    dm = LlavaDataModule(
        str(folder),
        digits=DigitsConfig(train_images=16, val_images=8, question_types=["cell"]),
        cache_dir=str(root / "cache"),
        batch_size=4,
        num_workers=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    return root, folder, dm


@pytest.mark.parametrize("stage", ["train", "val"])
def test_loss_and_gradients_equal_the_pruned_forward_without_method(setup, stage):
    """Two paths on the same weights and the same curriculum masks: transformers' forward (DemoBaseModule)
    and PrunedLlava.forward_train without a method (the pre-#12 demo-base path), unfrozen for the test."""
    _, folder, dm = setup
    module = DemoBaseModule(str(folder), from_scratch=False, curriculum_start=2)
    module.configure_model()
    reference = PrunedLlava(copy.deepcopy(module.llava), None)
    reference.llava.requires_grad_(True)  # only to compare gradients; PrunedLlava keeps its base frozen
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(7)  # the curriculum's choice of hidden tokens (global RNG, as in training)
    inputs = model_inputs(batch)
    if stage == "train":
        inputs["attention_mask"], inputs["position_ids"] = module.curriculum.apply(batch)
        assert (inputs["attention_mask"] != batch["attention_mask"]).any(), "the curriculum hides some tokens"
    expected = reference.forward_train(**inputs, labels=batch["labels"])
    expected.loss_causal.backward()
    torch.manual_seed(7)
    res = module._losses(batch, stage)
    res["loss"].backward()
    torch.testing.assert_close(res["loss"], expected.loss_causal, rtol=1e-5, atol=1e-6)
    ours = dict(module.llava.named_parameters())
    theirs = dict(reference.llava.named_parameters())
    assert ours.keys() == theirs.keys()
    with_grad = [n for n, p in theirs.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > 10
    for name in with_grad:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


class _Losses(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_a_few_steps_lower_the_loss(setup):
    """Same 4 training samples every step (one batch, no curriculum): the loss must fall."""
    root, folder, dm = setup
    batch = next(iter(dm.train_dataloader()))
    module = DemoBaseModule(
        str(folder),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        warmup_ratio=0.0,
        lr_schedule="constant",
        curriculum=False,
    )
    losses = _Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
        default_root_dir=str(root / "run"),
    )
    loader = torch.utils.data.DataLoader([batch] * 10, batch_size=None)  # the same batch every step
    trainer.fit(module, train_dataloaders=loader)
    assert len(losses.values) == 10
    # measured: 6.43 -> 5.39 in 12 steps with a cosine decay (ln(vocab) ~ 6.4 at the start)
    assert losses.values[-1] < losses.values[0] - 0.5, losses.values
    assert all(b < a for a, b in zip(losses.values, losses.values[1:])), losses.values


def test_fit_demo_base_config_saves_a_base_that_loads(tmp_path):
    """The shipped experiments/demo_base.yaml, shrunk: a few steps, then the saved folder loads with
    PrunedLlava.from_pretrained and gives the trained model's logits."""
    folder = tiny_model_folder(tmp_path / "init", weights=False)  # config + processor only, as assets/demo_init
    out = tmp_path / "base"
    argv = [
        "fit",
        "-c",
        str(REPO / "experiments" / "demo_base.yaml"),
        f"--model.init_args.model_path={folder}",
        f"--model.init_args.save_base_to={out}",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        *small_data_args(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    loaded = PrunedLlava.from_pretrained(str(out))
    assert loaded.method is None
    # trained: not the random weights of a fresh build from the same config and seed
    fresh = DemoBaseModule(str(folder))
    L.seed_everything(0)
    fresh.configure_model()
    differs = [
        n
        for (n, p), q in zip(loaded.llava.named_parameters(), fresh.llava.parameters())
        if not torch.equal(p, q.detach())
    ]
    assert differs, "the saved base holds untrained weights"


def test_old_demo_base_config_fails_naming_the_new_module(tmp_path, capsys):
    """experiments/demo_base.yaml as it was before #12 (LVPModule, train_base: true)."""
    old = (REPO / "experiments" / "demo_base.yaml").read_text()
    old = old.replace("lightning_lvp.training.demo_base.DemoBaseModule", "lightning_lvp.lit_module.LVPModule")
    old = old.replace("    from_scratch: true\n", "    from_scratch: true\n    train_base: true\n")
    (tmp_path / "old.yaml").write_text(old)
    with pytest.raises((SystemExit, ValueError)) as failed:  # LightningCLI prints and exits, or raises
        main(["fit", "-c", str(tmp_path / "old.yaml"), f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err + str(failed.value)
    assert "model.from_scratch, model.train_base" in err
    assert "lightning_lvp.training.demo_base.DemoBaseModule" in err
    from lightning_lvp.lit_module import LVPModule

    with pytest.raises(ValueError, match="DemoBaseModule"):
        LVPModule(model_path="assets/demo_init", train_base=True)
