"""Teacher-forced evaluation of a pruning schedule (accuracy, kept tokens, latency). Pure PyTorch.

A sample is correct when the argmax of the logits reproduces every label token of its answer
(the digits task has one-word answers). The model runs the token-REMOVING inference path, so the
numbers are what deployment would see.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lightning_lvp.model import PrunedLlava

BATCH_KEYS = ("input_ids", "pixel_values", "attention_mask", "prompt_mask")


def per_sample_exact_match(
    logits: torch.Tensor, targets: torch.Tensor, sample_index: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(B,) bool: every label token of the sample is the argmax (samples without labels are False)."""
    wrong = (logits.argmax(-1) != targets).long()
    n_wrong = torch.zeros(batch_size, dtype=torch.long, device=logits.device).index_add_(0, sample_index, wrong)
    n_labels = torch.zeros_like(n_wrong).index_add_(0, sample_index, torch.ones_like(wrong))
    return (n_wrong == 0) & (n_labels > 0)


def patch_relevance(relevant_mask: torch.Tensor, vision_mask: torch.Tensor, n_patches: int | None = None) -> torch.Tensor:
    """The relevant patches of each sample in patch coordinates (the i-th image token is patch i).

    Args:
        relevant_mask: (B, T) bool, True at the image tokens of the patches that decide the answer
            (collated ``relevant_mask``).
        vision_mask: (B, T) bool, True at image tokens (padding excluded).
        n_patches: width of the result (default: the largest image-token count in the batch); it
            matches :attr:`~lightning_lvp.model.InferOutput.kept_patches`.

    Returns:
        (B, n_patches) bool.
    """
    vision = vision_mask.bool()
    n = int(vision.sum(1).max()) if n_patches is None else n_patches
    patch = torch.where(vision, vision.long().cumsum(1) - 1, n)  # (B, T): patch index, n = not a patch
    out = torch.zeros(vision.shape[0], n + 1, dtype=torch.bool, device=vision.device)
    out.scatter_(1, patch, relevant_mask.bool() & vision)  # each patch index occurs once per row
    return out[:, :n]


def relevant_kept_fraction(kept: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Per sample, the fraction of its relevant patches that are kept: ``|kept & rel| / |rel|``.

    Args:
        kept: (B, N) bool, patches alive after a stage.
        relevant: (B, N) bool, patches that decide the answer.

    Returns:
        (B,) float; NaN for samples without any relevant patch (undefined, never counted as 0 or 1).
    """
    n_rel = relevant.sum(1).float()
    hit = (kept.bool() & relevant.bool()).sum(1).float()
    return torch.where(n_rel > 0, hit / n_rel.clamp(min=1), torch.full_like(n_rel, float("nan")))


def model_inputs(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that :class:`PrunedLlava` forwards take."""
    out = {k: batch[k] for k in BATCH_KEYS if batch.get(k) is not None}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


@torch.no_grad()
def score_batch(model: PrunedLlava, batch: dict[str, Any], ratios: Sequence[float | None] | None) -> dict[str, Any]:
    """Runs the inference path on one batch; per-sample correctness and kept-token counts."""
    inputs = model_inputs(batch, next(model.parameters()).device)
    out = model.forward_infer(**inputs, ratios=ratios)
    logits, targets, rows = model.label_logits(out.hidden, out.state, batch["labels"].to(out.hidden.device))
    correct = per_sample_exact_match(logits, targets, rows, inputs["input_ids"].shape[0])
    kept = [k.sum(1).float() for k in out.kept_patches]  # per stage (B,)
    return {"correct": correct.cpu(), "kept": [k.cpu() for k in kept], "n_vision": out.state.n_vision.cpu()}


def evaluate_schedule(
    model: PrunedLlava,
    loader: Iterable[dict[str, Any]],
    ratios: Sequence[float | None] | None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Accuracy of the model under one inference schedule.

    Args:
        model: the pruned model (its method decides; ``ratios`` None = method default; a model
            without method is the unpruned base).
        loader: batches per docs/DESIGN.md with ``labels``.
        ratios: kept ratio per stage.
        max_batches: stop after this many batches.

    Returns:
        ``accuracy``, ``accuracy_by_type``, ``n``, ``kept_tokens`` (mean kept vision tokens after each
        stage), ``n_vision`` (mean vision tokens on entry), ``seconds`` (wall time of the forwards).
    """
    was_training = model.training
    model.eval()
    correct, by_type = [], defaultdict(list)
    kept_sum: list[float] = []
    n_vision_sum, seconds = 0.0, 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        t0 = time.perf_counter()
        res = score_batch(model, batch, ratios)
        seconds += time.perf_counter() - t0
        correct.append(res["correct"])
        for qtype, ok in zip(batch.get("question_types") or [""] * len(res["correct"]), res["correct"].tolist()):
            by_type[qtype or "all"].append(ok)
        if not kept_sum:
            kept_sum = [0.0] * len(res["kept"])
        kept_sum = [a + float(k.sum()) for a, k in zip(kept_sum, res["kept"])]
        n_vision_sum += float(res["n_vision"].sum())
    model.train(was_training)
    flat = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    n = int(flat.numel())
    return {
        "ratios": None if ratios is None else list(ratios),
        "accuracy": float(flat.float().mean()) if n else float("nan"),
        "accuracy_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "n": n,
        "kept_tokens": [k / max(n, 1) for k in kept_sum],
        "n_vision": n_vision_sum / max(n, 1),
        "seconds": seconds,
    }
