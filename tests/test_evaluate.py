"""Relevance diagnostics: exact values on hand-built kept masks, absence where undefined, and the
evaluation of a schedule on a tiny model (ratio 1 keeps everything; values match the kept patches)."""

from __future__ import annotations

import pytest
import torch
from core_fixtures import IMG, N_VIS, make_batch, make_method, make_model

from lightning_lvp.eval.teacher_forced import (
    RelevanceStats,
    evaluate_schedule,
    jaccard,
    patch_relevance,
    question_keys,
    relevance_metrics,
    relevant_kept_fraction,
    stage_name,
)


def b(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_patch_relevance_maps_tokens_to_patches():
    # sample 0: left padding, image tokens at 2..4; sample 1: image tokens at 1..3
    vision = b([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    relevant = b([[0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0]])
    assert patch_relevance(relevant, vision).tolist() == [[False, True, False], [True, False, True]]
    assert patch_relevance(relevant, vision, n_patches=4).shape == (2, 4)


def test_relevant_kept_fraction_exact():
    kept = b([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    rel = b([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    out = relevant_kept_fraction(kept, rel)
    assert out[:2].tolist() == [0.5, 0.0] and out[2].isnan()  # no relevant patch: undefined, never 0 or 1


def test_jaccard_exact():
    a = b([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    c = b([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert jaccard(a, c).tolist() == [pytest.approx(1 / 3), 1.0, 1.0]  # both empty: identical sets


def test_stage_names():
    assert [stage_name(a) for a in (0, 1, 16)] == ["input", "layer1", "layer16"]


def _stats_batches():
    """Two stages, 4 patches. Image a: questions q1, q2 (in different batches); image b: q1 only."""
    kept1 = [b([[1, 1, 1, 0], [1, 1, 0, 0]]), b([[1, 0, 0, 0], [1, 0, 0, 0]])]
    rel1 = b([[0, 0, 1, 0], [0, 0, 0, 1]])  # sample 0: its patch survives stage 1 only; sample 1: lost at once
    kept2 = [b([[0, 1, 1, 1]]), b([[0, 0, 1, 0]])]
    rel2 = b([[0, 1, 1, 0]])  # both survive stage 1, one of two survives stage 2
    return (kept1, rel1, ["a", "b"], ["q1", "q1"]), (kept2, rel2, ["a"], ["q2"])


def test_relevance_stats_exact():
    stats = RelevanceStats(["layer1", "layer2"])
    for batch in _stats_batches():
        stats.update(*batch)
    out = stats.compute()
    # recall per stage over the 3 samples: stage 1 (1 + 0 + 1) / 3, stage 2 (0 + 0 + 0.5) / 3
    assert out["relevant_kept"] == {"layer1": pytest.approx(2 / 3), "layer2": pytest.approx(0.5 / 3)}
    # one pair (image a, q1 vs q2): stage 1 {0,1,2} vs {1,2,3} = 2/4; stage 2 {0} vs {2} = 0
    assert out["kept_overlap"] == {"layer1": pytest.approx(0.5), "layer2": 0.0}
    assert relevance_metrics(out) == {
        "relevant_kept/layer1": pytest.approx(2 / 3),
        "relevant_kept/layer2": pytest.approx(0.5 / 3),
        "kept_overlap/layer1": pytest.approx(0.5),
        "kept_overlap/layer2": 0.0,
    }
    # merging per-rank accumulators gives the same numbers
    parts = [RelevanceStats(["layer1", "layer2"]) for _ in range(2)]
    for part, batch in zip(parts, _stats_batches()):
        part.update(*batch)
    parts[0].merge(parts[1])
    assert parts[0].compute() == out


def test_relevance_metrics_absent_where_undefined():
    stats = RelevanceStats(["layer1"])
    kept = [b([[1, 0], [0, 1]])]
    stats.update(kept, b([[0, 0], [0, 0]]), ["a", "a"], ["q1", "q1"])  # no relevant patch; same question twice
    assert stats.compute() == {}  # absent, not zero
    stats.update(kept, b([[0, 0], [0, 0]]), ["a", "c"], ["q2", "q1"])
    assert stats.compute() == {"kept_overlap": {"layer1": 0.0}}  # a/q1 = [0, 1] (latest) vs a/q2 = [1, 0]
    assert relevance_metrics({}) == {}


def test_question_keys_compare_prompt_tokens():
    ids = torch.tensor([[0, 5, 6, 7], [5, 6, 7, 8], [1, 5, 6, 7]])
    prompt = b([[0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]])  # same question at another offset; a longer one
    assert question_keys({"input_ids": ids, "prompt_mask": prompt}) == ["5,6", "5,6", "5,6,7"]


def _with_relevance(batch: dict, images: list[str]) -> dict:
    vision = batch["input_ids"] == IMG
    relevant = torch.zeros_like(vision)
    for i in range(vision.shape[0]):
        relevant[i, vision[i].nonzero()[[i % N_VIS, (3 * i + 5) % N_VIS], 0]] = True
    return {**batch, "vision_mask": vision, "relevant_mask": relevant, "images": images}


def test_evaluate_schedule_relevance_on_a_tiny_model():
    model = make_model(make_method(after_layers=[0, 2, 3])).eval()
    plain = make_batch([(3, 4, 2), (5, 2, 2), (2, 6, 2), (4, 4, 2)], padding="left")
    plain["vision_mask"] = plain["input_ids"] == IMG
    res = evaluate_schedule(model, [plain], [0.5, 0.3, 0.1])
    assert "relevant_kept" not in res and "kept_overlap" not in res  # no relevant patches: absent
    batch = _with_relevance(plain, ["x", "x", "y", ""])  # two questions about image x
    full = evaluate_schedule(model, [batch], [1.0, 1.0, 1.0])
    assert full["relevant_kept"] == {"input": 1.0, "layer2": 1.0, "layer3": 1.0}
    assert full["kept_overlap"] == {"input": 1.0, "layer2": 1.0, "layer3": 1.0}
    res = evaluate_schedule(model, [batch], [0.5, 0.3, 0.1])
    with torch.no_grad():
        out = model.forward_infer(
            **{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "prompt_mask")},
            ratios=[0.5, 0.3, 0.1],
        )
    relevant = patch_relevance(batch["relevant_mask"], batch["vision_mask"])
    for s, name in enumerate(["input", "layer2", "layer3"]):
        kept = out.kept_patches[s]
        assert res["relevant_kept"][name] == pytest.approx(float(relevant_kept_fraction(kept, relevant).mean()))
        assert res["kept_overlap"][name] == pytest.approx(float(jaccard(kept[0], kept[1])))
    assert res["relevant_kept"]["input"] >= res["relevant_kept"]["layer2"] >= res["relevant_kept"]["layer3"]
