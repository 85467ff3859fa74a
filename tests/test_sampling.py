"""Exact tests of the next-token filters (lightning_lvp/sampling.py) on hand-built logits."""

import math

import pytest
import torch

from lightning_lvp.sampling import sample_next, top_k_filter, top_p_filter

NEG = float("-inf")


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, -1.0, 4.0, 6.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(out, torch.tensor([[NEG, 3.0, 2.0, NEG], [5.0, NEG, NEG, 6.0]]))


def test_top_k_off_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(top_k_filter(logits, 0), logits)  # k <= 0: off
    assert torch.equal(top_k_filter(logits, 4), logits)  # k >= V: nothing to drop
    tied = torch.tensor([[2.0, 2.0, 1.0]])
    assert torch.equal(top_k_filter(tied, 1), torch.tensor([[2.0, 2.0, NEG]]))  # ties at the k-th value stay


def _logits(probs):
    return torch.tensor([[math.log(p) for p in probs]])


@pytest.mark.parametrize(
    ("p", "kept"),
    [
        (0.3, [1]),  # the top token alone already reaches p (and one token is always kept)
        (0.7, [1, 3]),  # 0.5 + 0.25 = 0.75 >= 0.7: the smallest set reaching p
        (0.8, [1, 3, 0]),  # 0.75 < 0.8, add 0.15
        (0.95, [1, 3, 0, 2]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    logits = _logits([0.15, 0.5, 0.1, 0.25])  # sorted: index 1 (0.5), 3 (0.25), 0 (0.15), 2 (0.1)
    out = top_p_filter(logits, p)
    expected = torch.full_like(logits, NEG)
    expected[0, kept] = logits[0, kept]
    assert torch.equal(out, expected)


def test_top_p_rows_are_independent_and_p_one_is_off():
    logits = torch.cat([_logits([0.15, 0.5, 0.1, 0.25]), _logits([0.1, 0.1, 0.7, 0.1])])
    out = top_p_filter(logits, 0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [False, False, True, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sample_next_greedy_filtered_and_errors():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert sample_next(logits).tolist() == [1, 0]  # greedy = argmax
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # top-k 1 leaves only the argmax to sample from
        assert sample_next(logits, do_sample=True, top_k=1, generator=g).tolist() == [1, 0]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_next(logits, do_sample=True, temperature=0.0)
