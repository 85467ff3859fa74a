"""Opt-in attention distillation for LVPruning (not in the paper): the frozen base's own answer attention.

The paper trains the decision modules with the causal and ratio losses only (METHOD §3). On the CPU
demo that objective did not teach the modules WHICH patch a question needs in the time tried
(docs/RESULTS.md: relevant-patch recall at chance, kept sets question-blind), although a module
trained on the relevant patch directly finds it (``python -m lightning_lvp probe relevance``). This
module gives a dense, label-free teacher: in the UNPRUNED base, how much attention the positions that
predict the answer tokens pay to each vision token (summed over heads, layers and those positions,
normalised over the vision tokens). On the demo base it peaks at the asked cell in every sample
(layer 1). The distillation term is KL(teacher || softmax of the module's keep scores over the vision
tokens), per stage; it uses no relevance annotation, only the base and the training answer, in the
spirit of DynamicViT's distillation to the unpruned model. Pure torch plus the adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_lvp import adapter
from lightning_lvp.state import causal_mask


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is a label (they predict the answer)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100) != -100


@torch.no_grad()
def answer_attention(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher relevance: the unpruned base's attention from the answer-predicting positions to the image.

    Args:
        model: a :class:`~lightning_lvp.model.PrunedLlava` (its base runs unpruned; the method is not used).
        input_ids, attention_mask, labels, prompt_mask: (B, T) as in docs/DESIGN.md.
        pixel_values: (B, C, H, W).
        temperature: the distribution is ``mass ** (1 / temperature)`` normalised: < 1 sharpens it (summed
            over layers the mass is diffuse: on the demo base the asked cell holds 42 % of layer 1's vision
            attention and ~3 % in layers 2-8, so the plain sum is close to uniform).

    Returns:
        (B, T) float, a distribution over each sample's vision tokens (0 elsewhere; all 0 for a sample
        without label tokens).
    """
    state, _ = model.initial_state(input_ids, pixel_values, attention_mask, prompt_mask)
    hidden = state.hidden
    mask = causal_mask(state.valid, hidden.shape[1])
    pos_emb = adapter.rotary(model.llava, hidden, state.position_ids)
    predicts = predicting_positions(labels) & state.valid
    counts = predicts.sum(1)  # (B,)
    order = torch.argsort((~predicts).to(torch.int8), dim=1, stable=True)  # predicting positions first
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    mass = torch.zeros(predicts.shape, dtype=torch.float32, device=hidden.device)
    for i in range(model.dims.num_layers):
        for j in range(int(counts.max()) if counts.numel() else 0):
            query = order[rows, torch.minimum(torch.full_like(counts, j), (counts - 1).clamp(min=0))]
            probs = adapter.attention_probs(model.llava, i, hidden, pos_emb, query, mask).float().sum(1)  # (B, T)
            mass += probs * (j < counts).float()[:, None]
        hidden = adapter.run_layer(model.llava, i, hidden, mask, state.position_ids, pos_emb)
    if temperature <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temperature}")
    logits = (mass.clamp(min=1e-30).log() / temperature).masked_fill(~state.vision, float("-inf"))
    has_vision = state.vision.any(1, keepdim=True)
    return torch.where(has_vision, torch.softmax(logits.masked_fill(~has_vision, 0.0), dim=1), 0.0) * state.vision


def distillation_loss(scores: list[torch.Tensor], teacher: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """Mean over stages and samples of KL(teacher || softmax(scores) over the vision tokens).

    Args:
        scores: per stage (B, T) keep scores (higher = keep); only vision positions are read.
        teacher: (B, T) distribution over the vision tokens (:func:`answer_attention`).
        vision: (B, T) bool vision positions.
    """
    has = teacher.sum(1) > 0
    losses = []
    for s in scores:
        log_q = torch.log_softmax(s.float().masked_fill(~vision, float("-inf")), dim=1)
        kl = (teacher * (torch.log(teacher.clamp(min=1e-12)) - log_q.masked_fill(~vision, 0.0))).sum(1)
        losses.append(kl[has].mean() if bool(has.any()) else kl.sum() * 0.0)
    return torch.stack(losses).mean()
