"""The adapter against transformers' own LLaVA / Llama forward on tiny random models.

Each test computes one thing two ways: through ``lightning_lvp.adapter`` (what the pruned model
uses) and through HF's public forward or the textbook definition, on grouped-query attention
(4 heads, 2 KV heads) and a left-padded batch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from core_fixtures import IMG, N_VIS, SPEC, make_batch
from transformers import LlamaConfig

from lightning_lvp import adapter
from lightning_lvp.state import causal_mask, positions_from_mask
from lightning_lvp.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def llava():
    return adapter.prepare_frozen(build_tiny_llava(SPEC, seed=3, num_kv_heads=2))


@pytest.fixture(scope="module")
def batch():
    return make_batch([(3, 5, 0), (1, 2, 0)], padding="left", seed=1)  # rows of different length


def our_loop(llava, embeds, attention_mask, cache=None):
    """The decoder loop exactly as PrunedLlava runs it (mask, original positions, rotary, layers, norm)."""
    valid = attention_mask.bool()
    mask = causal_mask(valid, embeds.shape[1])
    pos = positions_from_mask(attention_mask)
    pos_emb = adapter.rotary(llava, embeds, pos)
    hidden = embeds
    for i in range(adapter.text_dims(llava.config).num_layers):
        hidden = adapter.run_layer(llava, i, hidden, mask, pos, pos_emb, cache)
    return adapter.final_norm(llava, hidden)


@torch.no_grad()
def test_layer_loop_equals_llama_model_forward(llava, batch):
    embeds, _, _ = adapter.merge_image_features(llava, batch["input_ids"], batch["pixel_values"])
    mask = batch["attention_mask"]
    ours = our_loop(llava, embeds, mask)
    hf = llava.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask)
    ).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], hf[valid], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_merge_and_loop_equal_llava_forward_logits(llava, batch):
    """Image features scattered into the embeddings + our loop == LlavaForConditionalGeneration.forward."""
    embeds, vision, _ = adapter.merge_image_features(llava, batch["input_ids"], batch["pixel_values"])
    assert torch.equal(vision, batch["input_ids"] == IMG)
    mask = batch["attention_mask"]
    ours = adapter.lm_head(llava)(our_loop(llava, embeds, mask))
    hf = llava(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
    ).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], hf[valid], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_image_features_equal_vision_tower_and_projector(llava, batch):
    """LLaVA's definition: selected CLIP layer, CLS dropped ("default"), then the projector."""
    pix = batch["pixel_values"]
    feats = adapter.image_features(llava, pix)
    tower = llava.model.vision_tower(pix, output_hidden_states=True)
    selected = tower.hidden_states[llava.config.vision_feature_layer]  # (B, 1 + N, Dv)
    torch.testing.assert_close(feats.vision_hidden, selected)
    torch.testing.assert_close(feats.embeds, llava.model.multi_modal_projector(selected[:, 1:]))
    assert feats.embeds.shape == (pix.shape[0], N_VIS, SPEC.hidden_size)


def test_vision_dims_count_tokens_as_the_processor_expands_them(llava):
    dims = adapter.vision_dims(llava.config)
    assert (dims.patches_per_side, dims.num_patches, dims.tokens_per_image) == (4, 16, N_VIS)
    full = llava.config.__class__.from_dict({**llava.config.to_dict(), "vision_feature_select_strategy": "full"})
    assert adapter.vision_dims(full).tokens_per_image == 17  # CLS kept


def test_text_dims(llava):
    dims = adapter.text_dims(llava.config)
    assert (dims.hidden_size, dims.num_layers, dims.num_heads, dims.head_dim) == (32, 4, 4, 8)
    assert (dims.num_kv_heads, dims.intermediate_size, dims.vocab_size) == (2, 64, 99)


def _rope_theta(config: LlamaConfig) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


@torch.no_grad()
def test_rotary_is_textbook_rope_at_original_positions(llava):
    tc = llava.config.text_config
    head_dim = adapter.text_dims(llava.config).head_dim
    pos = torch.tensor([[0, 1, 5, 9, 10], [3, 4, 20, 21, 22]])  # gapped: positions survive pruning
    h = torch.zeros(2, 5, tc.hidden_size)
    cos, sin = adapter.rotary(llava, h, pos)
    inv_freq = 1.0 / (_rope_theta(tc) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = pos[..., None].double() * inv_freq  # (B, L, Dh / 2)
    angles = torch.cat([angles, angles], -1)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-6)


