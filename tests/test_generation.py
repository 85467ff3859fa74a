"""transformers' generate() on the pruned model (lightning_lvp/generation.py, issue #13).

Three comparisons on a tiny LLaVA with a left-padded batch of different prompt lengths:
* unpruned wrapper == HF ``LlavaForConditionalGeneration.generate`` token for token, every strategy;
* ``PrunedLlava.generate`` (now delegating) == the pre-#13 hand-written loop, greedy and seeded sampling;
* pruned cached decoding == recomputation without a cache (``use_cache=False``), greedy and beam search.
"""

from __future__ import annotations

import pytest
import torch
from gen_reference import loop_generate
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lightning_lvp.generation import PrunedCache, UnsupportedGenerationOption
from lightning_lvp.methods import ClsKneePruning, FastV, LVPruning, UniformPruning
from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

SPEC = TinyLlavaSpec()  # 4 LLM layers, 16 patches
METHODS = {
    "lvp": lambda: LVPruning([1, 2], [0.5, 0.25], [0.5, 0.25], num_blocks=1, num_heads=2, dim=16),
    "knee": lambda: ClsKneePruning(llm_layer=2, keep_ratio=0.5, min_keep=2),
    "fastv": lambda: FastV(k=2, keep_ratio=0.25),
    "uniform": lambda: UniformPruning([1, 3], [0.5, 0.125]),
}

NEW = 6
STRATEGIES = {
    "greedy": dict(),
    "sample": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "beam": dict(num_beams=3),
    "beam_return2": dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    "beam_sample": dict(num_beams=2, do_sample=True),
    "sample_return2": dict(do_sample=True, num_return_sequences=2),
    "repetition_penalty": dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    "several_eos": dict(eos_token_id=[5, 17, 56]),
}


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(SPEC, seed=0)


@pytest.fixture(scope="module")
def batch():
    """Three left-padded prompts of different lengths, image in the middle (no prompt_mask: generate() derives it)."""
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for pre, post in ((2, 5), (4, 3), (1, 7)):
        text = torch.randint(3, 90, (pre + post,), generator=gen).tolist()
        seqs.append([1] + text[:pre] + [SPEC.image_token_id] * SPEC.num_image_tokens + text[pre:])
    length = max(map(len, seqs))
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :], mask[i, length - len(s) :] = torch.tensor(s), 1
    pixels = torch.randn(len(seqs), 3, SPEC.image_size, SPEC.image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def pruned(llava, name):
    torch.manual_seed(0)  # LVPruning's random decision weights
    return PrunedLlava(llava, METHODS[name]() if name else None).eval()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_unpruned_equals_hf_generate(llava, batch, strategy):
    opts = dict(max_new_tokens=NEW, pad_token_id=0, **STRATEGIES[strategy])
    model = pruned(llava, None).for_generation()
    torch.manual_seed(1)
    want = llava.generate(**batch, **opts)
    torch.manual_seed(1)
    got = model.generate(**batch, **opts)
    assert got.shape[0] == batch["input_ids"].shape[0] * opts.get("num_return_sequences", 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["lvp", "fastv", "knee"])
def test_delegating_generate_equals_old_loop(llava, batch, name):
    model = pruned(llava, name)
    prompt = batch["attention_mask"].bool() & (batch["input_ids"] != SPEC.image_token_id)
    args = dict(batch, prompt_mask=prompt, max_new_tokens=NEW)
    assert torch.equal(model.generate(**args, eos_token_id=-1), loop_generate(model, **args, eos_token_id=-1))
    assert torch.equal(model.generate(**args), loop_generate(model, **args))  # the model's eos + pad filler
    sampling = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, eos_token_id=-1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = model.generate(**args, **sampling, generator=g1)
    assert torch.equal(got, loop_generate(model, **args, **sampling, generator=g2))
    assert torch.equal(g1.get_state(), g2.get_state())  # the generator advanced exactly as in the old loop


@pytest.mark.parametrize("name", ["lvp", "fastv", "uniform"])
@pytest.mark.parametrize("strategy", ["greedy", "beam_return2"])
def test_pruned_cache_decode_equals_recomputation(llava, batch, name, strategy):
    model = pruned(llava, name).for_generation()
    opts = dict(max_new_tokens=NEW, pad_token_id=0, eos_token_id=None, **STRATEGIES[strategy])
    cached = model.generate(**batch, **opts)
    recomputed = model.generate(**batch, **opts, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_cache_holds_pruned_keys_and_masks(llava, batch):
    model = pruned(llava, "lvp")  # after layers 1, 2 keeping 0.5, 0.25 of 16 patches
    out = model.for_generation().generate(
        **batch, max_new_tokens=3, return_dict_in_generate=True, num_beams=2, eos_token_id=None, pad_token_id=0
    )
    cache = out.cache
    assert isinstance(cache, PrunedCache)
    lengths = cache.layer_lengths()
    real = batch["attention_mask"].sum(1).max().item()
    decoded = out.sequences.shape[1] - batch["input_ids"].shape[1] - 1  # the last token is never fed back
    assert lengths[0] == real + decoded  # layer 1 sees every prompt token (padding removed)
    assert lengths[1] == real - 16 + 8 + decoded and lengths[2] == real - 16 + 4 + decoded
    assert lengths[3] == lengths[2]
    assert [v.shape[1] for v in cache.stage_valid] == [lengths[0], lengths[1], lengths[2]]
    assert cache.stage_valid[0].shape[0] == 3 * 2  # beams


def test_generation_config_streamer_and_stopping(llava, batch):
    model = pruned(llava, "lvp").for_generation()
    cfg = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    full = model.generate(**batch, generation_config=cfg)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.chunks.append("end")

    one = {k: v[:1] for k, v in batch.items()}
    streamer = Collect()
    got = model.generate(**one, generation_config=cfg, streamer=streamer)
    assert torch.equal(got[0], full[0, -got.shape[1] :]) and streamer.chunks[-1] == "end"
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])  # first chunk is the prompt
    assert streamed.tolist() == got[0, one["input_ids"].shape[1] :].tolist()

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= batch["input_ids"].shape[1] + 2)

    stopped = model.generate(**batch, generation_config=cfg, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert torch.equal(stopped, full[:, : batch["input_ids"].shape[1] + 2])


@pytest.mark.parametrize(
    "option",
    [
        dict(assistant_model="x"),
        dict(prompt_lookup_num_tokens=3),
        dict(cache_implementation="static"),
        dict(prefill_chunk_size=4),
        dict(output_attentions=True),
    ],
)
def test_unsupported_options_name_themselves(llava, batch, option):
    model = pruned(llava, "lvp").for_generation()
    name = next(iter(option))
    with pytest.raises(UnsupportedGenerationOption, match=name):
        model.generate(**batch, max_new_tokens=2, **option)
    if name != "assistant_model":  # a generate() argument, not a GenerationConfig field
        with pytest.raises(UnsupportedGenerationOption, match=name):
            model.generate(**batch, generation_config=GenerationConfig(max_new_tokens=2, **option))
