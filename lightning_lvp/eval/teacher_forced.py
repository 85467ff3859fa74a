"""Teacher-forced evaluation of a pruning schedule (accuracy, kept tokens, latency, relevance). Pure PyTorch.

A sample is correct when the argmax of the logits reproduces every label token of its answer
(the digits task has one-word answers). The model runs the token-REMOVING inference path, so the
numbers are what deployment would see.

Relevance diagnostics (:class:`RelevanceStats`), for data sets whose entries name the patches that
decide the answer (``relevant_patches`` -> the batch's ``relevant_mask``), per stage s with K_s the
patches still alive after stage s (cumulative) and R the relevant patches of a sample:

* ``relevant_kept/<stage>`` = mean over samples with R non-empty of |K_s & R| / |R| (recall of the
  relevant patches among the kept ones; 1.0 = none lost);
* ``kept_overlap/<stage>`` = mean over all pairs of samples showing the same image (``images``) with
  different questions (prompt tokens) of the Jaccard index |K_s,i & K_s,j| / |K_s,i | K_s,j| (1.0 =
  the kept set does not depend on the question).

Both are ABSENT (not zero) where undefined: no ``relevant_mask`` in the data, no sample with a
relevant patch (recall), no image asked about twice (overlap).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lightning_lvp.model import PrunedLlava

# the families' extra image inputs: image_sizes (LLaVA-NeXT), image_grid_thw (Qwen2.5-VL)
BATCH_KEYS = ("input_ids", "pixel_values", "attention_mask", "prompt_mask", "image_sizes", "image_grid_thw")


def per_sample_exact_match(
    logits: torch.Tensor, targets: torch.Tensor, sample_index: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(B,) bool: every label token of the sample is the argmax (samples without labels are False)."""
    wrong = (logits.argmax(-1) != targets).long()
    n_wrong = torch.zeros(batch_size, dtype=torch.long, device=logits.device).index_add_(0, sample_index, wrong)
    n_labels = torch.zeros_like(n_wrong).index_add_(0, sample_index, torch.ones_like(wrong))
    return (n_wrong == 0) & (n_labels > 0)


def patch_relevance(
    relevant_mask: torch.Tensor, vision_mask: torch.Tensor, n_patches: int | None = None
) -> torch.Tensor:
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


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Jaccard index |a & b| / |a | b| of boolean masks (..., N); 1.0 where both are empty."""
    union = (a | b).sum(-1)
    inter = (a & b).sum(-1)
    return torch.where(union > 0, inter.float() / union.clamp(min=1).float(), torch.ones_like(union, dtype=torch.float))


def stage_name(after_layer: int) -> str:
    """Metric suffix of a pruning point: ``layer<l>`` after LLM layer l, ``input`` for the LLM input."""
    return f"layer{after_layer}" if after_layer else "input"


def question_keys(batch: Mapping[str, Any]) -> list[str]:
    """One key per sample that is equal exactly when the prompts' text tokens are (the question identity)."""
    ids, prompt = batch["input_ids"], batch.get("prompt_mask")
    if prompt is None:
        prompt = batch["attention_mask"].bool() & ~batch["vision_mask"].bool()
    return [",".join(map(str, row[m.bool()].tolist())) for row, m in zip(ids, prompt)]


class RelevanceStats:
    """Accumulates the relevance diagnostics of one schedule over batches (see the module docstring).

    Args:
        stages: stage names (:func:`stage_name` of each pruning point), in order.
    """

    def __init__(self, stages: Sequence[str]):
        self.stages = list(stages)
        self.recall_sum = [0.0] * len(self.stages)
        self.recall_n = 0
        self.by_image: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # image -> question -> (S, N) kept

    def update(
        self,
        kept: Sequence[torch.Tensor],
        relevant: torch.Tensor,
        images: Sequence[str] | None = None,
        questions: Sequence[str] | None = None,
    ) -> None:
        """Adds one batch.

        Args:
            kept: per stage (B, N) bool, patches alive after the stage (``InferOutput.kept_patches``).
            relevant: (B, N) bool relevant patches (:func:`patch_relevance`).
            images: image identity per sample (``""`` = unknown); None = no overlap statistics.
            questions: question identity per sample (:func:`question_keys`); needed with ``images``.
        """
        if len(kept) != len(self.stages):
            raise ValueError(f"{len(kept)} kept masks for {len(self.stages)} stages {self.stages}")
        if not kept:
            return
        relevant = relevant.cpu().bool()
        stacked = torch.stack([k.cpu().bool() for k in kept], 1)  # (B, S, N)
        recall = torch.stack([relevant_kept_fraction(k, relevant) for k in stacked.unbind(1)], 1)  # (B, S)
        labelled = ~recall[:, 0].isnan()
        self.recall_n += int(labelled.sum())
        self.recall_sum = [a + float(r) for a, r in zip(self.recall_sum, recall[labelled].sum(0))]
        if images is None:
            return
        if questions is None or len(questions) != len(images):
            raise ValueError("RelevanceStats.update needs one question key per image")
        for i, (image, question) in enumerate(zip(images, questions)):
            if image:
                self.by_image[image][question] = stacked[i]

    def merge(self, other: RelevanceStats) -> None:
        """Adds another accumulator of the same stages (e.g. from another rank)."""
        if other.stages != self.stages:
            raise ValueError(f"cannot merge stages {other.stages} into {self.stages}")
        self.recall_sum = [a + b for a, b in zip(self.recall_sum, other.recall_sum)]
        self.recall_n += other.recall_n
        for image, questions in other.by_image.items():
            self.by_image[image].update(questions)

    def overlap(self) -> tuple[list[float], int]:
        """Mean Jaccard index per stage over all same-image pairs of different questions, and the pair count."""
        total, pairs = torch.zeros(len(self.stages)), 0
        for questions in self.by_image.values():
            masks = list(questions.values())
            for i in range(len(masks)):
                for j in range(i + 1, len(masks)):
                    total += jaccard(masks[i], masks[j])  # (S,)
                    pairs += 1
        return (total / max(pairs, 1)).tolist(), pairs

    def compute(self) -> dict[str, dict[str, float]]:
        """``{"relevant_kept": {stage: value}, "kept_overlap": {stage: value}}``; a key is absent when undefined."""
        out: dict[str, dict[str, float]] = {}
        if self.recall_n:
            out["relevant_kept"] = {s: v / self.recall_n for s, v in zip(self.stages, self.recall_sum)}
        values, pairs = self.overlap()
        if pairs and self.stages:
            out["kept_overlap"] = dict(zip(self.stages, values))
        return out


