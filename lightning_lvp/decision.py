"""Cross-attention decision module of LVPruning (paper §3.1, METHOD §2) and the ratio loss. Pure PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (Su et al. 2021, as Llama's default rotary): cos and sin, each (B, N, head_dim).

    Args:
        positions: (B, N) ORIGINAL position ids of the tokens (the LLM's own rotary positions), or
            (B, N, 3) M-RoPE (t, h, w) positions (Qwen2.5-VL): the frequencies are split into t / h / w
            sections in Qwen's 1 : 1.5 : 1.5 proportion (its ``mrope_section`` [16, 24, 24] of 64), so
            text tokens (t = h = w) get exactly the 1-D table.
        head_dim: per-head width (even).
        theta: RoPE base.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    if positions.dim() == 3:  # M-RoPE: frequency i reads component 0 (t), 1 (h) or 2 (w) of its section
        half = head_dim // 2
        hw = 3 * half // 8
        component = torch.repeat_interleave(
            torch.arange(3, device=positions.device), torch.tensor([half - 2 * hw, hw, hw], device=positions.device)
        )
        angles = positions.float()[..., component] * inv_freq  # (B, N, head_dim / 2)
    else:
        angles = positions.float()[..., None] * inv_freq  # (B, N, head_dim / 2)
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, H, N, head_dim) by (B, N, head_dim) tables (the ``rotate_half`` convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class CrossAttentionBlock(nn.Module):
    """Vision tokens (queries) attend to text tokens (keys/values); residual on Q; then the FFN.

    ``O = MHA(Q, K, V) + Q`` with ``Q = W_q x``, ``K = W_k t``, ``V = W_v t`` (eqs. 1-3), then
    ``FFN = [LayerNorm, Linear(C, 2C), SiLU, Linear(2C, C), LayerNorm]`` (eq. 4; no residual
    around it, as the paper writes it). The multi-head attention has an output projection: with
    it, three 2-block modules scoring 576 tokens cost 0.71 TFLOPs at C = 4096, the paper's number.

    Args:
        dim: width C.
        num_heads: attention heads (paper: 8).
        ffn_mult: FFN expansion (paper: 2).
    """

    def __init__(self, dim: int, num_heads: int = 8, ffn_mult: int = 2):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decision module width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ffn_mult * dim),
            nn.SiLU(),
            nn.Linear(ffn_mult * dim, dim),
            nn.LayerNorm(dim),
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, H, N, C/H)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, Nv, C) vision queries.
            text: (B, Nt, C) text keys/values.
            text_mask: (B, Nt) bool, False for padding / non-key slots (never attended).
            rotary: optional (cos_v, sin_v, cos_t, sin_t) RoPE tables of the vision and text tokens'
                original positions (:func:`rotary_cos_sin`); rotates the attention queries and keys.

        Returns:
            (B, Nv, C).
        """
        q = self.q_proj(x)
        qh, kh = self._heads(q), self._heads(self.k_proj(text))
        if rotary is not None:
            cos_v, sin_v, cos_t, sin_t = rotary
            qh, kh = apply_rotary(qh, cos_v, sin_v), apply_rotary(kh, cos_t, sin_t)
        attn = F.scaled_dot_product_attention(
            qh, kh, self._heads(self.v_proj(text)), attn_mask=text_mask[:, None, None, :]
        )  # (B, H, Nv, C/H)
        o = self.o_proj(attn.transpose(1, 2).reshape(q.shape)) + q  # residual on Q
        return self.ffn(o)


