"""Training the CPU demo's base model from scratch: every weight of a tiny LLaVA, no pruning.

``python -m lightning_lvp fit -c experiments/demo_base.yaml`` builds the model from ``model_path``'s config
with random weights, trains it on the digits grids with the token-drop curriculum
(:mod:`lightning_lvp.training.curriculum`; without it position look-up from scratch learns far slower,
docs/DATA.md) and saves it with ``save_pretrained`` to ``save_base_to``. The pruners are then trained on
the frozen result by :class:`~lightning_lvp.training.module.LVPModule` (experiments/demo.yaml).

The forward is transformers' own (``LlavaForConditionalGeneration.forward``, public API): the masked
attention of the pruning path has nothing to do here. The loss and the accuracy are those of
:meth:`PrunedVLM.forward_train` without a method (tests/test_demo_base.py compares the two paths).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from lightning_lvp import adapter
from lightning_lvp.eval.teacher_forced import model_inputs, per_sample_exact_match
from lightning_lvp.state import positions_from_mask
from lightning_lvp.training.common import DTYPES, TrainingModule, rename_prefix
from lightning_lvp.training.curriculum import TokenDropCurriculum


def answer_logits(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict a label token (position t predicts label t + 1, as HF's causal LM loss).

    Args:
        logits: (B, T, V).
        labels: (B, T), -100 outside the answers.
        attention_mask: (B, T), 0 at padding and at tokens the curriculum hides.

    Returns:
        logits (N, V), targets (N,), sample_index (N,) - the layout of :meth:`PrunedVLM.label_logits`.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).masked_fill(~attention_mask.bool(), -100)  # (B, T)
    sel = targets != -100
    return logits[sel], targets[sel], sel.nonzero()[:, 0]


class DemoBaseModule(TrainingModule):
    """Trains every weight of a (tiny) LLaVA from scratch, without pruning: the CPU demo's base.

    Args:
        model_path: folder with the model's config and processor (e.g. ``assets/demo_init``, written by
            ``python -m lightning_lvp.demo init``).
        from_scratch: random weights from model_path's config (the demo); False = go on training its weights.
        dtype: dtype of the weights (use trainer.precision bf16-mixed for mixed precision).
        optimizer: optimizer over all the model's weights (class_path/init_args; lr etc. in config).
        warmup_ratio: fraction of the training steps with linear LR warm-up.
        lr_schedule: "cosine" or "constant" after warm-up.
        curriculum: token-drop curriculum (lightning_lvp/training/curriculum.py): each training sample shows
            only n of its vision tokens, n grows with the training accuracy.
        curriculum_start: vision tokens shown at the start of the curriculum.
        curriculum_window: training samples per curriculum accuracy window.
        save_base_to: after fit, save the trained model to this folder with save_pretrained (+ the processor
            of model_path); None = do not save.
    """

    def __init__(
        self,
        model_path: str,
        from_scratch: bool = True,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.05,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        curriculum: bool = True,
        curriculum_start: int = 4,
        curriculum_window: int = 256,
        save_base_to: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self._record_config()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"model.lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.config = adapter.load_config(model_path)
        self.optimizer_fn = optimizer
        self.llava: torch.nn.Module | None = None
        self.curriculum = None
        if curriculum:
            n = int(self.config.image_seq_length)
            self.curriculum = TokenDropCurriculum(max_n=n, start_n=curriculum_start, window=curriculum_window)
        # checkpoints of LVPModule(train_base=True), before #12, held the weights under model.llava.*
        self.register_load_state_dict_pre_hook(
            lambda module, sd, prefix, *_: rename_prefix(sd, prefix + "model.llava.", prefix + "llava.")
        )

    def configure_model(self) -> None:
        """Builds (or loads) the model once per process, every weight trainable."""
        if self.llava is not None:
            return
        hp = self.hparams
        dtype = DTYPES[hp.dtype]
        llava = (
            adapter.build_from_config(self.config, dtype=dtype)
            if hp.from_scratch
            else adapter.load_llava(hp.model_path, dtype=dtype)
        )
        self.llava = llava.requires_grad_(True)

    def _losses(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        inputs = model_inputs(batch)
        mask = inputs["attention_mask"]
        positions = positions_from_mask(mask)
        if stage == "train" and self.curriculum is not None:
            mask, positions = self.curriculum.apply(batch)  # hidden tokens keep their ORIGINAL positions
        logits = self.llava(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=mask,
            position_ids=positions,
        ).logits
        logits, targets, rows = answer_logits(logits, batch["labels"], mask)
        loss = F.cross_entropy(logits.float(), targets) if targets.numel() else logits.sum() * 0.0
        correct = per_sample_exact_match(logits, targets, rows, batch["input_ids"].shape[0])
        result = {"loss": loss, "loss_causal": loss.detach(), "acc_masked": correct.float().mean()}
        if stage == "train" and self.curriculum is not None:
            self.curriculum.update(correct.detach().cpu())
            result["curriculum_n"] = torch.tensor(float(self.curriculum.n))
        return result

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        res = self._losses(batch, "train")
        self.last_step_values = {k: float(v.detach()) for k, v in res.items()}  # this rank's values
        bs = batch["input_ids"].shape[0]
        for k, v in res.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k in ("loss", "curriculum_n"), batch_size=bs, sync_dist=True)
        return res["loss"]

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch["input_ids"].shape[0]
        res = self._losses(batch, "val")  # every vision token shown
        for k, v in res.items():
            self.log(f"val/{k}", v, batch_size=bs, sync_dist=True)
        self.log("val/acc", res["acc_masked"], prog_bar=True, batch_size=bs, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.curriculum is not None:
            checkpoint["curriculum"] = self.curriculum.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.curriculum is not None and "curriculum" in checkpoint:
            self.curriculum.load_state_dict(checkpoint["curriculum"])

    def on_fit_end(self) -> None:
        if self.hparams.save_base_to and self.trainer.is_global_zero:
            adapter.save_llava(self.llava, self.hparams.save_base_to, self.hparams.model_path)
