"""LightningModule: steps, losses, optimizer and logging around :class:`PrunedLlava` (no model maths here)."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_lvp import adapter
from lightning_lvp.decision import ratio_loss
from lightning_lvp.eval.teacher_forced import model_inputs, per_sample_exact_match, stage_name
from lightning_lvp.io import method_spec
from lightning_lvp.methods.base import PruningMethod
from lightning_lvp.model import PrunedLlava
from lightning_lvp.teacher import answer_attention, distillation_loss
from lightning_lvp.training.curriculum import TokenDropCurriculum

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def warmup_cosine(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 0 (LLaVA / HF ``cosine``) or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class LVPModule(L.LightningModule):
    """Trains LVPruning decision modules on a frozen LLaVA (or, for the CPU demo, a tiny base).

    Args:
        model_path: llava-hf format LLaVA: hub id (e.g. llava-hf/llava-1.5-7b-hf) or local folder.
        method: pruning method (class_path/init_args), e.g. lightning_lvp.methods.LVPruning.
        from_scratch: random weights from model_path's config instead of its weights (tiny demo base).
        train_base: train every LLaVA weight without pruning (tiny demo base only; method must be None).
        dtype: dtype of the LLaVA weights (use trainer.precision bf16-mixed for mixed precision).
        lambda_causal: weight of the instruction-tuning loss L_causal.
        lambda_ratio: weight of the kept-ratio loss L_ratio.
        ratio_loss: "mse" (paper) or "huber".
        ratio_beta: Huber transition point.
        tau: Gumbel-Softmax temperature (at the start if tau_final is set).
        tau_final: temperature reached at the end of training (linear schedule); None = constant tau.
        ratio_anneal: fraction of the training steps over which the ratio loss's targets go linearly from 1.0
            (keep everything) to ``method.train_ratios`` (0 = the targets from the first step, as the paper).
            The causal loss then ranks the tokens while few are dropped (docs/RESULTS.md).
        lambda_distill: weight of the OPT-IN attention-distillation term (lightning_lvp/teacher.py; not in the
            paper, 0 = the paper's objective): KL from the unpruned base's answer attention over the vision
            tokens to the modules' keep scores, every stage.
        distill_temperature: sharpening of that teacher distribution (< 1 = sharper).
        optimizer: optimizer over the trainable parameters only (class_path/init_args; lr etc. in config).
        warmup_ratio: fraction of the training steps with linear LR warm-up (paper: 0.03).
        lr_schedule: "cosine" (paper) or "constant" after warm-up.
        gradient_checkpointing: recompute LLM layers in backward (activations still carry gradients to the modules).
        val_ratios: inference schedule of val/acc; None = the method's keep_ratios.
        curriculum: token-drop curriculum while training a base from scratch (see lightning_lvp/training/curriculum.py).
        curriculum_start: vision tokens shown at the start of the curriculum.
        curriculum_window: training samples per curriculum accuracy window.
        save_base_to: after fit, save the trained base (train_base only) to this folder with save_pretrained.
    """

    def __init__(
        self,
        model_path: str,
        method: PruningMethod | None = None,
        from_scratch: bool = False,
        train_base: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lambda_causal: float = 1.0,
        lambda_ratio: float = 1.0,
        ratio_loss: Literal["mse", "huber"] = "mse",
        ratio_beta: float = 0.5,
        tau: float = 1.0,
        tau_final: float | None = None,
        ratio_anneal: float = 0.0,
        lambda_distill: float = 0.0,
        distill_temperature: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.03,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        gradient_checkpointing: bool = False,
        val_ratios: list[float] | None = None,
        curriculum: bool = False,
        curriculum_start: int = 4,
        curriculum_window: int = 256,
        save_base_to: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["method", "optimizer"])
        self._record_config(method)
        self._validate(method)
        self.config = adapter.load_config(model_path)
        self.method = method
        if method is not None:
            method.bind(adapter.text_dims(self.config))
        self.optimizer_fn = optimizer
        self.model: PrunedLlava | None = None
        # checkpoints never hold the frozen LLaVA (it comes from model_path), so loading is not strict
        self.strict_loading = bool(train_base)
        self.curriculum = None
        if curriculum:
            self.curriculum = TokenDropCurriculum(
                max_n=int(self.config.image_seq_length), start_n=curriculum_start, window=curriculum_window
            )

    def _record_config(self, method: PruningMethod | None) -> None:
        """Stores ``method`` and ``optimizer`` as configs (class_path/init_args) in ``hparams``.

        ``fit --ckpt_path`` in LightningCLI 2.6 re-parses the model's init args from the checkpoint's
        ``hyper_parameters`` (``LightningCLI._parse_ckpt_path``), so they must hold the WHOLE model config:
        without ``method`` the resumed run failed with "model.method is required", without ``optimizer``
        AdamW fell back to its defaults. Built by the CLI, the configs it gave are kept as they are;
        built in Python, the method is described by :func:`method_spec` (the optimizer, a callable, is not).
        """
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters  # set by LightningCLI

        given = _given_hyperparameters.get() or {}
        self.hparams["method"] = given.get("method", method_spec(method) if method is not None else None)
        if "optimizer" in given:
            self.hparams["optimizer"] = given["optimizer"]
        self._hparams_initial = copy.deepcopy(self._hparams)

    def _validate(self, method: PruningMethod | None) -> None:
        hp = self.hparams
        if hp.train_base and method is not None:
            raise ValueError("model.train_base trains the base model without pruning: set model.method to null")
        if not hp.train_base and method is None:
            raise ValueError("model.method is required (e.g. class_path: lightning_lvp.methods.LVPruning)")
        if method is not None and not method.trainable:
            raise ValueError(f"model.method {type(method).__name__} is training-free: use `sweep`, not `fit`")
        if hp.curriculum and not hp.train_base:
            raise ValueError("model.curriculum is for training a base from scratch (model.train_base: true)")
        for name in ("lambda_causal", "lambda_ratio", "lambda_distill"):
            if getattr(hp, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(hp, name)}")
        if hp.tau <= 0 or (hp.tau_final is not None and hp.tau_final <= 0):
            raise ValueError(f"model.tau and model.tau_final must be > 0, got {hp.tau}, {hp.tau_final}")
        if not 0.0 <= hp.warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio must be in [0, 1), got {hp.warmup_ratio}")
        if not 0.0 <= hp.ratio_anneal <= 1.0:
            raise ValueError(f"model.ratio_anneal must be in [0, 1], got {hp.ratio_anneal}")
        if hp.ratio_loss not in ("mse", "huber"):
            raise ValueError(f"model.ratio_loss must be 'mse' or 'huber', got {hp.ratio_loss!r}")

    # ------------------------------------------------------------------------------ model set-up
    def configure_model(self) -> None:
        """Loads (or builds) the LLaVA once per process; Lightning calls it before fit/validate."""
        if self.model is not None:
            return
        hp = self.hparams
        dtype = DTYPES[hp.dtype]
        if hp.from_scratch:
            llava = adapter.build_from_config(self.config, dtype=dtype)
        else:
            llava = adapter.load_llava(hp.model_path, dtype=dtype)
        self.model = PrunedLlava(llava, self.method, hp.gradient_checkpointing, frozen=not hp.train_base)

    @property
    def stage_names(self) -> list[str]:
        """Metric suffix per stage: ``layer<l>`` (after LLM layer l), ``input`` for after_layer 0."""
        return [stage_name(layer) for layer in self.method.after_layers] if self.method else []

    # ------------------------------------------------------------------------------------ steps
    def current_tau(self) -> float:
        """Gumbel temperature now: constant, or linear from tau to tau_final over training."""
        hp = self.hparams
        if hp.tau_final is None or self._trainer is None:
            return hp.tau
        total = max(1, int(self.trainer.estimated_stepping_batches))
        frac = min(1.0, self.global_step / total)
        return hp.tau + (hp.tau_final - hp.tau) * frac

    def current_ratio_targets(self) -> list[float]:
        """Targets of L_ratio now: ``train_ratios``, or on the way there from 1.0 during ``ratio_anneal``."""
        hp, final = self.hparams, list(self.method.train_ratios)
        if hp.ratio_anneal <= 0 or self._trainer is None:
            return final
        total = max(1, int(self.trainer.estimated_stepping_batches))
        frac = min(1.0, self.global_step / max(1.0, hp.ratio_anneal * total))
        return [1.0 + (r - 1.0) * frac for r in final]

    def _losses(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        hp = self.hparams
        inputs = model_inputs(batch)
        if stage == "train" and self.curriculum is not None:
            inputs["attention_mask"], inputs["position_ids"] = self.curriculum.apply(batch)
        distill = hp.lambda_distill > 0 and self.method is not None
        out = self.model.forward_train(**inputs, labels=batch["labels"], tau=self.current_tau(), return_scores=distill)
        result = {"loss_causal": out.loss_causal}
        loss = hp.lambda_causal * out.loss_causal
        if self.method is not None:
            targets = torch.tensor(self.current_ratio_targets(), device=out.kept.device)
            result["loss_ratio"] = ratio_loss(out.kept, targets, hp.ratio_loss, hp.ratio_beta)
            if stage == "train" and getattr(self.method, "ratio_control", 0) > 0:
                kept_mean = out.kept.detach().mean(0)
                if self._trainer is not None:  # every rank steps the same bias (DDP also broadcasts buffers)
                    kept_mean = self.trainer.strategy.reduce(kept_mean, reduce_op="mean")
                self.method.control_ratios(kept_mean, targets)  # integral ratio control (not in the paper)
                for name, bias in zip(self.stage_names, self.method.ratio_bias):
                    result[f"ratio_bias/{name}"] = bias.detach().clone()
            loss = loss + hp.lambda_ratio * result["loss_ratio"]
            if distill:
                teacher = answer_attention(
                    self.model, **model_inputs(batch), labels=batch["labels"], temperature=hp.distill_temperature
                )
                vision = batch["vision_mask"].bool() & inputs["attention_mask"].bool()
                result["loss_distill"] = distillation_loss(out.scores, teacher, vision)
                loss = loss + hp.lambda_distill * result["loss_distill"]
            for name, kept in zip(self.stage_names, out.kept.mean(0)):
                result[f"kept_ratio/{name}"] = kept.detach()
        correct = per_sample_exact_match(out.logits, out.targets, out.sample_index, batch["input_ids"].shape[0])
        result["acc_masked"] = correct.float().mean()
        if stage == "train" and self.curriculum is not None:
            self.curriculum.update(correct.detach().cpu())
            result["curriculum_n"] = torch.tensor(float(self.curriculum.n))
        result["loss"] = loss
        return result

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        res = self._losses(batch, "train")
        self.last_step_values = {
            k: float(v.detach()) for k, v in res.items()
        }  # this rank's values, before the all-reduce
        bs = batch["input_ids"].shape[0]
        for k, v in res.items():
            show = k in ("loss", "loss_ratio") or k.startswith("kept_ratio") or k == "curriculum_n"
            self.log(
                f"train/{k}", v.detach() if torch.is_tensor(v) else v, prog_bar=show, batch_size=bs, sync_dist=True
            )
        self.log("train/tau", self.current_tau(), batch_size=bs)
        return res["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch["input_ids"].shape[0]
        res = self._losses(batch, "val")  # masked path: losses and kept ratios on held-out data
        for k, v in res.items():
            self.log(f"val/{k}", v, prog_bar=k.startswith("kept_ratio"), batch_size=bs, sync_dist=True)
        # token-removing inference path at the validation schedule: the deployment accuracy
        with torch.no_grad():
            out = self.model.forward_infer(**model_inputs(batch), ratios=self.hparams.val_ratios)
            logits, targets, rows = self.model.label_logits(out.hidden, out.state, batch["labels"])
            acc = per_sample_exact_match(logits, targets, rows, bs).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=bs, sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Greedy answers, (B, n) new token ids, for prompt-only (left-padded) batches at val_ratios."""
        return self.model.generate(**model_inputs(batch), ratios=self.hparams.val_ratios, max_new_tokens=16)

    # -------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: is model.method set?")
        optimizer = self.optimizer_fn(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(self.hparams.warmup_ratio * total)) if self.hparams.warmup_ratio > 0 else 0  # >= 1 step
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, self.hparams.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------- run set-up and resume state
    def setup(self, stage: str) -> None:
        """Checkpoints are written atomically (a kill during a save never destroys ``last.ckpt``) and an
        unreadable one fails naming the file: :class:`~lightning_lvp.training.checkpoint_io.AtomicCheckpointIO`
        replaces the strategy's default ``TorchCheckpointIO`` (a plugin the user chose is kept)."""
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from lightning_lvp.training.checkpoint_io import AtomicCheckpointIO

        strategy = self.trainer.strategy
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def configure_callbacks(self) -> list[L.Callback]:
        """Always on: the bad-sample report (:class:`~lightning_lvp.data.skips.SkipReport`); for a
        step-based run, a progress bar counting steps instead of ``Epoch 0/-2``."""
        from lightning.pytorch.callbacks import RichProgressBar

        from lightning_lvp.data.skips import SkipReport
        from lightning_lvp.training.progress import StepProgressBar, step_based

        callbacks: list[L.Callback] = [SkipReport()]
        bar = self.trainer.progress_bar_callback
        if type(bar) is RichProgressBar and step_based(self.trainer):
            callbacks.append(StepProgressBar(leave=bar._leave, theme=bar.theme, console_kwargs=bar._console_kwargs))
        return callbacks

    def on_validation_epoch_start(self) -> None:
        """Validation draws Gumbel noise (``forward_train``) from the global RNG: it runs on a copy of the
        RNG state, so training continues with the same noise whether or not (and how often) it validated,
        and a resumed run matches an uninterrupted one."""
        from lightning_lvp.checkpoint import rng_states

        self._rng_outside_validation = rng_states()

    def on_validation_epoch_end(self) -> None:
        from lightning_lvp.checkpoint import set_rng_states

        states, self._rng_outside_validation = getattr(self, "_rng_outside_validation", None), None
        if states is not None:
            set_rng_states(states)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """First batch after a resume: the RNG states of the moment the checkpoint was saved (the data order
        comes from the data module's own generators; this restores the Gumbel noise and dropout)."""
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states is not None:
            from lightning_lvp.checkpoint import set_rng_states

            set_rng_states(states)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Pruner (and loop/optimizer) state only: never a copy of the frozen LLaVA; plus the RNG states
        (those of training when saved during validation) for an exact resume."""
        from lightning_lvp.checkpoint import rng_states

        outside = getattr(self, "_rng_outside_validation", None)
        checkpoint["rng_states"] = outside or rng_states()
        if not self.hparams.train_base:
            sd = checkpoint["state_dict"]
            for key in [k for k in sd if k.startswith("model.llava.")]:
                del sd[key]
            # the method is also reachable as model.method: keep one copy
            for key in [k for k in sd if k.startswith("model.method.")]:
                del sd[key]
        if self.curriculum is not None:
            checkpoint["curriculum"] = self.curriculum.state_dict()
        if self.method is not None:  # what `export` needs to rebuild the pruners from any checkpoint
            checkpoint["lvp_method"] = {
                "spec": method_spec(self.method),
                "dims": vars(self.method.dims),
                "family": getattr(self.method, "family", None),  # the base's model family (#14)
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.curriculum is not None and "curriculum" in checkpoint:
            self.curriculum.load_state_dict(checkpoint["curriculum"])
        self._rng_to_restore = checkpoint.get("rng_states")  # applied at the next training batch

    def on_fit_end(self) -> None:
        if self.hparams.train_base and self.hparams.save_base_to and self.trainer.is_global_zero:
            adapter.save_llava(self.model.llava, self.hparams.save_base_to, self.hparams.model_path)
