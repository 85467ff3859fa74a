"""LLaVA-NeXT (anyres) through the family protocol, against HF's own LlavaNext forward / generate().

Tiny random model: 16 px views, 4 px patches (16 tokens per view), pinpoints 16x32, 32x16, 32x32, so
images of different sizes give different numbers of views, grid rows (newline tokens) and tokens.
Each test computes one thing two ways (HF vs ours, masked vs removed, batch vs single, cached vs
recomputed).
"""

from __future__ import annotations

import pytest
import torch

from lightning_lvp.families import family_for
from lightning_lvp.families.llava_next import NEWLINE, LlavaNextFamily
from lightning_lvp.methods import ClsKneePruning, FastV, LVPruning, RandomPruning, UniformPruning
from lightning_lvp.model import PrunedLlava, PrunedVLM
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava_next

SPEC = TinyLlavaSpec()
IMG = SPEC.image_token_id
SIZES = [(16, 40), (30, 30), (16, 16)]  # (height, width): 52 / 88 / 36 placeholders, 3 / 5 / 3 views


@pytest.fixture(scope="module")
def next_model():
    return build_tiny_llava_next(SPEC, seed=0)


def lvp(**kw) -> LVPruning:
    torch.manual_seed(0)
    args = dict(after_layers=[1, 2, 3], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=4)
    return LVPruning(**{**args, **kw})


def make_batch(model, sizes, padding="left", seed=0, answer=0) -> dict:
    """Text, one image block sized for ITS image, text (+ answer tokens); pixels (B, V_max, 3, 16, 16)."""
    fam = family_for(model)
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, 90, (n,), generator=g).tolist()  # noqa: E731
    rows, answers = [], []
    for i, size in enumerate(sizes):
        ids = text(1 + i) + [IMG] * fam.placeholder_count(model, size) + text(3 + 2 * i) + text(answer)
        rows.append(ids)
        answers.append([0] * (len(ids) - answer) + [1] * answer)
    t, b = max(map(len, rows)), len(rows)
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    ans = torch.zeros(b, t, dtype=torch.bool)
    for i, (r, a) in enumerate(zip(rows, answers)):
        sl = slice(t - len(r), t) if padding == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl], ans[i, sl] = torch.tensor(r), 1, torch.tensor(a, dtype=torch.bool)
    views = max(fam.num_views(model.config, s) for s in sizes)
    pix = torch.randn(b, views, 3, SPEC.image_size, SPEC.image_size, generator=g)
    prompt = mask.bool() & (ids != IMG) & ~ans
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pix,
        "image_sizes": torch.tensor(sizes),
        "labels": torch.where(ans, ids, -100),
        "prompt_mask": prompt,
    }


def inputs(batch: dict) -> dict:
    keys = ("input_ids", "pixel_values", "attention_mask", "prompt_mask", "image_sizes")
    return {k: batch[k] for k in keys}


def single(model, batch: dict, i: int, padding: str) -> dict:
    """Row i alone, without its padding and its padded views."""
    n = int(batch["attention_mask"][i].sum())
    sl = slice(-n, None) if padding == "left" else slice(0, n)
    one = {k: batch[k][i : i + 1, sl] for k in ("input_ids", "attention_mask", "prompt_mask")}
    views = family_for(model).num_views(model.config, batch["image_sizes"][i].tolist())
    one["pixel_values"] = batch["pixel_values"][i : i + 1, :views]
    one["image_sizes"] = batch["image_sizes"][i : i + 1]
    return one


def decisions_from(model: PrunedVLM, out, batch) -> list[torch.Tensor]:
    """Inference-path kept patches (patch order) -> (B, T) keep masks in input coordinates."""
    merged = model.family.merge(
        model.llava, batch["input_ids"], batch["pixel_values"], model.structure, image_sizes=batch["image_sizes"]
    )
    vision = merged.vision & batch["attention_mask"].bool()
    result = []
    for kept in out.kept_patches:
        d = torch.zeros_like(vision)
        for b in range(vision.shape[0]):
            d[b, vision[b]] = kept[b, : int(vision[b].sum())]
        result.append(d)
    return result


