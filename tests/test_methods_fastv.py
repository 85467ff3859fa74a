"""FastV: the query token, exact top-k on a hand-built attention row, and the real attention of a tiny model."""

import copy

import pytest
import torch

from lightning_lvp.families import family_for
from lightning_lvp.methods import FastV, StageContext
from lightning_lvp.methods.fastv import last_prompt_index
from lightning_lvp.model import PrunedLlava
from lightning_lvp.state import SeqState
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava


def make_state(vision, valid, key_text):
    vision = torch.tensor(vision) & torch.tensor(valid)
    b, length = vision.shape
    return SeqState(
        hidden=torch.zeros(b, length, 4),
        position_ids=torch.arange(length).expand(b, length),
        valid=torch.tensor(valid),
        vision=vision,
        key_text=torch.tensor(key_text),
        orig_index=torch.arange(length).expand(b, length),
        patch_index=torch.where(vision, vision.long().cumsum(1) - 1, -1),
        n_vision=vision.sum(1),
    )


T, F_ = True, False


def hand_state():
    # row 0: filler, <s>, 6 vision, q, q(last prompt), answer, answer; row 1: no filler, prompt ends last
    vision = [[F_, F_, T, T, T, T, T, T, F_, F_, F_, F_], [F_, T, T, T, T, T, T, F_, F_, F_, F_, F_]]
    valid = [[F_] + [T] * 11, [T] * 12]
    key_text = [[F_, T, F_, F_, F_, F_, F_, F_, T, T, F_, F_], [T, F_, F_, F_, F_, F_, F_, T, T, T, T, T]]
    return make_state(vision, valid, key_text)


def test_last_prompt_index_skips_answer_and_filler():
    state = hand_state()
    assert last_prompt_index(state).tolist() == [9, 11]
    state.key_text = torch.zeros_like(state.key_text)
    assert last_prompt_index(state).tolist() == [11, 11]  # no prompt marked: the last slot


def test_fastv_keeps_exactly_the_most_attended_tokens():
    state = hand_state()
    torch.manual_seed(0)
    probs = torch.rand(2, 3, 12).softmax(-1)  # (B, H, L)
    # head 0 alone would prefer other tokens: the ranking must use the mean over heads
    probs[:, 0, :] = torch.linspace(0.0, 1.0, 12)
    queries = []

    def attention_row(q):
        queries.append(q.clone())
        return probs

    keep = FastV(k=2, keep_ratio=0.5).select(state, StageContext(0, 1, None, attention_row), 0.5)
    assert len(queries) == 1 and queries[0].tolist() == [9, 11]
    mean = probs.mean(1)
    for b in range(2):
        slots = state.alive_vision[b].nonzero().squeeze(1)
        best = slots[mean[b, slots].topk(3).indices].sort().values
        assert (keep[b] & state.alive_vision[b]).nonzero().squeeze(1).tolist() == best.tolist()
        assert bool(keep[b][state.valid[b] & ~state.vision[b]].all())  # text untouched
        assert not bool(keep[b][~state.valid[b]].any())


def test_fastv_matches_eager_attention_of_layer_k():
    """Kept patches = top-k of HF eager attention of layer K (last prompt token, mean over heads)."""
    spec = TinyLlavaSpec()
    llava = build_tiny_llava(spec, seed=0)
    eager = copy.deepcopy(llava)
    eager.set_attn_implementation("eager")
    n = spec.num_image_tokens
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 6] + [spec.image_token_id] * n + [7, 8, 9, 10]])
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size)
    k, keep_ratio = 2, 0.25
    model = PrunedLlava(llava, FastV(k=k, keep_ratio=keep_ratio))
    out = model.forward_infer(ids, pixels)
    with torch.no_grad():
        ref = eager(input_ids=ids, pixel_values=pixels, output_attentions=True)
    row = ref.attentions[k - 1][0, :, -1].mean(0)  # layer K (1-based), last prompt token, mean over heads
    vision_slots = (ids[0] == spec.image_token_id).nonzero().squeeze(1)
    expected = row[vision_slots].topk(round(keep_ratio * n)).indices.sort().values
    assert out.kept_patches[0][0].nonzero().squeeze(1).tolist() == expected.tolist()


def test_fastv_computes_attention_for_layer_k_only(monkeypatch):
    llava = build_tiny_llava(TinyLlavaSpec(), seed=0)
    layers = []
    family = family_for(llava)
    original = family.attention_probs

    def spy(model, index, *args):
        layers.append(index)
        return original(model, index, *args)

    monkeypatch.setattr(family, "attention_probs", spy)  # the instance the pruned model calls
    spec = TinyLlavaSpec()
    ids = torch.tensor([[1, 5] + [spec.image_token_id] * spec.num_image_tokens + [7, 8]])
    PrunedLlava(llava, FastV(k=3, keep_ratio=0.5)).forward_infer(ids, torch.randn(1, 3, 16, 16))
    assert layers == [2]  # 0-based index of layer K = 3


def test_fastv_validation():
    with pytest.raises(ValueError, match="k must be"):
        FastV(k=0)
    with pytest.raises(ValueError, match="keep_ratios"):
        FastV(keep_ratio=1.5)
    with pytest.raises(ValueError, match="attention_row"):
        FastV().scores(hand_state(), StageContext(0, 1))
    assert FastV(k=3, keep_ratio=0.3).after_layers == [3]
