"""Masked softmax of LVPruning (paper eqs. 7-9) as a memory-lean autograd function. Pure PyTorch.

During training, pruned vision tokens are not removed; every LLM layer after a decision module
uses

    A_hat[i, j] = exp(A[i, j]) M[i, j] / sum_k exp(A[i, k]) M[i, k]          (eq. 9)
    M[i, j] = 1 if i == j or j is text, D_j if j is a vision token (i != j)  (eq. 7)

on top of the causal/padding mask. D is a hard 0/1 Gumbel-Softmax decision carrying
straight-through gradients, so M must stay *multiplicative* for gradients to reach D.

Because D is exactly 0 or 1 in the forward pass, eq. 9 equals an SDPA call with the boolean mask
``base & (D_j | i == j)``. :class:`MaskedSoftmaxAttention` runs that fused kernel in the forward
pass and saves only q, k, v, D and the output (no (T, T) tensor is kept between forward and
backward). Its backward recomputes SDPA for dq/dk/dv and obtains dL/dD from

    dL/dM[i, j] = exp(A[i, j]) / Z_i * (g_i . v_j - g_i . o_i)

(Z_i the masked normaliser of eq. 9, g = dL/do), summed over heads and queries i != j, in
query chunks whose two temporaries together are at most one (B, H, T, T) tensor.
:func:`masked_attention_reference` is the literal eq. 9 used by the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def keep_attend_mask(base_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask of eqs. 7-8 for hard decisions.

    Args:
        base_mask: (B, 1, T, T) bool, True = may attend (causal and padding already applied).
        keep: (B, T) float or bool; 1 for text tokens and kept vision tokens, 0 for pruned ones.

    Returns:
        (B, 1, T, T) bool mask; the diagonal is always allowed (eq. 7: M[i, i] = 1).
    """
    t = keep.shape[-1]
    eye = torch.eye(t, dtype=torch.bool, device=keep.device)
    return base_mask & ((keep > 0.5)[:, None, None, :] | eye)


def masked_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    base_mask: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Literal eq. 9 with plain autograd (reference for tests; materialises several (T, T) tensors).

    Args:
        query, key, value: (B, H, T, Dh).
        base_mask: (B, 1, T, T) bool causal/padding mask.
        keep: (B, T) float decisions (1 for text).
        scale: softmax scale, usually Dh ** -0.5.

    Returns:
        (B, H, T, Dh) attention output.
    """
    t = keep.shape[-1]
    eye = torch.eye(t, dtype=torch.bool, device=keep.device)
    m = torch.where(eye, torch.ones_like(keep)[:, None, :], keep[:, None, :])[:, None]  # (B, 1, T, T), eq. 7
    scores = (query @ key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~base_mask, float("-inf"))  # A_bar: causal + padding first
    scores = scores - scores.amax(-1, keepdim=True)
    weights = scores.exp() * m  # eq. 9 numerator
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ value


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _keep_grad(q, k, v, out, grad_out, base_mask, attend, scale) -> torch.Tensor:
    """dL/dD per key column, (B, T), accumulated in at least fp32, computed in query chunks."""
    b, h, t, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 inputs accumulate in fp32
    grad_keep = torch.zeros(b, t, dtype=acc, device=q.device)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # (B, H, T): g_i . o_i
    # two (B, H, chunk, T) temporaries: at most one (B, H, T, T) in total, and at most ~256 MB
    budget = max(1, (256 << 20) // (2 * b * h * t * torch.finfo(acc).bits // 8))
    chunk = max(1, min(t // 2, budget))
    kf, vf = k.to(acc), v.to(acc)
    for i0 in range(0, t, chunk):
        i1 = min(t, i0 + chunk)
        scores = (q[:, :, i0:i1].to(acc) @ kf.transpose(-1, -2)) * scale  # (B, H, c, T)
        scores.masked_fill_(~base_mask[:, :, i0:i1], float("-inf"))
        lse = scores.masked_fill(~attend[:, :, i0:i1], float("-inf")).logsumexp(-1, keepdim=True)  # log Z_i
        weights = scores.sub_(lse).exp_()  # exp(A_ij) / Z_i, zero where causal/padding-masked
        dots = grad_out[:, :, i0:i1].to(acc) @ vf.transpose(-1, -2)  # (B, H, c, T): g_i . v_j
        dots.sub_(delta[:, :, i0:i1, None]).mul_(weights)
        rows = torch.arange(i0, i1, device=q.device)
        dots[:, :, rows - i0, rows] = 0.0  # M[i, i] = 1 does not depend on D (eq. 7)
        grad_keep += dots.sum(dim=(1, 2))
        del scores, weights, dots  # free this chunk before the next one is allocated
    return grad_keep


class MaskedSoftmaxAttention(torch.autograd.Function):
    """Eq. 9 attention: SDPA forward with hard masks, gradients for q, k, v and the decisions."""

    @staticmethod
    def forward(ctx, query, key, value, base_mask, keep, scale):
        attend = keep_attend_mask(base_mask, keep)
        out = _sdpa(query, key, value, attend, scale)
        ctx.save_for_backward(query, key, value, base_mask, keep, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, base_mask, keep, out = ctx.saved_tensors
        attend = keep_attend_mask(base_mask, keep)
        needs = ctx.needs_input_grad
        dq = dk = dv = dkeep = None
        if any(needs[:3]):
            with torch.enable_grad():
                inputs = [x.detach().requires_grad_(n) for x, n in zip((query, key, value), needs[:3])]
                recomputed = _sdpa(*inputs, attend, ctx.scale)
                wanted = [x for x in inputs if x.requires_grad]
                grads = iter(torch.autograd.grad(recomputed, wanted, grad_out))
            dq, dk, dv = (next(grads) if n else None for n in needs[:3])
        if needs[4]:
            dkeep = _keep_grad(query, key, value, out, grad_out, base_mask, attend, ctx.scale).to(keep.dtype)
        return dq, dk, dv, None, dkeep, None


def masked_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    base_mask: torch.Tensor,
    keep: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Eq. 9 attention for the training path.

    Args:
        query, key, value: (B, H, T, Dh); key/value heads already repeated for GQA.
        base_mask: (B, 1, T, T) bool, True = may attend (causal and padding).
        keep: (B, T) hard decisions in {0, 1} (1 for text tokens), may carry straight-through grads.
        scale: softmax scale (default Dh ** -0.5).

    Returns:
        (B, H, T, Dh).
    """
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("masked_softmax_attention is for full-sequence (training) forwards without a KV cache")
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    # one dtype for q, k, v: autocast's (as it would cast SDPA) or their common type; the backward
    # recomputation runs outside autocast and needs them equal
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = (x.to(dtype) for x in (query, key, value))
    return MaskedSoftmaxAttention.apply(query, key, value, base_mask, keep, scale)
