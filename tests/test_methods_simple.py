"""Random and uniform (spatial-stride) pruning floors."""

import pytest
import torch

from lightning_lvp.io import instantiate, method_spec
from lightning_lvp.methods import RandomPruning, StageContext, UniformPruning
from lightning_lvp.methods.simple import uniform_keep
from lightning_lvp.state import SeqState


def make_state(n_vision, n_text_before=1, n_text_after=2, fillers=(0,)):
    """Rows with ``fillers[b]`` filler slots on the left, then text, vision, text."""
    rows_v, rows_ok = [], []
    for f in fillers:
        rows_v.append([False] * f + [False] * n_text_before + [True] * n_vision + [False] * n_text_after)
        rows_ok.append([False] * f + [True] * (n_text_before + n_vision + n_text_after))
    length = max(len(r) for r in rows_v)
    vision = torch.tensor([[False] * (length - len(r)) + r for r in rows_v])
    valid = torch.tensor([[False] * (length - len(r)) + r for r in rows_ok])
    b = len(fillers)
    return SeqState(
        hidden=torch.zeros(b, length, 2),
        position_ids=torch.arange(length).expand(b, length),
        valid=valid,
        vision=vision,
        key_text=valid & ~vision,
        orig_index=torch.arange(length).expand(b, length),
        patch_index=torch.where(vision, vision.long().cumsum(1) - 1, -1),
        n_vision=vision.sum(1),
    )


def kept_patches(state, keep):
    return [state.patch_index[b][keep[b] & state.alive_vision[b]].tolist() for b in range(keep.shape[0])]


def test_uniform_keep_evenly_spaced_ranks():
    alive = torch.ones(1, 8, dtype=torch.bool)
    assert uniform_keep(alive, torch.tensor([4]))[0].nonzero().squeeze(1).tolist() == [1, 3, 5, 7]
    alive = torch.ones(1, 10, dtype=torch.bool)
    assert uniform_keep(alive, torch.tensor([3]))[0].nonzero().squeeze(1).tolist() == [1, 5, 8]
    assert uniform_keep(alive, torch.tensor([10]))[0].all()
    # gaps in the alive set: ranks count alive tokens only
    alive = torch.tensor([[True, False, True, True, False, True, True, False, True, True]])
    assert uniform_keep(alive, torch.tensor([2]))[0].nonzero().squeeze(1).tolist() == [2, 8]


def test_uniform_per_row_counts():
    alive = torch.ones(2, 6, dtype=torch.bool)
    keep = uniform_keep(alive, torch.tensor([3, 1]))
    assert keep.sum(1).tolist() == [3, 1]
    assert keep[1].nonzero().squeeze(1).tolist() == [3]


def test_uniform_pruning_select_keeps_text_and_exact_count():
    state = make_state(16, fillers=(0, 3))
    method = UniformPruning(after_layers=[0, 2], keep_ratios=[0.5, 0.25])
    keep = method.select(state, StageContext(0, None), 0.5)
    assert kept_patches(state, keep) == [[1, 3, 5, 7, 9, 11, 13, 15]] * 2
    assert bool(keep[state.valid & ~state.vision].all()) and not bool(keep[~state.valid].any())
    nxt = state.select(keep)
    keep2 = method.select(nxt, StageContext(1, 1), 0.25)
    assert kept_patches(nxt, keep2) == [[3, 7, 11, 15]] * 2  # nested: evenly spaced among survivors


def test_random_pruning_is_deterministic_and_exact():
    state = make_state(12, fillers=(0, 2, 5))
    method = RandomPruning(after_layers=[1, 2], keep_ratios=[0.5, 0.25], seed=3)
    a = method.select(state, StageContext(0, 0), 0.5)
    b = method.select(state, StageContext(0, 0), 0.5)
    assert torch.equal(a, b)
    assert (a & state.vision).sum(1).tolist() == [6, 6, 6]
    other = RandomPruning(after_layers=[1, 2], keep_ratios=[0.5, 0.25], seed=4).select(state, StageContext(0, 0), 0.5)
    assert not torch.equal(a, other)
    nxt = state.select(a)
    b2 = method.select(nxt, StageContext(1, 1), 0.25)
    first, second = kept_patches(state, a), kept_patches(nxt, b2)
    assert all(set(s) <= set(f) and len(s) == 3 for f, s in zip(first, second, strict=True))


def test_random_pruning_ignores_slot_layout():
    """The same row keeps the same patches whatever fillers or extra tokens surround it (cached decode)."""
    plain = make_state(12, fillers=(0,))
    shifted = make_state(12, n_text_after=7, fillers=(4,))
    method = RandomPruning(after_layers=[1], keep_ratios=[0.5], seed=0)
    keep_a = method.select(plain, StageContext(0, 0), 0.5)
    keep_b = method.select(shifted, StageContext(0, 0), 0.5)
    assert kept_patches(plain, keep_a) == kept_patches(shifted, keep_b)


def test_config_round_trip():
    for method in (RandomPruning([0, 3], [0.6, 0.2], seed=7), UniformPruning([1], [0.3])):
        rebuilt = instantiate(method_spec(method))
        assert type(rebuilt) is type(method) and rebuilt.init_args == method.init_args
    with pytest.raises(ValueError, match="non-increasing"):
        RandomPruning([1, 2], [0.3, 0.5])