# ------------------------------------------------------------------------------------------ family
def test_family_is_chosen_from_the_config(next_model):
    assert isinstance(family_for(next_model), LlavaNextFamily)
    assert isinstance(family_for(next_model.config), LlavaNextFamily)
    assert family_for({"model_type": "llava"}).name == "llava"
    with pytest.raises(ValueError, match=r"unsupported model family.*'bert'.*supported: llava \(Llava.*llava_next"):
        family_for({"model_type": "bert"})


def tiny_next_processor(pinpoints):
    """A LlavaNextProcessor for the tiny model: 16 px views, 4 px patches, the demo's word-level tokenizer."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from lightning_lvp.data.tokenizer import build_tiny_tokenizer

    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 16},
            crop_size={"height": 16, "width": 16},
            image_grid_pinpoints=pinpoints,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        tokenizer=build_tiny_tokenizer(),
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_layout_matches_the_processor_count_and_hf_packing(next_model):
    """Placeholder counts == LlavaNextProcessor's formula; newlines = one per grid row of the crops."""
    cfg = next_model.config
    processor = tiny_next_processor(cfg.image_grid_pinpoints)
    fam = family_for(next_model)
    for h, w in SIZES + [(40, 16), (20, 33)]:
        want = processor._get_number_of_features(h, w, 16, 16) - 1  # "default" drops CLS
        layout = fam.layouts(next_model, [(h, w)])[0]
        assert layout.shape[0] == want == fam.placeholder_count(next_model, (h, w))
        newline = layout[:, 0] == NEWLINE
        assert layout[:16].tolist() == [[0, t] for t in range(16)]  # base view first, raster order
        assert int(newline.sum()) > 0 and not bool(newline[:16].any())
        crops = layout[16:][~newline[16:]]
        assert set(crops[:, 0].tolist()) <= set(range(1, fam.num_views(cfg, (h, w))))


