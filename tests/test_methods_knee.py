"""CLS-similarity knee pruning: the knee finder on hand-made curves, stage 1 and stage 2 on hand-built states."""

import math

import pytest
import torch

from lightning_lvp.io import instantiate, method_spec
from lightning_lvp.methods import ClsKneePruning, StageContext
from lightning_lvp.methods.knee import cls_similarity, find_knee, resolve_count
from lightning_lvp.state import SeqState


def make_state(vision, valid=None, key_text=None, hidden=None):
    """A SeqState over hand-built layouts; ``vision`` (B, L) bool, patches numbered in slot order."""
    vision = torch.as_tensor(vision, dtype=torch.bool)
    b, length = vision.shape
    valid = torch.ones_like(vision) if valid is None else torch.as_tensor(valid, dtype=torch.bool)
    vision = vision & valid
    key_text = (valid & ~vision) if key_text is None else torch.as_tensor(key_text, dtype=torch.bool)
    hidden = torch.randn(b, length, 4) if hidden is None else hidden
    return SeqState(
        hidden=hidden,
        position_ids=torch.arange(length).expand(b, length),
        valid=valid,
        vision=vision,
        key_text=key_text,
        orig_index=torch.arange(length).expand(b, length),
        patch_index=torch.where(vision, vision.long().cumsum(1) - 1, -1),
        n_vision=vision.sum(1),
    )


def vision_states(sims):
    """(B, 1 + N, 2) vision hidden states whose patches have exactly cosine ``sims`` (B, N) to CLS."""
    sims = torch.as_tensor(sims, dtype=torch.float64)
    patches = torch.stack([sims, torch.sqrt(1 - sims**2)], -1)  # unit vectors at angle acos(sim) from e0
    cls = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(sims.shape[0], 1, 2)
    return torch.cat([cls * 3.0, patches * 2.0], 1).float()  # norms must not matter


# ------------------------------------------------------------------------------------------ knee
def test_knee_long_tail_exact_index():
    assert int(find_knee(torch.tensor([1.0, 0.5, 0.2, 0.1, 0.05, 0.0]))) == 2  # chord 1 - 0.2x: gaps .3, .4, .3
    # convex piecewise-linear: steep head (4 points), flat tail; the corner is the knee
    corner = torch.tensor([10.0, 8.0, 6.0, 4.0, 2.0] + [2.0 - 0.1 * i for i in range(1, 11)])
    assert int(find_knee(corner)) == 4
    # 1/(i+1) over 8 points: chord 1 - x/8; gaps 0, .375, .417, .375, .3, .208, .107, 0 -> index 2
    assert int(find_knee(torch.tensor([1.0 / (i + 1) for i in range(8)]))) == 2


def test_knee_is_invariant_to_axis_scaling_and_shift():
    curve = torch.tensor([0.9, 0.4, 0.3, 0.25, 0.22, 0.2, 0.19])
    base = int(find_knee(curve))
    assert base == 1
    assert int(find_knee(curve * 37.0 - 5.0)) == base


def test_knee_without_long_tail_keeps_all():
    assert int(find_knee(torch.linspace(1.0, 0.0, 9))) == 8  # straight line
    assert int(find_knee(torch.tensor([1.0, 0.99, 0.95, 0.8, 0.0]))) == 4  # concave
    assert int(find_knee(torch.full((5,), 0.3))) == 4  # flat
    assert int(find_knee(torch.tensor([0.7]))) == 0
    assert int(find_knee(torch.tensor([0.7, 0.1]))) == 1


def test_knee_batched_with_lengths_matches_each_curve():
    a = [1.0, 0.5, 0.2, 0.1, 0.05, 0.0]
    b = [1.0, 0.2, 0.1, 0.0]
    padded = torch.tensor([a, b + [-1e4, -1e4]])  # padding values must be ignored
    assert find_knee(padded, torch.tensor([6, 4])).tolist() == [2, 1]
    assert int(find_knee(torch.tensor(b))) == 1


# --------------------------------------------------------------------------------------- stage 1
def test_cls_similarity_is_cosine():
    sims = torch.tensor([[0.9, -0.2, 0.5]])
    torch.testing.assert_close(cls_similarity(vision_states(sims)), sims, atol=1e-6, rtol=0)


def test_stage1_keeps_the_patches_before_the_knee_per_sample():
    # sample 0: long tail with knee at sorted index 2 -> 3 kept; sample 1: knee at 1 -> 2 kept
    s0 = [0.2, 1.0, 0.05, 0.5, 0.0, 0.1]  # sorted: 1, .5, .2, .1, .05, 0
    s1 = [0.1, 0.0, 0.95, 0.2, 0.05, 0.12]  # sorted: .95, .2, .12, .1, .05, 0 -> knee 1
    vision = [[False, True, True, True, True, True, True, False]] * 2
    state = make_state(vision)
    method = ClsKneePruning(min_keep=1, max_keep=1.0)
    keep = method.select(state, StageContext(0, None, vision_states([s0, s1])), None)
    text = ~torch.tensor(vision)
    assert bool((keep & text).eq(text).all())  # every text token stays
    kept_patches = [state.patch_index[i][keep[i] & state.vision[i]].tolist() for i in range(2)]
    assert kept_patches == [[0, 1, 3], [2, 3]]


