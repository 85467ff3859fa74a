"""LightningModule: steps, losses, optimizer and logging around :class:`PrunedLlava` (no model maths here)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_lvp import adapter
from lightning_lvp.data.collate import entry_ids_in_errors
from lightning_lvp.decision import per_sample_nll, ratio_loss, score_function_surrogate
from lightning_lvp.eval.teacher_forced import model_inputs, per_sample_exact_match, stage_name
from lightning_lvp.io import method_spec
from lightning_lvp.methods.base import PruningMethod
from lightning_lvp.model import PrunedLlava, check_structure
from lightning_lvp.teacher import answer_attention, distillation_loss
from lightning_lvp.training.common import DTYPES, TrainingModule, rename_prefix, warmup_cosine  # noqa: F401

log = logging.getLogger(__name__)


class LVPModule(TrainingModule):
    """Trains pruning decision modules (LVPruning) on a frozen base model.

    The base is never trained here: the CPU demo's base is trained from scratch by
    :class:`~lightning_lvp.training.demo_base.DemoBaseModule` (experiments/demo_base.yaml).

    Args:
        model_path: llava-hf format LLaVA: hub id (e.g. llava-hf/llava-1.5-7b-hf) or local folder.
        method: trainable pruning method (class_path/init_args), e.g. lightning_lvp.methods.LVPruning.
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
        ratio_anneal_start: where the annealed targets start (default 1.0); a stage whose target is above it
            keeps its target throughout (e.g. 0.5 with targets [0.5, 0.3, 0.1]: the input stage stays at 0.5,
            the others start there).
        lambda_distill: weight of the OPT-IN attention-distillation term (lightning_lvp/teacher.py; not in the
            paper, 0 = the paper's objective): KL from the unpruned base's answer attention over the vision
            tokens to the modules' keep scores, every stage.
        distill_temperature: sharpening of that teacher distribution (< 1 = sharper).
        optimizer: optimizer over the trainable parameters only (class_path/init_args; lr etc. in config).
        warmup_ratio: fraction of the training steps with linear LR warm-up (paper: 0.03).
        lr_schedule: "cosine" (paper) or "constant" after warm-up.
        gradient_checkpointing: recompute LLM layers in backward (activations still carry gradients to the modules).
        val_ratios: inference schedule of val/acc; None = the method's keep_ratios.
        structure: policy for image-placeholder tokens that are not patches (LLaVA-NeXT's ``image_newline``
            row ends; ``PrunedVLM(structure=...)``, docs/FAMILIES.md): "keep" = kept as structure (never pruned,
            not counted in the vision tokens the ratios refer to), "prune" = vision tokens like the patches.
            Families without such tokens (LLaVA-1.5, Qwen2.5-VL) accept only "keep".
    """

    def __init__(
        self,
        model_path: str,
        method: PruningMethod | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lambda_causal: float = 1.0,
        lambda_ratio: float = 1.0,
        ratio_loss: Literal["mse", "huber"] = "mse",
        ratio_beta: float = 0.5,
        tau: float = 1.0,
        tau_final: float | None = None,
        ratio_anneal: float = 0.0,
        ratio_anneal_start: float = 1.0,
        lambda_distill: float = 0.0,
        distill_temperature: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.03,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        gradient_checkpointing: bool = False,
        val_ratios: list[float] | None = None,
        structure: Literal["keep", "prune"] = "keep",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["method", "optimizer"])
        self._record_config(method=method_spec(method) if method is not None else None)
        self._validate(method)
        self.config = adapter.load_config(model_path)
        check_structure(structure, adapter.family_for(self.config))
        method.bind(adapter.text_dims(self.config))
        # registered ONCE, as self.model.method, when configure_model builds the model; until then kept
        # here outside the module tree (the ``method`` property serves both)
        self.__dict__["_method"] = method
        self.optimizer_fn = optimizer
        self.model: PrunedLlava | None = None
        # checkpoints never hold the frozen LLaVA (it comes from model_path), so loading is not strict
        self.strict_loading = False
        # the pruner weights are ``method.*`` in every checkpoint (as when the method was registered twice)
        self.register_state_dict_post_hook(
            lambda module, sd, prefix, *_: rename_prefix(sd, prefix + "model.method.", prefix + "method.")
        )
        self.register_load_state_dict_pre_hook(
            lambda module, sd, prefix, *_: rename_prefix(sd, prefix + "method.", prefix + "model.method.")
        )

    @property
    def method(self) -> PruningMethod:
        """The pruning method: ``self.model.method`` once the model is built."""
        return self.model.method if self.model is not None else self.__dict__["_method"]

    def _validate(self, method: PruningMethod | None) -> None:
        hp = self.hparams
        if method is None:
            raise ValueError(
                "model.method is required (e.g. class_path: lightning_lvp.methods.LVPruning); a base model is "
                "trained by lightning_lvp.training.demo_base.DemoBaseModule (experiments/demo_base.yaml)"
            )
        if not method.trainable:
            raise ValueError(f"model.method {type(method).__name__} is training-free: use `sweep`, not `fit`")
        for name in ("lambda_causal", "lambda_ratio", "lambda_distill"):
            if getattr(hp, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(hp, name)}")
        if hp.tau <= 0 or (hp.tau_final is not None and hp.tau_final <= 0):
            raise ValueError(f"model.tau and model.tau_final must be > 0, got {hp.tau}, {hp.tau_final}")
        if not 0.0 <= hp.warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio must be in [0, 1), got {hp.warmup_ratio}")
        if not 0.0 <= hp.ratio_anneal <= 1.0:
            raise ValueError(f"model.ratio_anneal must be in [0, 1], got {hp.ratio_anneal}")
        if not 0.0 < hp.ratio_anneal_start <= 1.0:
            raise ValueError(f"model.ratio_anneal_start must be in (0, 1], got {hp.ratio_anneal_start}")
        if hp.ratio_loss not in ("mse", "huber"):
            raise ValueError(f"model.ratio_loss must be 'mse' or 'huber', got {hp.ratio_loss!r}")

    # ------------------------------------------------------------------------------ model set-up
    def configure_model(self) -> None:
        """Loads (or builds) the LLaVA once per process; Lightning calls it before fit/validate."""
        if self.model is not None:
            return
        hp = self.hparams
        llava = adapter.load_llava(hp.model_path, dtype=DTYPES[hp.dtype])
        self.model = PrunedLlava(llava, self.__dict__["_method"], hp.gradient_checkpointing, structure=hp.structure)

    @property
    def stage_names(self) -> list[str]:
        """Metric suffix per stage: ``layer<l>`` (after LLM layer l), ``input`` for after_layer 0."""
        return [stage_name(layer) for layer in self.method.after_layers] if self.method else []

    # ------------------------------------------------------------------------------------ steps
    def _fit_steps(self) -> int | None:
        """Optimizer steps of the running fit; None without a trainer or outside ``fit`` (``validate`` /
        ``test`` alone have no step budget: the schedules then take their end-of-training values)."""
        if self._trainer is None:
            return None
        state = getattr(self.trainer, "state", None)
        if state is not None and getattr(state, "fn", None) not in (None, "fit"):
            return None
        return max(1, int(self.trainer.estimated_stepping_batches))

    def current_tau(self) -> float:
        """Gumbel temperature now: constant, or linear from tau to tau_final over training."""
        hp = self.hparams
        if hp.tau_final is None or self._trainer is None:
            return hp.tau
        total = self._fit_steps()
        frac = 1.0 if total is None else min(1.0, self.global_step / total)
        return hp.tau + (hp.tau_final - hp.tau) * frac

    def current_ratio_targets(self) -> list[float]:
        """Targets of L_ratio now: ``train_ratios``, or on the way there from ``ratio_anneal_start`` during
        ``ratio_anneal``."""
        hp, final = self.hparams, list(self.method.train_ratios)
        total = self._fit_steps()
        if hp.ratio_anneal <= 0 or total is None:
            return final
        frac = min(1.0, self.global_step / max(1.0, hp.ratio_anneal * total))
        starts = [max(hp.ratio_anneal_start, r) for r in final]
        return [s + (r - s) * frac for s, r in zip(starts, final)]

    def _losses(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        hp = self.hparams
        inputs = model_inputs(batch)
        distill = hp.lambda_distill > 0 and self.method is not None
        out = self.model.forward_train(**inputs, labels=batch["labels"], tau=self.current_tau(), return_scores=distill)
        result = {"loss_causal": out.loss_causal}
        loss = hp.lambda_causal * out.loss_causal
        kept_for_ratio = out.kept
        if getattr(self.method, "estimator", "straight_through") == "score_function":
            # the decisions are detached: the causal term's gradient is the REINFORCE surrogate's, and the
            # ratio loss acts on the expected kept fractions (LVPruning's `estimator`; not in the paper)
            nll = per_sample_nll(out.logits, out.targets, out.sample_index, batch["input_ids"].shape[0])
            surrogate, kept_for_ratio = score_function_surrogate(
                self.method.sampled, out.decisions, batch["vision_mask"].bool(), nll
            )
            loss = loss + hp.lambda_causal * surrogate
        if self.method is not None:
            targets = torch.tensor(self.current_ratio_targets(), device=out.kept.device)
            result["loss_ratio"] = ratio_loss(kept_for_ratio, targets, hp.ratio_loss, hp.ratio_beta)
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
        result["loss"] = loss
        return result

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with entry_ids_in_errors(batch):  # model-side input errors name the entry id, not only the row
            res = self._losses(batch, "train")
        self.last_step_values = {
            k: float(v.detach()) for k, v in res.items()
        }  # this rank's values, before the all-reduce
        bs = batch["input_ids"].shape[0]
        for k, v in res.items():
            show = k in ("loss", "loss_ratio") or k.startswith("kept_ratio")
            self.log(
                f"train/{k}", v.detach() if torch.is_tensor(v) else v, prog_bar=show, batch_size=bs, sync_dist=True
            )
        self.log("train/tau", self.current_tau(), batch_size=bs)
        return res["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch["input_ids"].shape[0]
        with entry_ids_in_errors(batch):
            res = self._losses(batch, "val")  # masked path: losses and kept ratios on held-out data
        for k, v in res.items():
            self.log(f"val/{k}", v, prog_bar=k.startswith("kept_ratio"), batch_size=bs, sync_dist=True)
        # token-removing inference path at the validation schedule: the deployment accuracy
        with torch.no_grad(), entry_ids_in_errors(batch):
            out = self.model.forward_infer(**model_inputs(batch), ratios=self.hparams.val_ratios)
            logits, targets, rows = self.model.label_logits(out.hidden, out.state, batch["labels"])
            acc = per_sample_exact_match(logits, targets, rows, bs).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=bs, sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Greedy answers, (B, n) new token ids, for prompt-only (left-padded) batches at val_ratios."""
        return self.model.generate(**model_inputs(batch), ratios=self.hparams.val_ratios, max_new_tokens=16)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Pruner (and loop/optimizer) state only: never a copy of the frozen LLaVA; plus the RNG states
        (:class:`TrainingModule`)."""
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith("model.llava.")]:
            del sd[key]
        if self.method is not None:  # what `export` needs to rebuild the pruners from any checkpoint
            checkpoint["lvp_method"] = {
                "spec": method_spec(self.method),
                "dims": vars(self.method.dims),
                "family": getattr(self.method, "family", None),  # the base's model family (#14)
            }