# ------------------------------------------------------------------------------- HF equivalence
@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_ratio_one_and_no_method_equal_hf_forward(next_model, padding):
    batch = make_batch(next_model, SIZES, padding=padding)
    mask = batch["attention_mask"]
    hf = next_model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        image_sizes=batch["image_sizes"],
        attention_mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0),
    ).logits
    for model, ratios in ((PrunedVLM(next_model, lvp()), [1.0, 1.0, 1.0]), (PrunedVLM(next_model, None), None)):
        out = model.forward_infer(**inputs(batch), ratios=ratios)
        logits = model.logits(out.hidden)
        for i in range(len(SIZES)):
            n = int(mask[i].sum())
            got = logits[i, -n:]  # real slots are right-aligned after the removal packing
            want = hf[i, -n:] if padding == "left" else hf[i, :n]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("options", [{}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beams"])
def test_unpruned_generation_equals_hf_generate(next_model, options):
    batch = make_batch(next_model, SIZES, padding="left")
    hf_in = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    opts = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **options)
    want = next_model.generate(**hf_in, **opts)
    got = PrunedVLM(next_model, None).for_generation().generate(**hf_in, **opts)
    assert got.shape[0] == 3 * options.get("num_return_sequences", 1) and torch.equal(got, want)


# -------------------------------------------------------------------------- pruned-path identities
@torch.no_grad()
@pytest.mark.parametrize("padding, structure", [("left", "keep"), ("right", "keep"), ("left", "prune")])
def test_masking_equals_removal(next_model, padding, structure):
    model = PrunedVLM(next_model, lvp(), structure=structure)
    batch = make_batch(next_model, SIZES, padding=padding, answer=3)
    infer = model.forward_infer(**inputs(batch))
    dec = decisions_from(model, infer, batch)
    train = model.forward_train(**inputs(batch), labels=batch["labels"], decisions=[d.float() for d in dec])
    infer = model.forward_infer(**inputs(batch), decisions=dec)
    li, ti, ri = model.label_logits(infer.hidden, infer.state, batch["labels"])
    assert ti.numel() == 3 * len(SIZES) and torch.equal(train.targets, ti) and torch.equal(train.sample_index, ri)
    torch.testing.assert_close(train.logits, li, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("structure", ["keep", "prune"])
def test_mixed_size_batch_equals_each_sample_alone(next_model, padding, structure):
    model = PrunedVLM(next_model, lvp(), structure=structure)
    batch = make_batch(next_model, SIZES, padding=padding)
    out = model.forward_infer(**inputs(batch))
    last = model.logits(out.hidden[:, -1])
    for i in range(len(SIZES)):
        alone = model.forward_infer(**single(next_model, batch, i, padding))
        torch.testing.assert_close(model.logits(alone.hidden[:, -1]), last[i : i + 1], atol=1e-5, rtol=1e-5)
        for a, b in zip(alone.kept_patches, out.kept_patches, strict=True):
            n = a.shape[1]
            assert torch.equal(a[0], b[i, :n]) and not bool(b[i, n:].any())


@torch.no_grad()
@pytest.mark.parametrize("structure", ["keep", "prune"])
def test_kept_counts_per_sample_and_original_positions(next_model, structure):
    model = PrunedVLM(next_model, lvp(), structure=structure)
    batch = make_batch(next_model, SIZES, padding="left")
    placeholders = (batch["input_ids"] == IMG).sum(1)
    newlines = torch.tensor([int((lay[:, 0] == NEWLINE).sum()) for lay in model.family.layouts(next_model, SIZES)])
    n = placeholders - newlines if structure == "keep" else placeholders
    out = model.forward_infer(**inputs(batch), ratios=[0.5, 0.3, 0.1], use_cache=True)
    assert out.state.n_vision.tolist() == n.tolist()
    for kept, rho in zip(out.kept_patches, [0.5, 0.3, 0.1], strict=True):
        assert kept.sum(1).tolist() == torch.floor(rho * n.double() + 0.5).long().tolist()  # each its own count
    st = out.state
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    assert torch.equal(st.position_ids[st.valid], positions.gather(1, st.orig_index)[st.valid])
    n_text = ((batch["input_ids"] != IMG) & batch["attention_mask"].bool()).sum(1)
    kept_structure = newlines if structure == "keep" else 0
    assert torch.equal(st.valid.sum(1), n_text + kept_structure + torch.floor(0.1 * n.double() + 0.5).long())
    if structure == "keep":  # every newline survives, at its original position
        ids_at = batch["input_ids"].gather(1, st.orig_index)
        assert torch.equal(((ids_at == IMG) & st.valid & ~st.vision).sum(1), newlines)


@torch.no_grad()
def test_cached_greedy_equals_recomputation(next_model):
    model = PrunedVLM(next_model, lvp())
    batch = make_batch(next_model, SIZES, padding="left")
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    cached = model.generate(**args, max_new_tokens=5, eos_token_id=-1)
    recomputed = model.generate(**args, max_new_tokens=5, eos_token_id=-1, use_cache=False)
    assert cached.shape == (3, 5) and torch.equal(cached, recomputed)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt = mask.bool() & (ids != IMG)
    for step in range(5):  # and == re-running forward_infer on the growing prefix
        out = model.forward_infer(ids, batch["pixel_values"], mask, prompt, image_sizes=batch["image_sizes"])
        nxt = model.logits(out.hidden[:, -1]).argmax(-1)
        assert torch.equal(nxt, cached[:, step]), f"step {step}"
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        prompt = torch.cat([prompt, torch.zeros_like(prompt[:, :1])], 1)


# --------------------------------------------------------------------------------- every method
METHODS = {
    "fastv": lambda: FastV(k=2, keep_ratio=0.25),
    "random": lambda: RandomPruning([1, 3], [0.5, 0.2]),
    "uniform": lambda: UniformPruning([1, 3], [0.5, 0.2]),
    "knee": lambda: ClsKneePruning(llm_layer=2, keep_ratio=0.5, min_keep=2),
    "knee_attention": lambda: ClsKneePruning(llm_layer=2, keep_ratio=0.5, relevance="attention"),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(METHODS))
def test_training_free_methods_run_and_generate(next_model, name):
    model = PrunedVLM(next_model, METHODS[name]())
    batch = make_batch(next_model, SIZES, padding="left")
    out = model.forward_infer(**inputs(batch))
    n = out.state.n_vision
    kept = out.kept_patches[-1].sum(1)
    assert bool((kept >= 1).all()) and bool((kept < n).all())
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    assert torch.equal(
        model.generate(**args, max_new_tokens=3, eos_token_id=-1),
        model.generate(**args, max_new_tokens=3, eos_token_id=-1, use_cache=False),
    )


def test_lvpruning_trains_on_next(next_model):
    """Masked training path: gradients reach every decision module, never the base."""
    model = PrunedVLM(next_model, lvp())
    model.train()
    batch = make_batch(next_model, SIZES, padding="right", answer=2)
    out = model.forward_train(**inputs(batch), labels=batch["labels"])
    (out.loss_causal + ((out.kept - torch.tensor([0.5, 0.3, 0.1])) ** 2).mean()).backward()
    for module in model.method.decision:
        assert sum(float(p.grad.abs().sum()) for p in module.parameters()) > 0
    assert all(p.grad is None for p in next_model.parameters())
    assert out.kept.shape == (3, 3) and bool((out.kept <= 1).all())


@torch.no_grad()
def test_cls_similarity_uses_each_views_own_cls(next_model):
    """CLS-knee stage 1 on NeXT: a token's similarity is to the CLS of the view it came from."""
    fam = family_for(next_model)
    batch = make_batch(next_model, SIZES[:2], padding="left")
    merged = fam.merge(next_model, batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])
    sims = fam.patch_cls_similarity(merged.features)
    views = [fam.num_views(next_model.config, s) for s in SIZES[:2]]
    flat = torch.cat([batch["pixel_values"][i, :v] for i, v in enumerate(views)])
    tower = next_model.model.vision_tower(flat, output_hidden_states=True).hidden_states[-1]  # (sum V, 17, Dv)
    offsets = [0, views[0]]
    for i, lay in enumerate(fam.layouts(next_model, SIZES[:2])):
        lay = lay[lay[:, 0] != NEWLINE]
        view = lay[:, 0]  # already global over the batch's views
        want = torch.nn.functional.cosine_similarity(tower[view, lay[:, 1] + 1], tower[view, 0], dim=-1)
        torch.testing.assert_close(sims[i, : lay.shape[0]], want, atol=1e-5, rtol=1e-5)
        assert int(view.min()) == offsets[i]  # the base view of image i


# ----------------------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_sample(next_model):
    model = PrunedVLM(next_model, lvp())
    batch = make_batch(next_model, SIZES, padding="left")
    wrong = dict(inputs(batch), image_sizes=torch.tensor([SIZES[0], SIZES[0], SIZES[2]]))  # sample 1 claims 52
    with pytest.raises(ValueError, match="sample 1 has 88 image tokens but its image gives 52 features"):
        model.forward_infer(**wrong)
    with pytest.raises(ValueError, match="leaves zero vision tokens for sample 2"):
        model.forward_infer(**inputs(batch), ratios=[0.5, 0.3, 0.015])  # round(0.015 x 32) = 0; 48 -> 1
    with pytest.raises(ValueError, match="needs image_sizes"):
        model.forward_infer(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    with pytest.raises(ValueError, match="structure must be"):
        PrunedVLM(next_model, None, structure="drop")
    with pytest.raises(ValueError, match=r"take no image input \['image_grid_thw'\]"):
        model.forward_infer(**inputs(batch), image_grid_thw=torch.ones(3, 3))


def test_old_name_is_the_same_class():
    assert PrunedLlava is PrunedVLM


def test_pruners_of_one_family_refuse_to_load_on_another(next_model, tmp_path):
    """pruners.json stores the family; same LLM dims, other family: a clear error (also via from_pretrained)."""
    import json

    from lightning_lvp.io import load_pruners, save_pruners
    from lightning_lvp.tiny import build_tiny_llava

    model = PrunedVLM(next_model, lvp())
    save_pruners(model.method, tmp_path / "pruners")
    assert json.loads((tmp_path / "pruners" / "pruners.json").read_text())["family"] == "llava_next"
    again = load_pruners(tmp_path / "pruners", model.dims, family="llava_next")
    assert again.family == "llava_next"
    with pytest.raises(ValueError, match="trained on a 'llava_next' model, but this model is a 'llava' model"):
        load_pruners(tmp_path / "pruners", model.dims, family="llava")
    build_tiny_llava(SPEC, seed=0).save_pretrained(tmp_path / "llava15")  # same hidden size and depth
    with pytest.raises(ValueError, match="pruners do not transfer between model families"):
        PrunedVLM.from_pretrained(str(tmp_path / "llava15"), str(tmp_path / "pruners"))
    with pytest.raises(ValueError, match="trained on a 'llava_next' model"):
        PrunedVLM(build_tiny_llava(SPEC, seed=0), again)


def test_shipped_next_7b_config_flops_at_672_px():
    """llava-v1.6-vicuna-7b on the meta device: 5 views, 2,880 vision + 48 newline tokens; LLM = the formula."""
    from lightning_lvp import flops

    cfg = flops.resolve_model_config("llava-hf/llava-v1.6-vicuna-7b-hf")
    assert family_for(cfg).name == "llava_next"
    batch = family_for(cfg).dummy_batch(cfg, text_tokens=30)
    assert batch["input_ids"].shape == (1, 1 + 2928 + 29) and batch["pixel_values"].shape == (1, 5, 3, 336, 336)
    spec = {"class_path": "lightning_lvp.methods.simple.UniformPruning", "init_args": {}}
    rows = flops.count_config(cfg, spec, [[0.5, 0.3, 0.1]])
    base, pruned = rows
    assert pruned["kept_vision"] == [1440.0, 864.0, 288.0]  # round(rho x 2,880): newlines are not counted
    d, m, t = 4096, 11008, 2928 + 30
    assert base["by_component"]["llm"] * 1e12 == pytest.approx(32 * flops.llm_layer_flops(t, d, m), rel=1e-9)
    one_view = flops.count_config(flops.resolve_model_config("llava-hf/llava-1.5-7b-hf"), None, [])[0]
    assert base["by_component"]["vision_tower"] == pytest.approx(5 * one_view["by_component"]["vision_tower"])
    assert 44.0 < base["tflops"] < 46.0 and pruned["tflops"] < 0.4 * base["tflops"]


def test_llava_format_data_with_the_next_processor(tmp_path):
    """LLaVA-format JSON -> LlavaDataset with NeXT's processor: tokens == the processor's own expansion of the
    rendered prompt, views / sizes == its image output; the collated mixed-size batch trains and equals HF."""
    from PIL import Image

    from lightning_lvp.data.collate import LlavaCollator
    from lightning_lvp.data.conversation import VICUNA_V1, render_conversation
    from lightning_lvp.data.llava_dataset import LlavaDataset
    from lightning_lvp.eval.teacher_forced import model_inputs

    processor = tiny_next_processor([[16, 32], [32, 16], [32, 32]])
    tok = processor.tokenizer
    g = torch.Generator().manual_seed(0)
    entries = []
    for i, (w, h) in enumerate([(40, 16), (30, 30)]):  # PIL sizes are (width, height)
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"im{i}.png")
        turns = [{"from": "human", "value": "<image>\nwhat digit is in row 2"}, {"from": "gpt", "value": str(i)}]
        entries.append({"id": f"e{i}", "image": f"im{i}.png", "conversations": turns})
    ds = LlavaDataset(entries, [str(tmp_path)], processor, pad_to_square=True)
    samples = [ds[i] for i in range(2)]
    for entry, sample in zip(entries, samples, strict=True):
        image = Image.open(tmp_path / entry["image"]).convert("RGB")
        rendered = render_conversation(entry["conversations"], VICUNA_V1)
        want = processor(text=rendered.text, images=image, return_tensors="pt")
        assert torch.equal(sample["input_ids"], want["input_ids"][0])  # token-exact, image block included
        assert torch.equal(sample["pixel_values"], want["pixel_values"][0])
        assert sample["image_size"].tolist() == want["image_sizes"][0].tolist() == [image.height, image.width]
        supervised = tok.decode(sample["input_ids"][sample["labels"] != -100])
        assert supervised.replace(" ", "") == f"{entry['id'][1]}</s>"  # the reply and its </s> only
    batch = LlavaCollator(tok.pad_token_id, "left")(samples)
    assert batch["pixel_values"].shape[:2] == (2, 5) and batch["image_sizes"].tolist() == [[16, 40], [30, 30]]
    spec = TinyLlavaSpec(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=0)
    base = build_tiny_llava_next(spec, seed=1, grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    model = PrunedVLM(base, lvp())
    out = model.forward_train(**model_inputs(batch), labels=batch["labels"])
    assert torch.isfinite(out.loss_causal) and out.targets.numel() == 4  # digit + </s> per sample
    with torch.no_grad():
        ours = model.logits(model.forward_infer(**model_inputs(batch), ratios=[1.0, 1.0, 1.0]).hidden)
        mask = batch["attention_mask"]
        hf = base(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"],
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        ).logits
    for i in range(2):
        n = int(mask[i].sum())
        torch.testing.assert_close(ours[i, -n:], hf[i, -n:], atol=1e-5, rtol=1e-5)


def test_shipped_next_config_trains_a_tiny_32_layer_next(next_model, tmp_path):
    """experiments/llava_next_rho05.yaml: the paper's schedule on NeXT; its module loads a NeXT folder and trains."""
    from pathlib import Path

    from lightning_lvp.cli import parse_config
    from lightning_lvp.io import instantiate
    from lightning_lvp.training.module import LVPModule

    path = Path(__file__).resolve().parents[1] / "experiments" / "llava_next_rho05.yaml"
    cfg = parse_config(["-c", str(path)])
    margs = cfg.model.init_args
    assert margs.model_path == "llava-hf/llava-v1.6-vicuna-7b-hf" == cfg.data.init_args.processor_path
    method = instantiate({"class_path": margs.method.class_path, "init_args": margs.method.init_args.as_dict()})
    assert method.after_layers == [1, 8, 16] and method.train_ratios == [0.5, 0.3, 0.1]
    assert margs.optimizer.init_args.lr == 2e-6 and margs.warmup_ratio == 0.03 and margs.lr_schedule == "cosine"
    micro = cfg.data.init_args.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices
    assert micro == 64 and cfg.trainer.strategy.init_args.logging_batch_size_per_gpu == cfg.data.init_args.batch_size
    build_tiny_llava_next(TinyLlavaSpec(num_layers=32), seed=0).save_pretrained(tmp_path)
    module = LVPModule(model_path=str(tmp_path), method=method, dtype="float32", optimizer=torch.optim.AdamW)
    module.configure_model()
    assert module.model.family.name == "llava_next"
    batch = make_batch(module.model.llava, SIZES[:2], padding="right", answer=2)
    out = module.model.forward_train(**inputs(batch), labels=batch["labels"])
    out.loss_causal.backward()
    assert all(p.grad is not None for p in module.method.parameters())


def _write_tiny_next_folder(out, n_layers: int = 32) -> None:
    """A tiny NeXT model folder (weights + NeXT processor) and 8 LLaVA-format entries of 4 image sizes."""
    import json

    from PIL import Image

    pins = [[16, 32], [32, 16], [32, 32]]
    proc = tiny_next_processor(pins)
    tok = proc.tokenizer
    spec = TinyLlavaSpec(
        num_layers=n_layers,
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    model = build_tiny_llava_next(spec, seed=0, grid_pinpoints=pins)
    model.config.text_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out / "model")
    proc.save_pretrained(out / "model")
    g = torch.Generator().manual_seed(0)
    (out / "images").mkdir()
    entries = []
    for i, (w, h) in enumerate([(40, 16), (30, 30), (16, 16), (20, 33)] * 2):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(out / "images" / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nwhat digit is in row 2"}, {"from": "gpt", "value": str(i)}]
        entries.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    (out / "data.json").write_text(json.dumps(entries))


@pytest.mark.slow
def test_fit_with_the_shipped_next_config_end_to_end(tmp_path):
    """`python -m lightning_lvp fit -c experiments/llava_next_rho05.yaml`, shrunk by flags, on a tiny NeXT folder:
    trains 2 steps on mixed image sizes, runs the validation ratio sweep, writes a checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    _write_tiny_next_folder(tmp_path)
    flags = [
        f"--model.init_args.model_path={tmp_path / 'model'}",
        "--model.init_args.dtype=float32",
        f"--data.init_args.train_json={tmp_path / 'data.json'}",
        f"--data.init_args.image_folder={tmp_path / 'images'}",
        "--data.init_args.val_fraction=0.25",
        "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32",
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=1",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    cmd = [sys.executable, "-m", "lightning_lvp", "fit", "-c", str(repo / "experiments" / "llava_next_rho05.yaml")]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + flags, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ratio sweep" in proc.stdout and "rho0.5" in proc.stdout
    assert list((tmp_path / "run").rglob("*.ckpt")) or list((tmp_path / "runs").rglob("*.ckpt"))


def test_structure_policy_is_per_family():
    """LLaVA-1.5 has no non-patch image tokens: only "keep"; NeXT takes both."""
    from lightning_lvp.tiny import build_tiny_llava

    with pytest.raises(ValueError, match=r"structure must be one of \['keep'\] for a llava model"):
        PrunedVLM(build_tiny_llava(SPEC, seed=0), None, structure="prune")
    assert LlavaNextFamily.structure_policies == ("keep", "prune")
