"""Opt-in attention distillation: the teacher equals HF's eager attentions; the KL term is exact."""

from __future__ import annotations

import copy
import math

import torch
from core_fixtures import IMG, make_batch, make_model

from lightning_lvp.teacher import answer_attention, distillation_loss, predicting_positions


def test_answer_attention_is_hf_eager_attention_of_the_answer_positions():
    model = make_model()
    batch = make_batch([(3, 2, 3), (5, 1, 2)], padding="left")
    teacher = answer_attention(model, **{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")},
                               labels=batch["labels"])  # fmt: skip
    eager = copy.deepcopy(model.llava)
    eager.set_attn_implementation("eager")
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = eager(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch["attention_mask"], position_ids=positions, output_attentions=True)  # fmt: skip
    attn = torch.stack(ref.attentions).sum((0, 2))  # (B, T, T): layers and heads summed
    predicts = predicting_positions(batch["labels"])
    vision = batch["input_ids"] == IMG
    for b in range(2):
        mass = attn[b][predicts[b]].sum(0) * vision[b]
        torch.testing.assert_close(teacher[b], mass / mass.sum(), atol=1e-5, rtol=1e-4)
    assert torch.allclose(teacher.sum(1), torch.ones(2)) and bool((teacher[~vision] == 0).all())


def test_distillation_loss_exact_on_hand_built_scores():
    vision = torch.tensor([[False, True, True, True]])
    teacher = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    scores = [torch.tensor([[9.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 10.0, 10.0, -30.0]])]
    # stage 1: q = 1/3 each -> KL = log(3/2); stage 2: q ~ (1/2, 1/2, 0) -> KL ~ 0
    expected = (math.log(1.5) + 0.0) / 2
    torch.testing.assert_close(distillation_loss(scores, teacher, vision), torch.tensor(expected), atol=1e-6, rtol=0)
    no_labels = torch.zeros(1, 4)  # a sample without answer tokens contributes nothing
    assert float(distillation_loss(scores, no_labels, vision)) == 0.0
