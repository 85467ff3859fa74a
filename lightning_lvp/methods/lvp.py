"""LVPruning: language-guided decision modules after chosen LLM layers (METHOD §2-4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from lightning_lvp.adapter import TextDims
from lightning_lvp.decision import DecisionModule, clip_sample_grads, gumbel_keep
from lightning_lvp.methods.base import PruningMethod, StageContext, validate_ratios
from lightning_lvp.state import SeqState, gather_rows, pack_index


class LVPruning(PruningMethod):
    """Trainable cross-attention decision modules (paper: after layers 1, 8, 16 of LLaVA-1.5-7B).

    Args:
        after_layers: LLM layers (1-based) after which a decision module runs (paper: 1, 8, 16); 0 puts a
            module on the LLM input (reads the input embeddings; not in the paper, used by the tiny demo).
        keep_ratios: default inference ratios per module (paper: [rho, rho-0.2, rho-0.4]).
        train_ratios: target kept ratios of the ratio loss (paper: [0.5, 0.3, 0.1]).
        num_blocks: cross-attention blocks per module (paper: 2).
        num_heads: heads per block (paper: 8).
        ffn_mult: FFN expansion (paper: 2).
        dim: module width C; None = LLM hidden size (paper). A smaller C adds a d -> C projection.
        input_norm: LayerNorm on the LLM hidden states before the module (not in the paper).
        rotary: RoPE on the module's queries/keys at the tokens' original positions (not in the paper; see
            :class:`~lightning_lvp.decision.DecisionModule`).
        keys: which text tokens are keys/values: "prompt" (text before the first answer token;
            at inference that is all text) or "all_text" (also the answer during training).
        score: inference ranking: "log_odds" = gamma_keep - gamma_drop (what the Gumbel decision
            depends on; default) or "keep_logit" = gamma_keep alone (METHOD §4's literal reading).
        ratio_control: gain of an integral controller on the TRAINING kept ratios (not in the paper;
            0 = off, the paper). The Gumbel decisions then use the per-sample CENTERED log-odds plus a
            per-stage bias, and each training step adds ``gain * (rho_s - kept_s)`` to the bias
            (:meth:`control_ratios`): the kept ratios track their targets whatever the other loss terms
            do, and the modules only learn the ranking. Inference ranks by score within a stage, which a
            per-sample constant does not change, so centering and bias only act in training.
        grad_clip_quantile: cap each sample's straight-through gradient on a stage's decisions at this
            quantile of the batch's per-sample gradient norms (not in the paper; None = off, the paper;
            see :func:`~lightning_lvp.decision.clip_sample_grads`).
        logit_bound: with ``ratio_control``, bound the centered log-odds of the training decisions to
            ``(-c, c)`` by ``c * tanh(x / c)`` (not in the paper; None = unbounded).
        estimator: how the causal loss's gradient reaches the modules. "straight_through" (the paper:
            hard Gumbel-Softmax, gradients of the soft sample, eqs. 5-6) or "score_function" (not in the
            paper: the same hard decisions, drawn from the same law, P(keep) = sigmoid(gamma_keep -
            gamma_drop) for any tau, but detached; the causal loss's gradient is the unbiased
            score-function (REINFORCE) estimate ``(L_i - b_i) * grad log P(D_i)`` with a leave-one-out
            batch baseline, :func:`~lightning_lvp.decision.score_function_surrogate`, and the ratio loss
            acts on the EXPECTED kept fraction). Same objective, another gradient estimate: see
            docs/RESULTS.md §5.3 for why the straight-through one fails on the demo.
        logit_scale: with ``ratio_control``, STANDARDIZE the centered log-odds of the training decisions
            per sample (std 1 over the alive tokens) and multiply by this scale (not in the paper; None =
            off): the decisions can never saturate, so every token keeps being explored, and a few
            tokens pushed far down cannot shift the others (measured: docs/RESULTS.md §5.3).
    """

    trainable = True

    def __init__(
        self,
        after_layers: Sequence[int] = (1, 8, 16),
        keep_ratios: Sequence[float] = (0.5, 0.3, 0.1),
        train_ratios: Sequence[float] = (0.5, 0.3, 0.1),
        num_blocks: int = 2,
        num_heads: int = 8,
        ffn_mult: int = 2,
        dim: int | None = None,
        input_norm: bool = False,
        rotary: bool = False,
        keys: Literal["prompt", "all_text"] = "prompt",
        score: Literal["log_odds", "keep_logit"] = "log_odds",
        ratio_control: float = 0.0,
        grad_clip_quantile: float | None = None,
        logit_bound: float | None = None,
        estimator: Literal["straight_through", "score_function"] = "straight_through",
        logit_scale: float | None = None,
    ):
        super().__init__(after_layers, keep_ratios)
        self.train_ratios = [float(r) for r in validate_ratios(train_ratios, "train_ratios")]
        if len(self.train_ratios) != self.num_stages:
            raise ValueError(
                f"train_ratios has {len(self.train_ratios)} entries but after_layers has {self.num_stages}: "
                f"{list(train_ratios)} vs {list(after_layers)}"
            )
        if keys not in ("prompt", "all_text"):
            raise ValueError(f"keys must be 'prompt' or 'all_text', got {keys!r}")
        if score not in ("log_odds", "keep_logit"):
            raise ValueError(f"score must be 'log_odds' or 'keep_logit', got {score!r}")
        for name, value in (("num_blocks", num_blocks), ("num_heads", num_heads), ("ffn_mult", ffn_mult)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.arch = dict(
            num_blocks=num_blocks, num_heads=num_heads, ffn_mult=ffn_mult, dim=dim, input_norm=input_norm, rotary=rotary
        )
        if ratio_control < 0:
            raise ValueError(f"ratio_control must be >= 0, got {ratio_control}")
        self.keys = keys
        self.score = score
        self.ratio_control = float(ratio_control)
        if grad_clip_quantile is not None and not 0.0 < grad_clip_quantile <= 1.0:
            raise ValueError(f"grad_clip_quantile must be in (0, 1] or None, got {grad_clip_quantile}")
        self.grad_clip_quantile = grad_clip_quantile
        if logit_bound is not None and logit_bound <= 0:
            raise ValueError(f"logit_bound must be > 0 or None, got {logit_bound}")
        self.logit_bound = logit_bound
        if logit_scale is not None and logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0 or None, got {logit_scale}")
        if logit_scale is not None and ratio_control == 0:
            raise ValueError("logit_scale acts on the controlled decisions: it needs ratio_control > 0")
        self.logit_scale = logit_scale
        if estimator not in ("straight_through", "score_function"):
            raise ValueError(f"estimator must be 'straight_through' or 'score_function', got {estimator!r}")
        self.estimator = estimator
        self.sampled: list[tuple[torch.Tensor, torch.Tensor]] = []  # score_function: per stage (log P, P) per token
        self.decision = nn.ModuleList()
        # persistent only when used: pruner folders / checkpoints without a controller keep their keys
        self.register_buffer("ratio_bias", torch.zeros(self.num_stages), persistent=self.ratio_control > 0)

    def bind(self, dims: TextDims) -> None:
        super().bind(dims)
        if len(self.decision) == 0:
            self.decision.extend(DecisionModule(dims.hidden_size, **self.arch) for _ in self.after_layers)
        elif self.decision[0].head.in_features != (self.arch["dim"] or dims.hidden_size):
            raise ValueError("decision modules were built for a different hidden size")

    def _key_mask(self, state: SeqState) -> torch.Tensor:
        if self.keys == "prompt":
            return state.key_text & state.valid
        return state.valid & ~state.vision

    def gamma(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        """(B, L, 2) keep/drop logits at the alive vision slots (zeros elsewhere)."""
        if not len(self.decision):
            raise RuntimeError("LVPruning.bind(dims) must be called before use (PrunedLlava does it)")
        qi, qvalid = pack_index(state.alive_vision)  # (B, Nv)
        ki, kvalid = pack_index(self._key_mask(state))  # (B, Nt)
        module = self.decision[ctx.stage]
        pos = state.position_ids
        gamma = module(
            gather_rows(state.hidden, qi),
            gather_rows(state.hidden, ki),
            kvalid,
            gather_rows(pos, qi),
            gather_rows(pos, ki),
        )
        gamma = gamma * qvalid[..., None]
        full = gamma.new_zeros(*state.valid.shape, 2)  # gamma's dtype (autocast may differ from hidden)
        return full.scatter(1, qi[..., None].expand(-1, -1, 2), gamma)  # qi is a permutation slice: no clashes

    def scores(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        g = self.gamma(state, ctx)
        return g[..., 0] - g[..., 1] if self.score == "log_odds" else g[..., 0]

    def decide(self, state: SeqState, ctx: StageContext, tau: float) -> torch.Tensor:
        gamma = self.gamma(state, ctx)
        if self.ratio_control > 0:
            gamma = self._controlled(gamma, state.alive_vision, ctx.stage)
        if self.estimator == "score_function":
            return self._sample(gamma, state.alive_vision, ctx.stage)
        keep = gumbel_keep(gamma, tau)
        if self.grad_clip_quantile is not None and torch.is_grad_enabled():
            keep = clip_sample_grads(keep, self.grad_clip_quantile)
        return keep * state.alive_vision

    def _sample(self, gamma: torch.Tensor, alive: torch.Tensor, stage: int) -> torch.Tensor:
        """Detached hard decisions with the hard Gumbel-max law, P(keep) = sigmoid(log-odds); records
        each token's log P(decision) and P(keep) for :func:`~lightning_lvp.decision.score_function_surrogate`."""
        log_odds = (gamma[..., 0] - gamma[..., 1]).float()
        p_keep = torch.sigmoid(log_odds)
        keep = torch.bernoulli(p_keep.detach()) * alive
        log_p = torch.where(keep.bool(), F.logsigmoid(log_odds), F.logsigmoid(-log_odds))
        if stage == 0:
            self.sampled = []
        self.sampled.append((log_p * alive, p_keep * alive))
        return keep.to(gamma.dtype)

    def _controlled(self, gamma: torch.Tensor, alive: torch.Tensor, stage: int) -> torch.Tensor:
        """(B, L, 2) -> keep/drop logits ``[log_odds - mean_alive(log_odds) + b_s, 0]``.

        Centering the log-odds per sample takes the "keep more of every token" direction away from the
        modules (measured: the causal loss grows that offset without bound against the bias), so the
        causal loss can only move the modules' RANKING; how many tokens are kept is the bias ``b_s``.
        (Standardizing as well, to stop the spread from growing, stopped the ranking from being learned
        at all in the same test: docs/RESULTS.md §5.3.)
        """
        log_odds = gamma[..., 0] - gamma[..., 1]
        weight = alive.to(log_odds)
        mean = (log_odds * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
        centered = (log_odds - mean) * weight
        if self.logit_scale is not None:  # per-sample z-scores times a fixed scale: no saturation
            std = (centered.pow(2).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)).sqrt()
            centered = self.logit_scale * centered / std.clamp(min=1e-6)
        if self.logit_bound is not None:  # c * tanh(x / c): the spread cannot saturate the decisions
            centered = self.logit_bound * torch.tanh(centered / self.logit_bound)
        keep = centered + self.ratio_bias[stage].to(log_odds)
        return torch.stack([keep, torch.zeros_like(keep)], -1)

    @torch.no_grad()
    def control_ratios(self, kept: torch.Tensor, targets: torch.Tensor) -> None:
        """One step of the integral ratio controller: ``b_s += gain * (rho_s - kept_s)``.

        Args:
            kept: (S,) mean kept fraction per stage in this training step (all ranks' mean under DDP).
            targets: (S,) the ratio targets of this step.
        """
        if self.ratio_control > 0:
            self.ratio_bias += self.ratio_control * (targets.to(self.ratio_bias) - kept.to(self.ratio_bias))