@torch.no_grad()
def test_cache_equals_hf_cache_and_cached_step_equals_recompute(llava, batch):
    embeds, _, _ = adapter.merge_image_features(llava, batch["input_ids"], batch["pixel_values"])
    mask = batch["attention_mask"]
    b, t, _ = embeds.shape
    cache = adapter.new_cache(llava)
    our_loop(llava, embeds, mask, cache)
    dims = adapter.text_dims(llava.config)
    assert adapter.cache_lengths(cache) == [t] * dims.num_layers
    assert adapter.cache_bytes(cache) == dims.num_layers * 2 * b * dims.num_kv_heads * t * dims.head_dim * 4

    hf_cache = adapter.new_cache(llava)
    llava.model.language_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        use_cache=True,
        cache=hf_cache,
    )
    for ours, hf in zip(cache.layers, hf_cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, hf.keys)
        torch.testing.assert_close(ours.values, hf.values)

    # one decode step on the cache == the last position of the full sequence recomputed
    new = torch.randint(1, 90, (b, 1))
    step = adapter.embed_tokens(llava, new)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    pos = positions_from_mask(full_mask)[:, -1:]
    step_mask = causal_mask(full_mask.bool(), 1)
    hidden = step
    pos_emb = adapter.rotary(llava, step, pos)
    for i in range(dims.num_layers):
        hidden = adapter.run_layer(llava, i, hidden, step_mask, pos, pos_emb, cache)
    cached = adapter.final_norm(llava, hidden)[:, -1]
    recomputed = our_loop(llava, torch.cat([embeds, step], 1), full_mask)[:, -1]
    torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-5)
    assert adapter.cache_lengths(cache) == [t + 1] * dims.num_layers


@torch.no_grad()
def test_cache_lengths_differ_per_layer_after_pruning(llava, batch):
    """Layers after a removal cache only the surviving tokens (the pruned KV cache)."""
    embeds, _, _ = adapter.merge_image_features(llava, batch["input_ids"], batch["pixel_values"])
    mask = batch["attention_mask"]
    cache = adapter.new_cache(llava)
    pos = positions_from_mask(mask)
    hidden = embeds
    lengths = [embeds.shape[1], embeds.shape[1], 7, 7]  # drop to the last 7 slots after layer 2
    for i, length in enumerate(lengths):
        hidden, sub_pos = hidden[:, -length:], pos[:, -length:]
        sub_mask = causal_mask(mask[:, -length:].bool(), length)
        hidden = adapter.run_layer(llava, i, hidden, sub_mask, sub_pos, adapter.rotary(llava, hidden, sub_pos), cache)
    assert adapter.cache_lengths(cache) == lengths


def test_run_layer_raises_no_deprecation_warning(llava, batch):
    """Our calls use the current keywords of the installed transformers (CI also escalates these)."""
    embeds, _, _ = adapter.merge_image_features(llava, batch["input_ids"], batch["pixel_values"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            our_loop(llava, embeds, batch["attention_mask"], adapter.new_cache(llava))


def test_transformers_version_is_inside_the_tested_pin():
    from packaging.version import Version

    low, high = adapter.TESTED_TRANSFORMERS
    assert Version(low) <= Version(adapter.transformers_version()) < Version(high)


def test_vision_dims_agree_with_the_processor_token_count():
    """The data pipeline counts image tokens from the processor, the model code from the config: same number."""
    from lightning_lvp.data.llava_dataset import num_image_tokens
    from lightning_lvp.data.tokenizer import build_tiny_processor
    from lightning_lvp.tiny import tiny_llava_config

    for image_size, patch_size in ((16, 4), (48, 8)):
        config = tiny_llava_config(image_size=image_size, patch_size=patch_size)
        processor = build_tiny_processor(image_size, patch_size)
        assert adapter.vision_dims(config).tokens_per_image == num_image_tokens(processor)
