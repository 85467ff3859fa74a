"""The family-agnostic pruned model on Qwen2.5-VL: the LLaVA-1.5 comparisons on a tiny random model.

All ratios 1 == HF's forward; masked == removal with fixed decisions; a batch mixing image sizes
(different token counts) and padding == each sample alone; kept counts exact per sample; positions
original (t, h, w); cached greedy == recomputation; unpruned generation == HF ``generate()``; every
method (LVPruning, FastV, random, uniform) runs, CLS-knee refuses with a clear error.
"""

from __future__ import annotations

import pytest
import torch
from qwen_fixtures import IMG, build, hf_inputs, make_batch, sample_of

from lightning_lvp.families import family_for
from lightning_lvp.families.qwen2_5_vl import Qwen2_5_VLFamily
from lightning_lvp.methods.fastv import FastV
from lightning_lvp.methods.knee import ClsKneePruning
from lightning_lvp.methods.lvp import LVPruning
from lightning_lvp.methods.simple import RandomPruning, UniformPruning
from lightning_lvp.model import PrunedVLM

# 16, 12 and 4 vision tokens; the last sample has two images (4 + 4)
SPECS = [(3, [(8, 8)], 5, 2), (1, [(6, 8)], 2, 3), (2, [(4, 4), (4, 4)], 4, 2)]
N_VIS = [16, 12, 8]


def keys(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "prompt_mask", "image_grid_thw")}


def lvp(**kw) -> LVPruning:
    args = dict(after_layers=[1, 2, 3], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=4)
    return LVPruning(**{**args, **kw})


@pytest.fixture(scope="module")
def base():
    return build(seed=5)


@pytest.fixture(scope="module")
def model(base):
    torch.manual_seed(0)
    return PrunedVLM(base, lvp())


def test_family_is_chosen_from_the_config(base):
    assert isinstance(family_for(base), Qwen2_5_VLFamily)
    assert isinstance(family_for(base.config), Qwen2_5_VLFamily)
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        family_for({"model_type": "qwen3_vl"})  # the error lists the supported families


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_all_ratios_one_equal_hf_forward(base, model, padding):
    batch = make_batch(SPECS, padding=padding, seed=2)
    hf = base(**hf_inputs(batch)).logits
    for out in (
        model.forward_infer(**keys(batch), ratios=[1.0, 1.0, 1.0]),
        PrunedVLM(base, None).forward_infer(**keys(batch)),
    ):
        st = out.state
        ours = model.logits(out.hidden)[st.valid]
        ref = hf.gather(1, st.orig_index[..., None].expand(-1, -1, hf.shape[-1]))[st.valid]
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_masking_equals_removal(model, padding):
    """Same hard decisions: masked training path == token-removing path at every text position."""
    batch = make_batch(SPECS, padding=padding, seed=3)
    infer = model.forward_infer(**keys(batch))
    vision = batch["input_ids"] == IMG
    dec = []
    for kept in infer.kept_patches:  # (B, N_max) alive patches -> (B, T) keep masks in input coordinates
        d = torch.zeros_like(vision)
        for b in range(vision.shape[0]):
            d[b, vision[b]] = kept[b, : int(vision[b].sum())]
        dec.append(d)
    infer = model.forward_infer(**keys(batch), decisions=dec)
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    prev_text = torch.nn.functional.pad((ids != IMG) & valid, (1, 0))[:, :-1]
    labels = torch.where(valid & prev_text & (ids != IMG), ids, -100)
    train = model.forward_train(**keys(batch), labels=labels, decisions=[d.float() for d in dec])
    li, ti, ri = model.label_logits(infer.hidden, infer.state, labels)
    assert train.logits.shape[0] > 20 and torch.equal(train.targets, ti) and torch.equal(train.sample_index, ri)
    torch.testing.assert_close(train.logits, li, atol=1e-5, rtol=1e-5)
    expected = torch.stack([d.sum(1) for d in dec], 1).float() / torch.tensor(N_VIS)[:, None]
    assert torch.allclose(train.kept, expected)


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batch_mixing_image_sizes_equals_each_sample_alone(model, padding):
    batch = make_batch(SPECS, padding=padding, seed=4)
    out = model.forward_infer(**keys(batch))
    last = model.logits(out.hidden[:, -1])
    for i in range(len(SPECS)):
        alone = model.forward_infer(**keys(sample_of(batch, i)))
        torch.testing.assert_close(model.logits(alone.hidden[:, -1]), last[i : i + 1], atol=1e-5, rtol=1e-5)
        for a, b in zip(alone.kept_patches, out.kept_patches):
            assert torch.equal(a[0], b[i, : a.shape[1]]) and not b[i, a.shape[1] :].any()