def test_stage1_clamps_to_min_and_max():
    sims = [
        [1.0, 0.5, 0.2, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0]
    ]  # chord 1 - x/9: gaps .39, .58, .57 -> knee 2, 3 patches
    state = make_state([[True] * 10 + [False]])
    ctx = StageContext(0, None, vision_states(sims))

    def kept(**kw):
        return int((ClsKneePruning(**kw).select(state, ctx, None) & state.vision).sum())

    assert kept(min_keep=1, max_keep=10) == 3
    assert kept(min_keep=4, max_keep=10) == 4  # int = count
    assert kept(min_keep=0.5, max_keep=1.0) == 5  # float = fraction of the original 10
    assert kept(min_keep=1, max_keep=1) == 1
    assert kept(min_keep=0.1, max_keep=0.1) == 1


def test_stage1_number_replaces_the_knee():
    sims = [[1.0, 0.5, 0.2, 0.1, 0.05, 0.0]]
    state = make_state([[True] * 6])
    keep = ClsKneePruning().select(state, StageContext(0, None, vision_states(sims)), 0.5)
    assert keep.nonzero()[:, 1].tolist() == [0, 1, 2]


def test_resolve_count():
    n = torch.tensor([10, 3])
    assert resolve_count(0.25, n).tolist() == [3, 1]
    assert resolve_count(4, n).tolist() == [4, 4]


# --------------------------------------------------------------------------------------- stage 2
def text_aligned_hidden():
    """Slots: [t0, v0, v1, v2, v3, t1, t2, t3] (t = prompt text); v1 and v3 point along the text direction."""
    e0, e1 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    rows = [e0 * 2, e1, e0 + 0.1 * e1, -e0, e0 * 5 + e1, e0 + 0.05 * e1, e0 * 3, e0 + 0.2 * e1]
    return torch.stack(rows)[None]


def test_stage2_cosine_keeps_the_most_text_like_vision_tokens():
    vision = [[False, True, True, True, True, False, False, False]]
    state = make_state(vision, hidden=text_aligned_hidden())
    keep = ClsKneePruning(keep_ratio=0.5).select(state, StageContext(1, 1), 0.5)
    assert keep[0].tolist() == [True, False, True, False, True, True, True, True]


def test_stage2_ratio_of_alive_or_original():
    vision = [[False, True, True, True, True, False, False, False]]
    state = make_state(vision, hidden=text_aligned_hidden())
    state.n_vision = torch.tensor([8])  # as if 8 patches entered and 4 survived stage 1
    alive = ClsKneePruning(ratio_of="alive").select(state, StageContext(1, 1), 0.5)
    original = ClsKneePruning(ratio_of="original").select(state, StageContext(1, 1), 0.25)
    assert int((alive & state.vision).sum()) == 2
    assert int((original & state.vision).sum()) == 2


def test_stage2_attention_relevance_uses_prompt_queries():
    vision = [[False, True, True, True, False, False]]
    state = make_state(vision)
    calls = []

    def attention_row(q):
        calls.append(int(q[0]))
        row = torch.zeros(1, 2, 6)
        row[0, 0, 3] = 0.9  # head 0 likes v2 (slot 3)
        row[0, 1, 1] = 0.5  # head 1 likes v0 (slot 1)
        return row

    keep = ClsKneePruning(relevance="attention").select(state, StageContext(1, 1, None, attention_row), 0.34)
    assert sorted(calls) == [0, 4, 5]  # one row per prompt text query
    assert keep[0].tolist() == [True, False, False, True, True, True]


def test_text_pruning_never_drops_first_last_prompt_or_answer_tokens():
    # slots: <s>, sys, v, v, q1, q2, q3(last prompt), ans, ans
    vision = [[False, False, True, True, False, False, False, False, False]]
    key_text = [[True, True, False, False, True, True, True, False, False]]
    hidden = torch.randn(1, 9, 4)
    hidden[0, 1] = -hidden[0, 4:7].mean(0) * 10  # "sys" unlike the rest of the prompt
    state = make_state(vision, key_text=key_text, hidden=hidden)
    method = ClsKneePruning(text_keep_ratio=0.25)
    assert method.prunable_text(state)[0].tolist() == [False, True, False, False, True, True, False, False, False]
    keep = method.select(state, StageContext(1, 1), 0.5)
    assert keep[0, [0, 6, 7, 8]].all()
    assert int((keep & method.prunable_text(state)).sum()) == 1  # round(0.25 * 3) = 1 of 3 prunable kept
    assert not keep[0, 1]


# ---------------------------------------------------------------------------------------- config
def test_config_round_trip_and_validation():
    method = ClsKneePruning(llm_layer=3, keep_ratio=0.4, min_keep=2, max_keep=0.5, text_keep_ratio=0.8)
    assert method.after_layers == [0, 3] and method.keep_ratios == [None, 0.4]
    rebuilt = instantiate(method_spec(method))
    assert isinstance(rebuilt, ClsKneePruning) and rebuilt.init_args == method.init_args
    assert ClsKneePruning(llm_layer=None).after_layers == [0]
    with pytest.raises(ValueError, match="min_keep"):
        ClsKneePruning(min_keep=0.6, max_keep=0.5)
    with pytest.raises(ValueError, match="max_keep"):
        ClsKneePruning(max_keep=0)
    with pytest.raises(ValueError, match="llm_layer"):
        ClsKneePruning(llm_layer=0)
    with pytest.raises(ValueError, match="relevance"):
        ClsKneePruning(relevance="dot")
    with pytest.raises(ValueError, match="text_keep_ratio"):
        ClsKneePruning(text_keep_ratio=1.5)
    assert math.isclose(ClsKneePruning().keep_ratios[1], 0.5)