class DecisionModule(nn.Module):
    """Scores vision tokens with keep/drop logits gamma (B, Nv, 2): column 0 keep, column 1 drop (eq. 5).

    Args:
        hidden_size: LLM hidden size d.
        dim: module width C (paper: C = d). If different from d, a linear projection maps d -> C.
        num_blocks: cross-attention blocks in sequence (paper: 2).
        num_heads: heads per block (paper: 8).
        ffn_mult: FFN expansion (paper: 2).
        input_norm: apply a LayerNorm to the LLM hidden states first (not in the paper; off by default).
        rotary: rotate the cross-attention queries and keys by the tokens' ORIGINAL positions (RoPE, as the
            LLM's own attention does; not in the paper, off by default). A base whose vision features carry no
            position (the tiny demo base locates a cell only through the LLM's rotary positions) gives a
            content-only module no way to tell which patch a question names (docs/RESULTS.md); with the
            positions the module can match "r3c5" to the patch at that offset.
        rope_theta: RoPE base of ``rotary``.
    """

    def __init__(
        self,
        hidden_size: int,
        dim: int | None = None,
        num_blocks: int = 2,
        num_heads: int = 8,
        ffn_mult: int = 2,
        input_norm: bool = False,
        rotary: bool = False,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        dim = dim or hidden_size
        if rotary and (dim // num_heads) % 2:
            raise ValueError(f"rotary needs an even head width, got dim={dim} / num_heads={num_heads}")
        self.rotary, self.rope_theta, self.head_dim = rotary, rope_theta, dim // num_heads
        self.norm = nn.LayerNorm(hidden_size) if input_norm else nn.Identity()
        self.in_proj = nn.Identity() if dim == hidden_size else nn.Linear(hidden_size, dim)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads, ffn_mult) for _ in range(num_blocks))
        self.head = nn.Linear(dim, 2)  # W_O

    def forward(
        self,
        vision: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        vision_pos: torch.Tensor | None = None,
        text_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            vision: (B, Nv, d) hidden states of the vision tokens still alive.
            text: (B, Nt, d) hidden states of the key text tokens.
            text_mask: (B, Nt) bool.
            vision_pos, text_pos: (B, Nv) / (B, Nt) original position ids (required with ``rotary``).

        Returns:
            gamma: (B, Nv, 2) keep/drop logits.
        """
        if not bool(text_mask.any(1).all()):
            raise ValueError("every sample needs at least one text token as key for the decision module")
        rotary = None
        if self.rotary:
            if vision_pos is None or text_pos is None:
                raise ValueError("a decision module with rotary=True needs vision_pos and text_pos")
            rotary = (
                *rotary_cos_sin(vision_pos, self.head_dim, self.rope_theta),
                *rotary_cos_sin(text_pos, self.head_dim, self.rope_theta),
            )
        x = self.in_proj(self.norm(vision))
        t = self.in_proj(self.norm(text))
        for block in self.blocks:
            x = block(x, t, text_mask, rotary)
        return self.head(x)


def gumbel_keep(gamma: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard Gumbel-Softmax keep decisions with straight-through gradients (eqs. 5-6).

    Args:
        gamma: (..., 2) keep/drop logits.
        tau: temperature.

    Returns:
        (...) values exactly 0.0 / 1.0 in the forward pass, gradients of the soft sample.
    """
    return F.gumbel_softmax(gamma.float(), tau=tau, hard=True)[..., 0].to(gamma.dtype)


class _ClipSampleGrads(torch.autograd.Function):
    """Identity forward; backward clips each sample's gradient norm at a quantile of the batch's norms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantile: float) -> torch.Tensor:
        ctx.quantile = quantile
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        norms = grad.flatten(1).float().norm(dim=1)  # (B,)
        cap = torch.quantile(norms, ctx.quantile)
        scale = (cap / norms.clamp(min=torch.finfo(norms.dtype).tiny)).clamp(max=1.0)
        return grad * scale.to(grad).view(-1, *([1] * (grad.dim() - 1))), None


def clip_sample_grads(x: torch.Tensor, quantile: float) -> torch.Tensor:
    """``x`` unchanged; in the backward pass each sample's (dim 0) gradient norm is capped at the
    ``quantile`` of the batch's per-sample norms (not in the paper).

    Why: the straight-through gradient of a DROPPED token is the loss's first-order response to giving
    it a little attention, ``exp(s_j) / sum_k exp(s_k)``; for the token a question asks about, s_j is
    large, and in a minority of samples that linearisation has a huge magnitude of either sign. One such
    sample outweighs the rest of the batch; capping each sample's share lets the majority decide.
    """
    return _ClipSampleGrads.apply(x, quantile)


def per_sample_nll(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) mean cross-entropy over each sample's label tokens (0 for a sample without any)."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    total = nll.new_zeros(batch).index_add(0, rows, nll)
    count = nll.new_zeros(batch).index_add(0, rows, torch.ones_like(nll))
    return total / count.clamp(min=1)


def score_function_surrogate(
    sampled: list[tuple[torch.Tensor, torch.Tensor]],
    decisions: list[torch.Tensor],
    vision: torch.Tensor,
    nll: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-function (REINFORCE) surrogate of the causal loss, and the expected kept fractions.

    The gradient of ``E_D[L]`` over hard decisions D is ``E[L * grad log P(D)]`` (Williams 1992); with a
    leave-one-out batch baseline ``b_i = mean_{k != i} L_k`` it stays unbiased and is estimated by the
    gradient of ``mean_i (L_i - b_i) * log P(D_i)`` with ``L`` detached. A token already dropped by an
    earlier stage has no say (eq. 10), so its later decisions are left out of ``log P``.

    Args:
        sampled: per stage, (log P(decision), P(keep)) per token, (B, T) each (``LVPruning.sampled``).
        decisions: per stage, the CUMULATIVE hard decisions (B, T) (``TrainOutput.decisions``).
        vision: (B, T) bool, the vision tokens.
        nll: (B,) each sample's causal loss (:func:`per_sample_nll`).

    Returns:
        The surrogate (scalar; its value is not a loss, only its gradient means something) and (B, S)
        the expected kept fraction per stage ``sum_j D_{s-1, j} P_s(keep_j) / N_v`` (eq. 10 in
        expectation given the previous stage), for the ratio loss.
    """
    b = nll.shape[0]
    alive = vision.to(nll)
    n_vision = alive.sum(1).clamp(min=1)
    log_p, expected = nll.new_zeros(b), []
    for s, (lp, p) in enumerate(sampled):
        before = alive if s == 0 else decisions[s - 1].detach().to(nll)
        log_p = log_p + (lp * before).sum(1)
        expected.append((p * before).sum(1) / n_vision)
    loss = nll.detach()
    baseline = (loss.sum() - loss) / max(b - 1, 1) if b > 1 else loss.new_zeros(1)
    surrogate = ((loss - baseline) * log_p).mean()
    return surrogate, torch.stack(expected, 1)


def ratio_loss(kept: torch.Tensor, targets: torch.Tensor, kind: str = "mse", beta: float = 0.5) -> torch.Tensor:
    """L_ratio = 1/S sum_s (rho_s - mean_i D_s,i)^2 (METHOD §3), or its Huber variant.

    Args:
        kept: (B, S) kept fraction of vision tokens per sample and module.
        targets: (S,) target ratios rho_s.
        kind: "mse" or "huber".
        beta: Huber transition point (paper: 0.5).

    Returns:
        Scalar loss averaged over modules and samples.
    """
    target = targets.to(kept).expand_as(kept)
    if kind == "mse":
        return F.mse_loss(kept, target)
    if kind == "huber":
        return F.huber_loss(kept, target, delta=beta)  # 0.5 x^2 inside |x| < beta, linear outside
    raise ValueError(f"ratio loss kind must be 'mse' or 'huber', got {kind!r}")
