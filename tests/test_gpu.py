"""GPU twins of the core comparison tests: masked == removed, cached == recomputed, bf16 vs fp32.

Marked ``gpu`` and skipped cleanly without CUDA; they run in the README's test command whenever a
GPU is visible. ``LVP_GPU_TEST_DEVICE=cpu`` runs the same code on the CPU (to check the tests
themselves on a machine without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch
from core_fixtures import assert_cached_equals_recomputed, decisions_from, inputs, make_batch, make_model

DEVICE = os.environ.get("LVP_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """No TF32: fp32 comparisons at fp32 precision."""
    if DEVICE != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_masking_equals_removal_on_gpu(padding):
    model = make_model().to(DEVICE)
    batch = on_device(make_batch([(3, 6, 3), (5, 2, 2), (1, 4, 4)], padding=padding))
    with torch.no_grad():
        dec = decisions_from(model.forward_infer(**inputs(batch)), batch)
        train = model.forward_train(**inputs(batch), labels=batch["labels"], decisions=[d.float() for d in dec])
        infer = model.forward_infer(**inputs(batch), decisions=dec)
    logits, targets, rows = model.label_logits(infer.hidden, infer.state, batch["labels"])
    assert torch.equal(train.targets, targets) and torch.equal(train.sample_index, rows)
    torch.testing.assert_close(train.logits, logits, atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_recomputation_on_gpu():
    model = make_model().to(DEVICE)
    batch = on_device(make_batch([(3, 6, 0), (5, 2, 0)], padding="left"))
    assert_cached_equals_recomputed(model, batch, max_new_tokens=5)


def test_bf16_matches_fp32_on_gpu():
    """bf16 weights (inference, same decisions) and bf16-mixed autocast (training) stay close to fp32."""
    fp32 = make_model().to(DEVICE)
    bf16 = make_model().to(DEVICE, torch.bfloat16)
    batch = on_device(make_batch([(3, 6, 3), (5, 2, 2)], padding="right"))
    with torch.no_grad():
        ref = fp32.forward_infer(**inputs(batch))
        dec = decisions_from(ref, batch)
        low = bf16.forward_infer(**{**inputs(batch), "pixel_values": batch["pixel_values"].bfloat16()}, decisions=dec)
        ref = fp32.forward_infer(**inputs(batch), decisions=dec)
    a, b = fp32.logits(ref.hidden), bf16.logits(low.hidden).float()
    scale = a.abs().max()
    assert (a - b).abs().max() <= 0.05 * scale, f"bf16 logits differ by {(a - b).abs().max():.3g} (scale {scale:.3g})"

    loss32 = fp32.forward_train(**inputs(batch), labels=batch["labels"], decisions=[d.float() for d in dec]).loss_causal
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = fp32.forward_train(**inputs(batch), labels=batch["labels"])
        loss = out.loss_causal + out.kept.float().sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fp32.method.parameters())
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixed = fp32.forward_train(**inputs(batch), labels=batch["labels"], decisions=[d.float() for d in dec])
    torch.testing.assert_close(mixed.loss_causal.float(), loss32.detach(), rtol=2e-2, atol=2e-2)
