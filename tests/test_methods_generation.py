"""Every method with the real removal path on a tiny LLaVA: cached generation == recomputation without
cache, and a batch with different per-sample counts == each sample alone."""

import pytest
import torch

from lightning_lvp import adapter
from lightning_lvp.methods import (
    DART,
    ClsKneePruning,
    DivPrune,
    FastV,
    LVPruning,
    PyramidDrop,
    RandomPruning,
    UniformPruning,
    VisionZip,
)
from lightning_lvp.methods.knee import cls_similarity, find_knee
from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

SPEC = TinyLlavaSpec()  # 4 LLM layers, 16 patches
NEW_TOKENS = 5
METHODS = {
    "lvp": lambda: LVPruning([1, 2], [0.5, 0.25], [0.5, 0.25], num_blocks=1, num_heads=2, dim=16),
    "knee": lambda: ClsKneePruning(llm_layer=2, keep_ratio=0.5, min_keep=2),
    "knee_attention_text": lambda: ClsKneePruning(llm_layer=1, relevance="attention", text_keep_ratio=0.5),
    "fastv": lambda: FastV(k=2, keep_ratio=0.25),
    "random": lambda: RandomPruning([0, 2], [0.5, 0.25], seed=1),
    "uniform": lambda: UniformPruning([1, 3], [0.5, 0.125]),
    "divprune": lambda: DivPrune(keep_ratio=0.25),
    "divprune_consecutive": lambda: DivPrune(keep_ratio=0.25, positions="consecutive"),
    "dart": lambda: DART(k=1, keep_ratio=0.5, pivot_image=2, pivot_text=2),
    "pdrop": lambda: PyramidDrop(layers=[1, 2], lam=0.5),
    "visionzip": lambda: VisionZip(keep_ratio=0.5, contextual_fraction=0.25),
    "visionzip_original": lambda: VisionZip(
        keep_ratio=0.5, contextual_fraction=0.25, cls_to_llm=False, layout="original"
    ),
    "visionzip_dominant": lambda: VisionZip(keep_ratio=0.375, contextual_fraction=0.0),
}


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(SPEC, seed=0)


@pytest.fixture(scope="module")
def batch():
    """Three left-padded prompts of different lengths, image in the middle."""
    gen = torch.Generator().manual_seed(0)
    n = SPEC.num_image_tokens
    seqs = []
    for pre, post in ((2, 5), (4, 3), (1, 7)):
        text = torch.randint(3, 90, (pre + post,), generator=gen).tolist()
        seqs.append([1] + text[:pre] + [SPEC.image_token_id] * n + text[pre:])
    length = max(map(len, seqs))
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = torch.tensor(s)
        mask[i, length - len(s) :] = 1
    pixels = torch.randn(len(seqs), 3, SPEC.image_size, SPEC.image_size, generator=gen)
    prompt = mask.bool() & (ids != SPEC.image_token_id)
    return {"input_ids": ids, "attention_mask": mask, "prompt_mask": prompt, "pixel_values": pixels}


def make_model(llava, name):
    torch.manual_seed(0)  # LVPruning's random decision weights
    return PrunedLlava(llava, METHODS[name]()).eval()


@pytest.mark.parametrize("name", list(METHODS))
def test_cached_generation_matches_recomputation(llava, batch, name):
    model = make_model(llava, name)
    tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=-1)
    assert tokens.shape == (3, NEW_TOKENS)
    ids, mask, prompt = batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]
    with torch.no_grad():
        for step in range(NEW_TOKENS):
            done = tokens[:, :step]
            full = dict(
                input_ids=torch.cat([ids, done], 1),
                attention_mask=torch.cat([mask, torch.ones_like(done)], 1),
                prompt_mask=torch.cat([prompt, torch.zeros_like(done, dtype=torch.bool)], 1),  # keys stay the prompt
                pixel_values=batch["pixel_values"],
            )
            out = model.forward_infer(**full)
            logits = model.logits(out.hidden[:, -1:])[:, -1]
            assert logits.argmax(-1).tolist() == tokens[:, step].tolist(), f"step {step}"


@pytest.mark.parametrize("name", [n for n in METHODS if n != "random"])  # random draws per batch row
def test_batch_equals_each_sample_alone(llava, batch, name):
    model = make_model(llava, name)
    with torch.no_grad():
        out = model.forward_infer(**batch)
        batched = model.logits(out.hidden[:, -1:])[:, -1]
        tokens = model.generate(**batch, max_new_tokens=3, eos_token_id=-1)
        for i in range(3):
            real = batch["attention_mask"][i].bool()
            one = {k: v[i : i + 1, real] for k, v in batch.items() if k != "pixel_values"}
            one["pixel_values"] = batch["pixel_values"][i : i + 1]
            alone = model.forward_infer(**one)
            torch.testing.assert_close(model.logits(alone.hidden[:, -1:])[0, -1], batched[i], atol=1e-5, rtol=1e-5)
            assert torch.equal(alone.kept_patches[-1][0], out.kept_patches[-1][i])
            assert model.generate(**one, max_new_tokens=3, eos_token_id=-1)[0].tolist() == tokens[i].tolist()


def test_knee_counts_differ_within_the_batch(llava, batch):
    """The batch above really exercises dynamic per-sample counts, and stage 1 keeps the patches most
    similar to CLS up to the knee of each image's own curve."""
    out = make_model(llava, "knee").forward_infer(**batch)
    counts = out.kept_patches[0].sum(1)
    assert len(set(counts.tolist())) > 1, counts
    with torch.no_grad():
        sims = cls_similarity(adapter.image_features(llava, batch["pixel_values"]).vision_hidden)  # (B, N)
    expected = (find_knee(sims.sort(1, descending=True).values) + 1).clamp(min=2)  # min_keep=2
    assert counts.tolist() == expected.tolist()
    for i, k in enumerate(counts.tolist()):
        top = sims[i].topk(k).indices.sort().values
        assert out.kept_patches[0][i].nonzero().squeeze(1).tolist() == top.tolist()
    assert out.kept_patches[1].sum(1).tolist() == torch.floor(0.5 * counts + 0.5).long().tolist()
