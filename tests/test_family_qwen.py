"""The Qwen2.5-VL family against HF's own ``Qwen2_5_VLForConditionalGeneration`` on a tiny random model.

Every test computes one thing two ways: through ``lightning_lvp.families.qwen2_5_vl`` (what the pruned
model uses) and through HF's public forward / generate, on grouped-query attention (4 heads, 2 KV
heads), a windowed vision encoder with a 2x2 merger, images of different sizes and padded batches.
"""

from __future__ import annotations

import pytest
import torch
from qwen_fixtures import IMG, build, hf_inputs, make_batch, sample_of

from lightning_lvp.families.qwen2_5_vl import Qwen2_5_VLFamily
from lightning_lvp.state import causal_mask, gather_rows, pack_index

qwen = Qwen2_5_VLFamily()

# 8x8 patches = 16 tokens in 4 windows; 6x8 = 12 tokens; 4x4 = 4 tokens in one window
SPECS = [(3, [(8, 8)], 5, 0), (1, [(6, 8)], 2, 0), (2, [(4, 4)], 4, 0)]


@pytest.fixture(scope="module")
def model():
    return build(seed=3)


@pytest.fixture(scope="module")
def batch():
    return make_batch(SPECS, padding="left", seed=1)


def loop(model, embeds, valid, pos, cache=None, mask=None):
    """Our decoder loop: mask from the valid slots, rotary of the ORIGINAL (t, h, w) positions, norm."""
    mask = causal_mask(valid, embeds.shape[1]) if mask is None else mask
    pos_emb = qwen.rotary(model, embeds, pos)
    hidden = embeds
    for i in range(model.config.text_config.num_hidden_layers):
        hidden = qwen.run_layer(model, i, hidden, mask, pos, pos_emb, cache)
    return qwen.final_norm(model, hidden)


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_merge_and_loop_equal_hf_forward_logits(model, padding):
    b = make_batch(SPECS, padding=padding, seed=1)
    merged = qwen.merge(model, b["input_ids"], b["pixel_values"], image_grid_thw=b["image_grid_thw"])
    embeds, vision, feats = merged.embeds, merged.vision, merged.features.embeds
    assert torch.equal(vision, b["input_ids"] == IMG)
    assert [f.shape[0] for f in feats] == [16, 12, 4]
    pos, _ = qwen.rope_positions(model, b["input_ids"], b["attention_mask"], b["image_grid_thw"])
    valid = b["attention_mask"].bool()
    ours = qwen.lm_head(model)(loop(model, embeds, valid, pos))
    hf = model(**hf_inputs(b)).logits
    torch.testing.assert_close(ours[valid], hf[valid], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_image_features_are_the_untouched_vision_encoder(model, batch):
    """Per-image features == HF's visual tower on each image alone (windows never cross images)."""
    feats = qwen.image_features(model, batch["pixel_values"], batch["image_grid_thw"])
    start = 0
    for i, grid in enumerate(batch["image_grid_thw"]):
        n = int(grid.prod())
        alone = model.model.visual(batch["pixel_values"][start : start + n], grid_thw=grid[None]).pooler_output
        torch.testing.assert_close(feats[i], alone, rtol=1e-5, atol=1e-5)
        start += n


def test_rope_positions_follow_the_grid(model):
    """t = h = w on text; an image of 3 x 4 merged tokens at start s: (s, s + row, s + col); text resumes at s + 4."""
    b = make_batch([(2, [(6, 8)], 3, 0)], seed=0)
    pos, delta = qwen.rope_positions(model, b["input_ids"], b["attention_mask"], b["image_grid_thw"])
    pos = pos[0]
    s = 3  # 2 text + <vision_start>
    img = pos[s : s + 12]
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    assert torch.equal(img, torch.stack([torch.full((12,), s), s + rows.flatten(), s + cols.flatten()], -1))
    assert torch.equal(pos[:s], torch.arange(s)[:, None].expand(s, 3))
    after = pos[s + 12 :]
    assert torch.equal(after, (s + 4 + torch.arange(len(after)))[:, None].expand(-1, 3))
    assert int(delta) == int(pos.max()) + 1 - b["input_ids"].shape[1]


@torch.no_grad()
def test_removed_vision_tokens_keep_original_positions(model, batch):
    """Dropping vision tokens from the embeddings at their ORIGINAL (t, h, w) == HF's text model given the same."""
    ids, am, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    merged = qwen.merge(model, ids, batch["pixel_values"], image_grid_thw=grid)
    embeds, vision = merged.embeds, merged.vision
    pos, _ = qwen.rope_positions(model, ids, am, grid)
    g = torch.Generator().manual_seed(0)
    keep = am.bool() & ~(vision & (torch.rand(ids.shape, generator=g) < 0.6))
    index, valid = pack_index(keep)
    e, p = gather_rows(embeds, index), gather_rows(pos, index)
    ours = loop(model, e, valid, p)
    hf = model.model.language_model(
        inputs_embeds=e, attention_mask=valid.long(), position_ids=p.permute(2, 0, 1)
    ).last_hidden_state
    torch.testing.assert_close(ours[valid], hf[valid], rtol=1e-5, atol=1e-5)
    renumbered = loop(model, e, valid, torch.arange(e.shape[1])[None, :, None].expand(e.shape[0], -1, 3))
    assert not torch.allclose(ours[valid], renumbered[valid], atol=1e-3)  # the positions matter


@torch.no_grad()
def test_sample_alone_slices(batch):
    for i in range(3):
        one = sample_of(batch, i)
        assert int((one["input_ids"] == IMG).sum()) == int(one["image_grid_thw"].prod(-1).sum()) // 4
        assert one["pixel_values"].shape[0] == int(one["image_grid_thw"].prod(-1).sum())


def test_token_count_mismatch_names_the_sample(model, batch):
    ids = batch["input_ids"].clone()
    ids[1, -1] = IMG
    with pytest.raises(ValueError, match="sample 1 has 13 image tokens"):
        qwen.merge(model, ids, batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])


