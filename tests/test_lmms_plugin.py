"""lmms-eval plugin against lmms-eval's simple-model interface, without lmms-eval installed (the real
client runs in the second environment: scripts/eval_e2e.sh, tests/test_lmms_e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_fixtures import tiny_model_folder, tiny_pruned_model
from PIL import Image
from transformers import AutoProcessor, StoppingCriteriaList

from lightning_lvp.eval.benchmarks import PromptItem
from lightning_lvp.eval.lmms_plugin import (
    AUTO_BATCH_SIZE,
    LVPLmms,
    cut_at,
    encode_sample,
    generation_options,
    process_rank,
    resolve_batch_size,
    resolve_device,
    shard,
)
from lightning_lvp.eval.runner import PrunedGenerator
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.generation import DecodedStopStrings, PrunedCache

QUESTIONS = ["Is there a 7 in the image?", "What digit is in r2c2?", "How many 3s are in row 1?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    model_dir = tiny_model_folder(root / "model")
    model = tiny_pruned_model(model_dir)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    for i, im in enumerate(images):
        im.save(root / f"{i}.png")
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return root, model_dir, model, images, processor


def make_plugin(setup, **kw):
    root, model_dir, model, images, processor = setup
    args = dict(pretrained=str(model_dir), rho=0.5, batch_size=2, max_new_tokens=4, model=model, processor=processor)
    plugin = LVPLmms(**{**args, **kw})
    plugin.task_dict = {"pope": {"test": {i: {"image": im} for i, im in enumerate(images)}}}
    return plugin


def requests(gen_kwargs, questions=QUESTIONS):
    return [
        SimpleNamespace(args=(f"<image>\n{q}", dict(gen_kwargs), lambda doc: [doc["image"]], i, "pope", "test"))
        for i, q in enumerate(questions)
    ]


def test_generate_until_matches_our_generator(setup):
    root, model_dir, model, images, processor = setup
    plugin = make_plugin(setup)
    assert plugin.ratios == [0.5, 0.3, 0.1]
    got = plugin.generate_until(requests({"max_new_tokens": 4, "until": ["</s>"]}))
    ref = PrunedGenerator(model, processor, [str(root)], ratios=[0.5, 0.3, 0.1], max_new_tokens=4)
    want = ref([PromptItem(str(i), f"{i}.png", q) for i, q in enumerate(QUESTIONS)])
    assert got == want and len(got) == 3


def direct_answers(setup, plugin, **options):
    """The same prompts through PrunedLlava.generate with explicit options (batch of all three)."""
    _, _, model, images, processor = setup
    samples = [encode_sample(processor, q, im) for q, im in zip(QUESTIONS, images)]
    batch = plugin.collate(samples)
    out = model.generate(**model_inputs(batch), ratios=plugin.ratios, **options)
    return [processor.tokenizer.decode(r.tolist(), skip_special_tokens=True).strip() for r in out]


def test_task_generation_kwargs_reach_generate(setup):
    plugin = make_plugin(setup, batch_size=3)
    beams = {"max_new_tokens": 3, "num_beams": 2, "temperature": 0, "do_sample": False, "top_p": None}
    assert plugin.generate_until(requests(beams)) == direct_answers(setup, plugin, max_new_tokens=3, num_beams=2)
    sampled = {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    torch.manual_seed(5)
    got = plugin.generate_until(requests(sampled))
    torch.manual_seed(5)
    want = direct_answers(setup, plugin, max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9)
    assert got == want
    greedy = direct_answers(setup, plugin, max_new_tokens=3)
    assert plugin.generate_until(requests({"max_new_tokens": 3, "temperature": 0, "do_sample": True})) == greedy


def test_until_stops_decoding_and_cuts(setup):
    plugin = make_plugin(setup, batch_size=3)
    full = plugin.generate_until(requests({"max_new_tokens": 6}))
    words = full[0].split()
    assert len(words) > 1, full  # the tiny random model says several words
    stop = words[1]
    got = plugin.generate_until(requests({"max_new_tokens": 6, "until": [stop]}))
    assert got == [cut_at(t, [stop]).strip() for t in full]
    _, _, model, images, processor = setup
    batch = plugin.collate([encode_sample(processor, q, im) for q, im in zip(QUESTIONS, images)])
    stops = DecodedStopStrings(processor.tokenizer, [stop], batch["input_ids"].shape[1])
    new = model.generate(**model_inputs(batch), ratios=plugin.ratios, max_new_tokens=6)
    flags = stops(torch.cat([batch["input_ids"], new], 1), None)  # only the continuation is searched
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    assert flags.tolist() == [stop in t for t in texts] and bool(flags[0])
    assert not stops(batch["input_ids"], None).any()
    assert StoppingCriteriaList([stops])(torch.cat([batch["input_ids"], new], 1), None).tolist() == flags.tolist()


def test_generation_options_mapping():
    opts, until = generation_options({"until": "\n", "max_new_tokens": 5, "temperature": 0, "num_beams": "2"}, 9)
    assert opts == {"max_new_tokens": 5, "do_sample": False, "num_beams": 2} and until == ["\n"]
    opts, _ = generation_options({"do_sample": True, "temperature": 0.5, "top_p": 0.8, "image_aspect_ratio": "pad"}, 9)
    assert opts == {"max_new_tokens": 9, "do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 0.8}


def test_unhonourable_task_option_is_an_error(setup):
    plugin = make_plugin(setup)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        plugin.generate_until(requests({"max_new_tokens": 2, "prompt_lookup_num_tokens": 3}))


def test_loglikelihood_equals_cached_forced_decoding(setup):
    """Teacher-forced scores == feeding the continuation token by token through the pruned cache."""
    _, _, model, images, processor = setup
    plugin = make_plugin(setup)
    conts = ["yes", "r2c2 7", "no no"]
    reqs = [
        SimpleNamespace(args=(f"<image>\n{q}", c, lambda doc: [doc["image"]], i, "pope", "test"))
        for i, (q, c) in enumerate(zip(QUESTIONS, conts))
    ]
    got = plugin.loglikelihood(reqs)
    wrapper = model.for_generation(plugin.ratios)
    for (logp, greedy), q, c, im in zip(got, QUESTIONS, conts, images):
        full = encode_sample(processor, q, im, continuation=c)
        scored = full["labels"] != -100
        n_prompt, n_end = int(scored.nonzero()[0]), int(scored.nonzero()[-1]) + 1
        assert scored[n_prompt:n_end].all() and n_end == len(scored) - 1  # the closing </s> is not scored
        ids = full["input_ids"][None]
        cache = PrunedCache(model.llava.config)
        with torch.no_grad():
            step = wrapper(input_ids=ids[:, :n_prompt], pixel_values=full["pixel_values"][None], cache=cache)
            want, all_greedy = 0.0, True
            for t in range(n_prompt, n_end):
                logits = step.logits[0, -1].float()
                want += torch.log_softmax(logits, -1)[ids[0, t]].item()
                all_greedy &= bool(logits.argmax() == ids[0, t])
                step = wrapper(input_ids=ids[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache)
        assert logp == pytest.approx(want, abs=1e-4) and greedy == all_greedy


def test_batch_size_auto_and_errors():
    assert resolve_batch_size("auto") == AUTO_BATCH_SIZE
    assert resolve_batch_size("auto:4") == AUTO_BATCH_SIZE
    assert resolve_batch_size("auto", max_batch_size=2) == 2
    assert resolve_batch_size("3") == 3 and resolve_batch_size(1) == 1
    for bad in ("x", "0", "-2"):
        with pytest.raises(ValueError, match="--batch_size must be a positive integer, 'auto' or 'auto:N'"):
            resolve_batch_size(bad)


def test_device_from_either_place(setup, monkeypatch):
    _, model_dir, model, _, processor = setup
    common = dict(model=model, processor=processor)
    one = LVPLmms.create_from_arg_string(f"pretrained={model_dir},device=cpu", {"device": None, "batch_size": "auto"})
    two = LVPLmms.create_from_arg_string(f"pretrained={model_dir}", {"device": "cpu", "batch_size": 1})
    both = LVPLmms.create_from_arg_string(f"pretrained={model_dir},device=cpu", {"device": "cpu"})
    for p in (one, two, both):
        assert p.device == torch.device("cpu")
    assert one.batch_size == AUTO_BATCH_SIZE
    with pytest.raises(ValueError, match="device given twice"):
        LVPLmms.create_from_arg_string(f"pretrained={model_dir},device=cpu", {"device": "cuda:0"})
    with pytest.raises(ValueError, match="unknown --model_args for lightning_lvp: \\['temprature'\\]"):
        LVPLmms(pretrained=str(model_dir), temprature=0, **common)
    assert resolve_device("cuda", local_rank=1, world_size=2) == "cuda:1"
    assert resolve_device("cuda:3", local_rank=1, world_size=2) == "cuda:3"
    assert resolve_device("cpu", local_rank=1, world_size=2) == "cpu"


def test_rank_and_sharding(setup, monkeypatch):
    """Under a launcher every process reports its rank; lmms-eval gives it every world_size-th document."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_rank() == (1, 2, 1)
    plugin = make_plugin(setup)
    assert (plugin.rank, plugin.world_size) == (1, 2)
    docs = list(range(7))
    parts = [shard(docs, r, 2) for r in range(2)]
    assert parts == [[0, 2, 4, 6], [1, 3, 5]]
    assert sorted(sum(parts, [])) == docs  # every document exactly once
    with pytest.raises(ValueError, match="rank must be in"):
        shard(docs, 2, 2)


def test_cut_at_stop_strings():
    assert cut_at("yes. no", ["."]) == "yes"
    assert cut_at("answer", []) == "answer"