@torch.no_grad()
def test_kept_counts_exact_per_sample_and_positions_original(base, model):
    batch = make_batch(SPECS, padding="left", seed=5)
    fam = family_for(base)
    positions, _ = fam.rope_positions(base, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    out = model.forward_infer(**keys(batch), ratios=[0.5, 0.3, 0.1], use_cache=True)
    expected = [[round(r * n + 1e-9) for n in N_VIS] for r in (0.5, 0.3, 0.1)]  # 16/12/8 -> 8,6,4 / 5,4,2 / 2,1,1
    assert [k.sum(1).tolist() for k in out.kept_patches] == [[8, 6, 4], [5, 4, 2], [2, 1, 1]] == expected
    st = out.state
    assert st.position_ids.shape[-1] == 3
    assert torch.equal(st.position_ids[st.valid], gather_3d(positions, st.orig_index)[st.valid])
    assert (st.position_ids[st.valid & st.vision][:, 1:] != st.position_ids[st.valid & st.vision][:, :1]).any()


def gather_3d(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def test_cached_greedy_equals_recomputation(model):
    """Pruned KV cache + decode positions text + rope_delta == re-running the whole prefix every step."""
    batch = make_batch(SPECS, padding="left", seed=6)
    gen = model.generate(**keys(batch), max_new_tokens=5, eos_token_id=-1)
    assert gen.shape == (3, 5)
    ids, mask, prompt = batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]
    for step in range(gen.shape[1]):
        out = model.forward_infer(ids, batch["pixel_values"], mask, prompt, image_grid_thw=batch["image_grid_thw"])
        nxt = model.logits(out.hidden[:, -1]).argmax(-1)
        assert torch.equal(nxt, gen[:, step]), f"step {step}"
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        prompt = torch.cat([prompt, torch.zeros_like(prompt[:, :1])], 1)


@torch.no_grad()
def test_unpruned_generation_equals_hf_generate(base):
    batch = make_batch(SPECS, padding="left", seed=7)
    hf = base.generate(**hf_inputs(batch), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = PrunedVLM(base, None).generate(**keys(batch), max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(ours, hf[:, batch["input_ids"].shape[1] :])
    beams = PrunedVLM(base, None).generate(**keys(batch), max_new_tokens=4, eos_token_id=-1, num_beams=2)
    hf_beams = base.generate(**hf_inputs(batch), max_new_tokens=4, num_beams=2, eos_token_id=None, pad_token_id=0)
    assert torch.equal(beams, hf_beams[:, batch["input_ids"].shape[1] :])


@torch.no_grad()
@pytest.mark.parametrize(
    "method, counts",
    [
        (FastV(k=2, keep_ratio=0.5), [[8, 6, 4]]),
        (RandomPruning(after_layers=[1, 2], keep_ratios=[0.5, 0.25]), [[8, 6, 4], [4, 3, 2]]),
        (UniformPruning(after_layers=[0, 2], keep_ratios=[0.5, 0.25]), [[8, 6, 4], [4, 3, 2]]),
    ],
)
def test_training_free_methods_run_with_exact_counts(base, method, counts):
    batch = make_batch(SPECS, padding="left", seed=8)
    pruned = PrunedVLM(base, method)
    out = pruned.forward_infer(**keys(batch))
    assert [k.sum(1).tolist() for k in out.kept_patches] == counts
    gen = pruned.generate(**keys(batch), max_new_tokens=3, eos_token_id=-1)
    assert gen.shape == (3, 3)


def test_cls_knee_refuses_clearly(base):
    batch = make_batch(SPECS, padding="left", seed=9)
    with pytest.raises(ValueError, match="no CLS token"):
        PrunedVLM(base, ClsKneePruning()).forward_infer(**keys(batch))


def test_lvp_trains_on_qwen(base):
    """The masked training path: gradients reach the decision modules, never the frozen model."""
    torch.manual_seed(1)
    pruned = PrunedVLM(base, lvp())
    batch = make_batch(SPECS, padding="right", seed=10)
    out = pruned.forward_train(**keys(batch), labels=batch["labels"], tau=1.0)
    out.loss_causal.backward()
    assert all(p.grad is not None for p in pruned.method.parameters() if p.requires_grad)
    assert all(p.grad is None for p in base.parameters())
    assert out.kept.shape == (3, 3)


def test_bad_inputs_name_the_sample(model):
    batch = make_batch(SPECS, padding="left", seed=11)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.forward_infer(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    grid = batch["image_grid_thw"].clone()
    grid[0, 2] = 6  # image 0 now gives 12 tokens: sample 0's 16 placeholders take images 0 and 1 (24)
    pix = batch["pixel_values"][: int(grid.prod(-1).sum())]
    with pytest.raises(ValueError, match=r"sample 0 has 16 image tokens \(98\) but its images \[0, 1\] give 24"):
        model.forward_infer(batch["input_ids"], pix, batch["attention_mask"], image_grid_thw=grid)


def test_ratio_leaving_a_small_image_no_token_names_the_sample(model):
    batch = make_batch(SPECS, padding="left", seed=12)
    with pytest.raises(ValueError, match="sample 2"):  # round(0.05 x 8) = 0; samples 0 and 1 keep 1
        model.forward_infer(**keys(batch), ratios=[0.5, 0.3, 0.05])


def test_pruners_round_trip_on_qwen_and_refuse_another_family(base, tmp_path):
    from lightning_lvp.io import save_pruners
    from lightning_lvp.tiny import build_tiny_llava

    torch.manual_seed(2)
    pruned = PrunedVLM(base, lvp())
    base.save_pretrained(tmp_path / "qwen")
    save_pruners(pruned.method, tmp_path / "pruners")
    loaded = PrunedVLM.from_pretrained(str(tmp_path / "qwen"), str(tmp_path / "pruners"))
    assert isinstance(loaded.family, Qwen2_5_VLFamily)
    batch = make_batch(SPECS, padding="left", seed=13)
    with torch.no_grad():
        a, b = pruned.forward_infer(**keys(batch)), loaded.forward_infer(**keys(batch))
    assert all(torch.equal(x, y) for x, y in zip(a.kept_patches, b.kept_patches))
    torch.testing.assert_close(pruned.logits(a.hidden[:, -1]), loaded.logits(b.hidden[:, -1]))
    llava = PrunedVLM(build_tiny_llava(), lvp())  # same hidden size and depth: only the family differs
    save_pruners(llava.method, tmp_path / "llava_pruners")
    with pytest.raises(ValueError, match="trained on a 'llava' model, but this model is a 'qwen2_5_vl' model"):
        PrunedVLM.from_pretrained(str(tmp_path / "qwen"), str(tmp_path / "llava_pruners"))


@torch.no_grad()
def test_peers_on_qwen_run_or_refuse_clearly(base):
    from lightning_lvp.methods.peers import build_peer

    batch = make_batch(SPECS, padding="left", seed=14)
    for spec in ("dart:k=2", "divprune:keep_ratio=0.5"):
        out = PrunedVLM(base, build_peer(spec)).forward_infer(**keys(batch))
        assert out.state.position_ids.shape[-1] == 3 and len(out.kept_patches) == 1
    with pytest.raises(ValueError, match="no CLS token"):
        PrunedVLM(base, build_peer("visionzip")).forward_infer(**keys(batch))
    with pytest.raises(ValueError, match="M-RoPE"):
        PrunedVLM(base, build_peer("divprune:positions=consecutive")).forward_infer(**keys(batch))


def test_decision_rotary_on_mrope_positions():
    """(t, h, w) positions: text tokens (t = h = w) get the 1-D table exactly; image tokens differ by h / w."""
    from lightning_lvp.decision import rotary_cos_sin

    one_d = torch.tensor([[0, 3, 7, 12]])
    cos1, sin1 = rotary_cos_sin(one_d, 16)
    cos3, sin3 = rotary_cos_sin(one_d[..., None].expand(-1, -1, 3), 16)
    assert torch.equal(cos1, cos3) and torch.equal(sin1, sin3)
    img = torch.tensor([[[5, 5, 5], [5, 5, 6], [5, 6, 5]]])
    cos, _ = rotary_cos_sin(img, 16)
    assert not torch.equal(cos[0, 0], cos[0, 1]) and not torch.equal(cos[0, 1], cos[0, 2])
    torch.manual_seed(3)
    pruned = PrunedVLM(build(seed=5), lvp(rotary=True))
    batch = make_batch(SPECS, padding="left", seed=15)
    out = pruned.forward_train(**keys(batch), labels=batch["labels"])
    assert torch.isfinite(out.loss_causal)
