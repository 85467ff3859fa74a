"""Our VisionZip and DivPrune reproduce the authors' code (visionzip 0.1.3 / github.com/vbdi/divprune on
the original LLaVA, transformers 4.37).

The golden files and the tiny weights come from ``benchmarks/peers/visionzip_golden.py`` and
``divprune_golden.py`` (run in a separate old-transformers venv); this test needs only the normal
environment.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lvp import adapter
from lightning_lvp.methods import DivPrune, VisionZip
from lightning_lvp.methods.visionzip import split_counts
from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import TinyLlavaSpec, tiny_llava_config

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "visionzip.json").read_text())


@pytest.fixture(scope="module")
def llava(golden):
    d = golden["dims"]
    spec = TinyLlavaSpec(**{k: d[k] for k in d if k != "num_kv_heads"}, num_kv_heads=d["num_heads"])
    model = adapter.build_from_config(tiny_llava_config(spec))
    missing, unexpected = model.load_state_dict(load_file(GOLDEN / "tiny_llava_original.safetensors"), strict=False)
    assert missing == [] and unexpected == []
    return model.eval()


def inputs(golden, i):
    d, s = golden["dims"], golden["samples"][i]
    gen = torch.Generator().manual_seed(golden["pixel_seed"])
    pixels = [torch.randn(1, 3, d["image_size"], d["image_size"], generator=gen) for _ in golden["samples"]][i]
    assert float(pixels.sum()) == pytest.approx(s["pixel_sum"], abs=1e-4)  # the same images as the authors' run
    ids = torch.tensor([s["pre"] + [d["image_token_id"]] * golden["num_patches"] + s["post"]])
    return ids, pixels


def generate(model, ids, pixels, golden):
    return model.generate(ids, pixels, max_new_tokens=golden["max_new_tokens"])[0].tolist()


def test_unpruned_generation_is_token_identical(llava, golden):
    model = PrunedLlava(llava, None)
    for i, sample in enumerate(golden["samples"]):
        assert generate(model, *inputs(golden, i), golden) == sample["base_tokens"][1:]  # [0]: HF 4.37's start token


@pytest.mark.parametrize("setting", range(3))
def test_visionzip_reproduces_the_authors(llava, golden, setting):
    cfg = golden["settings"][setting]
    total, contextual = cfg["dominant"] + cfg["contextual"], cfg["contextual"]
    method = VisionZip(keep_ratio=total / golden["num_patches"], contextual_fraction=contextual / total)
    assert split_counts(total, method.contextual_fraction, True) == (cfg["dominant"] - 1, contextual)
    blocks = []
    original = method.apply

    def spy(state, ctx, ratio):
        new = original(state, ctx, ratio)
        blocks.append((new.hidden[new.alive_vision].clone(), new.patch_index[new.alive_vision].tolist()))
        return new

    method.apply = spy
    model = PrunedLlava(llava, method)
    for i, row in enumerate(cfg["samples"]):
        ids, pixels = inputs(golden, i)
        out = model.forward_infer(ids, pixels)
        block, patches = blocks[-1]
        d = cfg["dominant"]
        assert patches[0] == -1 and patches[1:d] == row["dominant_patches"]  # [CLS, dominant..., targets...]
        assert out.kept_patches[0][0].sum().item() == total - 1  # the CLS token is no patch
        torch.testing.assert_close(block, torch.tensor(row["image_block"]), atol=2e-5, rtol=1e-4)
        assert generate(model, ids, pixels, golden) == row["tokens"][1:]


@pytest.mark.parametrize("setting", range(3))
def test_divprune_reproduces_the_authors(llava, golden, setting):
    divprune = json.loads((GOLDEN / "divprune.json").read_text())
    cfg = divprune["settings"][setting]
    model = PrunedLlava(llava, DivPrune(keep_ratio=cfg["ratio"], positions="consecutive"))
    pad = adapter.pad_token_id(llava)
    d = golden["dims"]
    for i, (prompt, row) in enumerate(zip(divprune["prompts"], cfg["samples"], strict=True)):
        _, pixels = inputs(golden, i)
        ids = torch.tensor([prompt["pre"] + [d["image_token_id"]] * golden["num_patches"] + prompt["post"]])
        out = model.forward_infer(ids, pixels)
        assert out.kept_patches[0][0].nonzero().squeeze(1).tolist() == row["kept_patches"]
        expected = row["tokens"][1:]  # [0]: HF 4.37's start token; shorter where it met eos
        tokens = generate(model, ids, pixels, golden)
        assert tokens[: len(expected)] == expected and all(t == pad for t in tokens[len(expected) :])