def relevance_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``{"relevant_kept/<stage>": v, "kept_overlap/<stage>": v}`` of a result row (empty when absent)."""
    return {f"{kind}/{stage}": v for kind in RELEVANCE_KEYS for stage, v in (result.get(kind) or {}).items()}


RELEVANCE_KEYS = ("relevant_kept", "kept_overlap")


def relevance_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The :func:`relevance_metrics` keys of any of ``rows``, in order of appearance (CSV columns)."""
    return list(dict.fromkeys(k for r in rows for k in relevance_metrics(r)))


def per_stage_text(values: Mapping[str, float] | None, stages: Sequence[str] | None = None) -> str:
    """``0.95/0.80/0.50`` (values in ``stages`` order, default: their own), ``-`` when absent."""
    if not values:
        return "-"
    return "/".join(f"{values[s]:.2f}" for s in (stages if stages is not None else values))


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
    return {
        "correct": correct.cpu(),
        "kept": [k.cpu() for k in kept],
        "kept_patches": [k.cpu() for k in out.kept_patches],
        "n_vision": out.state.n_vision.cpu(),
    }


def update_relevance(stats: RelevanceStats, batch: Mapping[str, Any], kept_patches: Sequence[torch.Tensor]) -> None:
    """Adds a scored batch to ``stats`` if the batch carries ``relevant_mask`` (else nothing: the metrics stay absent)."""
    if batch.get("relevant_mask") is None or not kept_patches:
        return
    n = kept_patches[0].shape[1]
    relevant = patch_relevance(batch["relevant_mask"], batch["vision_mask"] & batch["attention_mask"].bool(), n)
    images = batch.get("images")
    stats.update(kept_patches, relevant, images, question_keys(batch) if images is not None else None)


def schedule_name(ratios: list[float] | None) -> str:
    """``base`` for the unpruned model, else ``rho<first ratio>`` (``rho0.5`` for [0.5, 0.3, 0.1])."""
    return "base" if ratios is None else f"rho{ratios[0]:g}"


@torch.no_grad()
def count_schedule_flops(model, batch: dict[str, Any], ratios: list[float] | None) -> float:
    """FLOPs of the token-removing forward (+ next-token head) for the FIRST sample of ``batch``.

    ``ratios=None`` counts the unpruned model (no decision modules run).
    """
    from lightning_lvp.flops import count_forward

    inputs = model_inputs(batch, next(model.parameters()).device)
    text = ("input_ids", "attention_mask", "prompt_mask")
    one = {k: v[:1] for k, v in inputs.items() if k in text}
    images = {k: v for k, v in inputs.items() if k not in text}  # the first sample's own (Qwen: flat patches)
    one.update(model.family.sample_image_inputs(model.llava, inputs["input_ids"], images, 0))
    method = model.method
    try:
        if ratios is None:
            model.method = None
        counts, _ = count_forward(model, one, ratios)
    finally:
        model.method = method
    return float(counts["total"])


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
        stage), ``n_vision`` (mean vision tokens on entry), ``seconds`` (wall time of the forwards), and,
        where defined, ``relevant_kept`` / ``kept_overlap`` (``{stage: value}``, :class:`RelevanceStats`).
    """
    was_training = model.training
    model.eval()
    relevance = RelevanceStats([stage_name(a) for a in model.method.after_layers] if model.method else [])
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
        update_relevance(relevance, batch, res["kept_patches"])
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
        **relevance.compute(),
    }
