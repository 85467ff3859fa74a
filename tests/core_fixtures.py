"""Tiny LLaVA + hand-built batches shared by the core tests."""

from __future__ import annotations

import torch

from lightning_lvp.methods.lvp import LVPruning
from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

SPEC = TinyLlavaSpec()  # 4 LLM layers, 16 vision tokens (16 px / 4)
IMG = SPEC.image_token_id
N_VIS = SPEC.num_image_tokens


def make_method(**kw) -> LVPruning:
    args = dict(after_layers=[1, 2, 3], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=4)
    args.update(kw)
    return LVPruning(**args)


def make_model(method: LVPruning | None = None, seed: int = 0) -> PrunedLlava:
    return PrunedLlava(build_tiny_llava(SPEC, seed=seed), method if method is not None else make_method())


def sample_ids(pre: int, post: int, answer: int = 0, seed: int = 0) -> tuple[list[int], list[int]]:
    """Token ids (text, image block, text, answer) and a 0/1 list marking answer tokens."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, 90, (n,), generator=g).tolist()  # noqa: E731
    ids = text(pre) + [IMG] * N_VIS + text(post) + text(answer)
    return ids, [0] * (len(ids) - answer) + [1] * answer


def make_batch(specs: list[tuple[int, int, int]], padding: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch of samples (pre, post, answer lengths) with images at different offsets."""
    rows = [sample_ids(*s, seed=seed + i) for i, s in enumerate(specs)]
    t = max(len(r[0]) for r in rows)
    b = len(rows)
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    ans = torch.zeros(b, t, dtype=torch.bool)
    for i, (r, a) in enumerate(rows):
        sl = slice(t - len(r), t) if padding == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl], ans[i, sl] = torch.tensor(r), 1, torch.tensor(a, dtype=torch.bool)
    labels = torch.where(ans, ids, -100)
    prompt = mask.bool() & (ids != IMG) & ~ans
    pix = torch.randn(b, 3, SPEC.image_size, SPEC.image_size, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_mask": prompt, "pixel_values": pix}


def inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "prompt_mask")}


def decisions_from(out, batch) -> list[torch.Tensor]:
    """Inference-path kept patches -> (B, T) keep masks in input coordinates."""
    vision = batch["input_ids"] == IMG
    result = []
    for kept in out.kept_patches:
        d = torch.zeros_like(vision)
        d[vision] = kept.reshape(-1)
        result.append(d)
    return result


@torch.no_grad()
def assert_cached_equals_recomputed(model: PrunedLlava, batch: dict, max_new_tokens: int) -> None:
    """Greedy generation with the pruned KV cache == re-running the whole prefix at every step."""
    gen = model.generate(**inputs(batch), max_new_tokens=max_new_tokens, eos_token_id=-1)
    assert gen.shape[1] == max_new_tokens
    ids, mask, prompt = batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]
    for step in range(gen.shape[1]):
        out = model.forward_infer(ids, batch["pixel_values"], mask, prompt)
        nxt = model.logits(out.hidden[:, -1]).argmax(-1)
        assert torch.equal(nxt, gen[:, step]), f"step {step}"
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        prompt = torch.cat([prompt, torch.zeros_like(prompt[:, :1])], 1)