def _prefill_and_decode(model, batch, keep, steps):
    """Greedy decoding with a KV cache over the kept slots (original positions), decode positions text + delta."""
    from transformers import DynamicCache

    ids, am, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    embeds = qwen.merge(model, ids, batch["pixel_values"], image_grid_thw=grid).embeds
    pos, delta = qwen.rope_positions(model, ids, am, grid)  # delta from the UNPRUNED prompt
    index, valid = pack_index(keep & am.bool())
    cache = DynamicCache(config=model.config)
    hidden = loop(model, gather_rows(embeds, index), valid, gather_rows(pos, index), cache)
    out = [qwen.lm_head(model)(hidden[:, -1]).argmax(-1)]
    text_pos = am.sum(1, keepdim=True) - 1  # generate()'s cumsum(mask) - 1 of the last prompt token
    for _ in range(steps - 1):
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], 1)
        text_pos = text_pos + 1
        h = loop(
            model,
            qwen.embed_tokens(model, out[-1][:, None]),
            valid,
            qwen.decode_position_ids(model, text_pos, {"rope_deltas": delta}),
            cache,
            mask=causal_mask(valid, 1),
        )
        out.append(qwen.lm_head(model)(h[:, -1]).argmax(-1))
    return torch.stack(out, 1)


@torch.no_grad()
def test_cached_decode_with_rope_deltas_equals_hf_generate(model, batch):
    ours = _prefill_and_decode(model, batch, batch["attention_mask"].bool(), steps=6)
    hf = model.generate(**hf_inputs(batch), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, hf[:, batch["input_ids"].shape[1] :])


@torch.no_grad()
def test_pruned_decode_positions_continue_as_unpruned(model, batch):
    """Vision tokens removed from the prefix: cached greedy == recomputing prefix + tokens at the ORIGINAL positions."""
    ids, am, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    vision = ids == IMG
    keep = am.bool() & ~(vision & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5))
    gen = _prefill_and_decode(model, batch, keep, steps=5)
    embeds = qwen.merge(model, ids, batch["pixel_values"], image_grid_thw=grid).embeds
    pos, delta = qwen.rope_positions(model, ids, am, grid)
    n = am.sum(1, keepdim=True)
    for step in range(gen.shape[1]):
        new = gen[:, :step]
        new_pos = qwen.decode_position_ids(model, n + torch.arange(step)[None], {"rope_deltas": delta})  # (B, step, 3)
        e = torch.cat([embeds, qwen.embed_tokens(model, new)], 1)
        p = torch.cat([pos, new_pos], 1)
        k = torch.cat([keep & am.bool(), keep.new_ones(keep.shape[0], step)], 1)
        index, valid = pack_index(k)
        h = loop(model, gather_rows(e, index), valid, gather_rows(p, index))
        assert torch.equal(qwen.lm_head(model)(h[:, -1]).argmax(-1), gen[:, step]), f"step {step}"
