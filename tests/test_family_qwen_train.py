"""Qwen2.5-VL through the data pipeline and LVPModule: LLaVA-format JSON -> Qwen batches (ChatML, Qwen's
fine-tuning labels, flat patches + image_grid_thw), token-exact against the template + image processor;
training steps on a tiny Qwen folder; the shipped experiments/qwen2_5_vl_rho05.yaml; bad input.

The tiny folder is what a hub checkpoint holds (config + weights, tokenizer with the chat template,
preprocessor_config.json); ``Qwen2_5_VLProcessor`` itself is never built (it needs torchvision).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from qwen_fixtures import tiny_qwen_folder, write_images

from lightning_lvp.data.conversation import IGNORE_INDEX
from lightning_lvp.data.datamodule import LlavaDataModule
from lightning_lvp.data.llava_dataset import BadSampleError, LlavaDataset
from lightning_lvp.data.processors import load_processor
from lightning_lvp.data.qwen_chat import IMAGE_PAD, QwenProcessor
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.methods import LVPruning

REPO = Path(__file__).resolve().parents[1]
SIZES = [(40, 24), (64, 48), (24, 40), (56, 56)]  # (width, height): 24 / 48 / 24 / 49 tokens at min_pixels 1024
TURNS = [
    [{"from": "human", "value": "<image>\nWhat is in the picture ?"}, {"from": "gpt", "value": "a cat 0"}],
    [
        {"from": "human", "value": "What colour is it ?\n<image>"},
        {"from": "gpt", "value": "black"},
        {"from": "human", "value": "What digit is in row 2 ?"},
        {"from": "gpt", "value": "7"},
    ],
    [{"from": "human", "value": "<image>\nWhat is it ?"}, {"from": "gpt", "value": "a mat on a cat"}],
    [{"from": "human", "value": "<image>\nWhat digit is in row 1 ?"}, {"from": "gpt", "value": "3"}],
]


def lvp(**kw) -> LVPruning:
    torch.manual_seed(0)
    args = dict(after_layers=[1, 2, 3], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=4)
    return LVPruning(**{**args, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny 4-layer Qwen folder, 4 images of different sizes and their LLaVA-format JSON."""
    root = tmp_path_factory.mktemp("qwen")
    tiny_qwen_folder(root / "model")
    (root / "images").mkdir()
    names = write_images(root / "images", SIZES)
    entries = [{"id": f"e{i}", "image": n, "conversations": t} for i, (n, t) in enumerate(zip(names, TURNS))]
    (root / "data.json").write_text(json.dumps(entries))
    return root


def datamodule(root: Path, **kw) -> LlavaDataModule:
    args = dict(
        processor_path=str(root / "model"),
        dataset="llava",
        train_json=str(root / "data.json"),
        val_json=str(root / "data.json"),
        image_folder=str(root / "images"),
        batch_size=4,
        num_workers=0,
        min_pixels=1024,  # >= 16 px x 64 px: every image gets >= 16 tokens (4 px patches, 2 x 2 merge)
    )
    dm = LlavaDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------ references
def chat_messages(turns: list[dict]) -> list[dict]:
    """LLaVA turns as HF chat messages, the image part first in its user turn."""
    out = []
    for t in turns:
        parts = [{"type": "image"}] * t["value"].count("<image>")
        parts.append({"type": "text", "text": t["value"].replace("<image>", "").strip()})
        out.append({"role": "user" if t["from"] == "human" else "assistant", "content": parts})
    return out


def processor_ids(tok, text: str, grid: torch.Tensor) -> list[int]:
    """``Qwen2_5_VLProcessor.__call__``'s text side: each <|image_pad|> -> t h w / 4 copies, then tokenize."""
    parts = text.split(IMAGE_PAD)
    counts = (grid.prod(-1) // 4).tolist()
    text = parts[0] + "".join(IMAGE_PAD * n + p for n, p in zip(counts, parts[1:], strict=True))
    return tok(text, add_special_tokens=False)["input_ids"]


def qwen_finetune_labels(tok, ids: list[int]) -> list[int]:
    """Labels as QwenLM/Qwen2.5-VL ``qwen-vl-finetune/qwenvl/data/data_qwen.py`` (``preprocess_qwen_2_visual``)
    builds them: message by message, -100 for system and user messages, an assistant message's tokens with
    its first 3 (``<|im_start|>assistant\\n``) set to -100."""
    start, assistant = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("assistant")
    cuts = [i for i, t in enumerate(ids) if t == start] + [len(ids)]
    labels = []
    for a, b in zip(cuts, cuts[1:]):
        message = ids[a:b]
        if message[1] == assistant:
            labels += [IGNORE_INDEX] * 3 + message[3:]
        else:
            labels += [IGNORE_INDEX] * len(message)
    return labels


def test_processor_loads_from_the_folder_without_torchvision(folder):
    """The family comes from config.json; tokenizer + Qwen2VLImageProcessorPil from the folder's files; the
    pixel bounds are configurable, and refused for a model whose processor has fixed sizes."""
    processor = load_processor(folder / "model")
    assert isinstance(processor, QwenProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert (
        processor.image_processor.size["shortest_edge"] == 64 and processor.image_processor.size["longest_edge"] == 4096
    )
    bounded = load_processor(folder / "model", min_pixels=1024, max_pixels=2048)
    assert (bounded.image_processor.size["shortest_edge"], bounded.image_processor.size["longest_edge"]) == (1024, 2048)
    image = Image.open(folder / "images" / "im1.png")  # 64 x 48 px: 48 tokens by default, fewer under 2,048 px
    assert int(processor.image_processor(images=[image])["image_grid_thw"].prod()) == 192
    assert int(bounded.image_processor(images=[image])["image_grid_thw"].prod()) < 192
    with pytest.raises(ValueError, match="min_pixels 4096 > max_pixels 1024"):
        load_processor(folder / "model", min_pixels=4096, max_pixels=1024)
    from lightning_lvp.data.tokenizer import save_tiny_processor
    from lightning_lvp.tiny import build_tiny_llava

    build_tiny_llava().save_pretrained(folder / "llava")
    save_tiny_processor(folder / "llava", 16, 4)
    with pytest.raises(ValueError, match="Qwen2.5-VL's image bounds; the model at .* is 'llava'"):
        load_processor(folder / "llava", max_pixels=2048)


def test_datamodule_batch_equals_the_qwen_template_and_image_processor(folder):
    """Token-exact: input_ids == apply_chat_template + the processor's <|image_pad|> expansion; labels == Qwen's
    fine-tuning labels; pixel_values / image_grid_thw == the image processor's, concatenated in sample order;
    prompt-only batches end at the generation prompt, left-padded."""
    dm = datamodule(folder)
    batch = next(iter(dm.val_dataloader()))
    proc = dm.load_processor()
    tok, ip = proc.tokenizer, proc.image_processor
    pixels, grids = [], []
    for i, turns in enumerate(TURNS):
        image = Image.open(folder / "images" / f"im{i}.png").convert("RGB")
        want = ip(images=[image], return_tensors="pt")
        pixels.append(want["pixel_values"])
        grids.append(want["image_grid_thw"])
        ids = processor_ids(tok, tok.apply_chat_template(chat_messages(turns), tokenize=False), want["image_grid_thw"])
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids and (batch["attention_mask"][i, n:] == 0).all()
        assert batch["labels"][i, :n].tolist() == qwen_finetune_labels(tok, ids)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        image_id = tok.convert_tokens_to_ids(IMAGE_PAD)
        assert torch.equal(batch["vision_mask"][i, :n], torch.tensor(ids) == image_id)
        assert int(batch["vision_mask"][i].sum()) == int(want["image_grid_thw"].prod()) // 4
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))
    assert torch.equal(batch["image_grid_thw"], torch.cat(grids))
    assert (batch["image_grid_thw"].prod(-1) // 4).tolist() == [24, 48, 24, 49]
    assert batch["answers"] == ["a cat 0", "7", "a mat on a cat", "3"] and batch["ids"] == ["e0", "e1", "e2", "e3"]
    # prompt-only: ends at <|im_start|>assistant\n of the last turn, left-padded, no labels
    prompt = next(iter(dm.predict_dataloader()))
    assert "labels" not in prompt
    for i, turns in enumerate(TURNS):
        text = tok.apply_chat_template(chat_messages(turns[:-1]), tokenize=False, add_generation_prompt=True)
        ids = processor_ids(tok, text, grids[i])
        assert prompt["input_ids"][i, -len(ids) :].tolist() == ids
        assert int(prompt["attention_mask"][i].sum()) == len(ids)


@torch.no_grad()
def test_datamodule_batch_feeds_the_model_like_hf(folder):
    """All ratios 1 on the collated (left-padded) batch == HF's own Qwen2.5-VL forward, sample by sample."""
    from lightning_lvp import adapter
    from lightning_lvp.model import PrunedVLM

    batch = next(iter(datamodule(folder, padding_side="left").val_dataloader()))
    base = adapter.load_llava(str(folder / "model"))
    model = PrunedVLM(base, lvp())
    ours = model.logits(model.forward_infer(**model_inputs(batch), ratios=[1.0, 1.0, 1.0]).hidden)
    image_id = base.config.image_token_id
    hf = base(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=(batch["input_ids"] == image_id).int(),
    ).logits
    assert (batch["attention_mask"] == 0).any()  # padding is really exercised
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        torch.testing.assert_close(ours[i, -n:], hf[i, -n:], atol=1e-5, rtol=1e-5)


def test_lvp_module_trains_on_a_tiny_qwen(folder):
    """LVPModule on the Qwen folder: masked training steps on datamodule batches (M-RoPE positions), loss finite,
    gradients on the decision modules only, the base frozen; validation through the removal path."""
    from lightning_lvp.training.module import LVPModule

    dm = datamodule(folder, batch_size=2)
    module = LVPModule(model_path=str(folder / "model"), method=lvp(), optimizer=torch.optim.AdamW)
    module.configure_model()
    assert module.model.family.name == "qwen2_5_vl"
    base_before = {k: v.clone() for k, v in module.model.llava.state_dict().items()}
    pruner_before = {k: v.clone() for k, v in module.method.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in module.method.parameters() if p.requires_grad], lr=1e-2)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)  # no trainer: record instead
    for step, batch in zip(range(2), dm.train_dataloader()):
        loss = module.training_step(batch, step)
        assert torch.isfinite(loss) and torch.isfinite(torch.tensor(module.last_step_values["loss_causal"]))
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in module.method.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in module.model.llava.parameters())
        optimizer.step()
    assert all(torch.equal(v, base_before[k]) for k, v in module.model.llava.state_dict().items())
    assert any(not torch.equal(v, pruner_before[k]) for k, v in module.method.state_dict().items())
    assert torch.isfinite(torch.as_tensor(logged["train/loss"]))
    logged.clear()
    with torch.no_grad():
        module.validation_step(next(iter(dm.val_dataloader())), 0)
    assert 0.0 <= float(logged["val/acc"]) <= 1.0 and torch.isfinite(torch.as_tensor(logged["val/loss"]))
    assert set(logged) >= {"val/kept_ratio/layer1", "val/kept_ratio/layer3", "val/loss_ratio"}
    answers = module.predict_step(next(iter(dm.predict_dataloader())), 0)  # cached generation, left-padded prompts
    assert answers.shape[0] == 2 and 1 <= answers.shape[1] <= 16


def test_bad_input_on_the_qwen_path_names_the_entry(folder, tmp_path):
    """Placeholders != images (a literal <|image_pad|> in the text), two images in one sample, a ratio that
    leaves a small image no token, a grid that does not match the tokens: each error names the entry."""
    from lightning_lvp.data.collate import LlavaCollator
    from lightning_lvp.data.llava_dataset import Skipped, filter_entries
    from lightning_lvp.training.module import LVPModule

    proc = load_processor(folder / "model")
    images = [str(folder / "images")]
    turns = [{"from": "human", "value": f"<image>\nWhat is {IMAGE_PAD} ?"}, {"from": "gpt", "value": "a cat"}]
    bad = {"id": "pad-in-text", "image": "im0.png", "conversations": turns}
    with pytest.raises(
        BadSampleError, match=r"entry 'pad-in-text': image_token_mismatch: .*2 <\|image_pad\|> but 1 images"
    ):
        LlavaDataset([bad], images, proc)[0]
    assert LlavaDataset([bad], images, proc, policy="skip")[0] == Skipped(
        "pad-in-text", "image_token_mismatch", str(folder / "images" / "im0.png")
    )
    two_turns = [{"from": "human", "value": "<image> <image> What is it ?"}, {"from": "gpt", "value": "a cat"}]
    two = {"id": "two-images", "image": "im0.png", "conversations": two_turns}
    with pytest.raises(BadSampleError, match=r"id 'two-images'\): multiple_image_tokens"):
        filter_entries([two], "data.json")
    # a 16 x 8 px image is 2 tokens at the folder's min_pixels (64): rho 0.3 keeps round(0.6) = 1, 0.05 none
    Image.new("RGB", (16, 8), (200, 10, 10)).save(tmp_path / "small.png")
    ok = {"id": "big", "image": str(folder / "images" / "im1.png"), "conversations": TURNS[0]}
    small = {"id": "small", "image": str(tmp_path / "small.png"), "conversations": TURNS[0]}
    samples = [LlavaDataset([e], ["/"], proc)[0] for e in (ok, small)]
    assert [int(s["vision_mask"].sum()) for s in samples] == [48, 2]
    batch = LlavaCollator(proc.tokenizer.pad_token_id)(samples)
    module = LVPModule(
        model_path=str(folder / "model"), method=lvp(), optimizer=torch.optim.AdamW, val_ratios=[0.5, 0.3, 0.05]
    )
    module.configure_model()
    module.log = lambda *a, **k: None
    with pytest.raises(
        ValueError, match=r"zero vision tokens for sample 1 .*\[sample 1 of this batch is entry 'small'\]"
    ):
        module.validation_step(batch, 0)
    grid = batch["image_grid_thw"].clone()
    grid[0] = torch.tensor([1, 8, 8])  # image 0 now gives 16 tokens (with image 1: 18) for sample 0's 48
    wrong = {**batch, "image_grid_thw": grid, "pixel_values": batch["pixel_values"][: int(grid.prod(-1).sum())]}
    with pytest.raises(ValueError, match=r"sample 0 has 48 image tokens .*\[sample 0 of this batch is entry 'big'\]"):
        module.training_step(wrong, 0)


def test_shipped_qwen_config_trains_a_tiny_28_layer_qwen(folder, tmp_path):
    """experiments/qwen2_5_vl_rho05.yaml: the paper's schedule on Qwen2.5-VL-7B's architecture (28 layers, the
    shipped hub config); its module and data module load a tiny 28-layer Qwen folder and train one step."""
    from lightning_lvp import adapter, flops
    from lightning_lvp.cli import parse_config
    from lightning_lvp.io import instantiate
    from lightning_lvp.training.module import LVPModule

    cfg = parse_config(["-c", str(REPO / "experiments" / "qwen2_5_vl_rho05.yaml")])
    margs, dargs = cfg.model.init_args, cfg.data.init_args
    assert margs.model_path == "Qwen/Qwen2.5-VL-7B-Instruct" == dargs.processor_path
    seven_b = flops.resolve_model_config(margs.model_path)  # lightning_lvp/configs/qwen2.5-vl-7b-instruct.json
    assert adapter.family_for(seven_b).name == "qwen2_5_vl" and seven_b.text_config.num_hidden_layers == 28
    described = flops.describe_input(seven_b)  # what `flops -c` on this config prints as its input
    assert described.startswith("1 image of 1024 x 768 px (resized to 1036 x 756 px, 74 x 54 patches: 999 vision")
    spec = {"class_path": margs.method.class_path, "init_args": margs.method.init_args.as_dict()}
    method = instantiate(spec)
    assert method.after_layers == [1, 8, 16] and method.train_ratios == [0.5, 0.3, 0.1] == method.keep_ratios
    method.bind(adapter.text_dims(seven_b))  # the 7B's hidden size and depth
    assert margs.optimizer.init_args.lr == 2e-6 and margs.optimizer.init_args.weight_decay == 0.0
    assert margs.warmup_ratio == 0.03 and margs.lr_schedule == "cosine" and cfg.trainer.max_epochs == 1
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.precision == "bf16-mixed"
    micro = dargs.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices
    assert micro == 64 and cfg.trainer.strategy.init_args.logging_batch_size_per_gpu == dargs.batch_size
    assert (dargs.min_pixels, dargs.max_pixels) == (12544, 802816)  # >= 16 and <= 1,024 tokens per image
    tiny_qwen_folder(tmp_path / "model", num_layers=28)
    module = LVPModule(model_path=str(tmp_path / "model"), method=instantiate(spec), optimizer=torch.optim.AdamW)
    module.configure_model()
    assert module.model.family.name == "qwen2_5_vl" and module.model.dims.num_layers == 28
    data = {k: v for k, v in dargs.as_dict().items() if k in ("dataset", "bad_samples", "max_length")}
    dm = datamodule(folder, **data, processor_path=str(tmp_path / "model"), batch_size=1)
    module.log = lambda *a, **k: None
    loss = module.training_step(next(iter(dm.train_dataloader())), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.method.parameters() if p.requires_grad)


@pytest.mark.slow
def test_fit_with_the_shipped_qwen_config_end_to_end(folder, tmp_path):
    """`python -m lightning_lvp fit -c experiments/qwen2_5_vl_rho05.yaml`, shrunk by flags, on a tiny 28-layer Qwen
    folder: trains 2 steps on images of 4 sizes, runs the validation ratio sweep, writes a checkpoint."""
    import os
    import subprocess
    import sys

    tiny_qwen_folder(tmp_path / "model", num_layers=28)
    flags = [
        f"--model.init_args.model_path={tmp_path / 'model'}",
        "--model.init_args.dtype=float32",
        f"--data.init_args.train_json={folder / 'data.json'}",
        f"--data.init_args.image_folder={folder / 'images'}",
        "--data.init_args.val_fraction=0.5",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        "--data.init_args.min_pixels=1024",  # the tiny model's 8 px merge unit: >= 16 tokens
        "--data.init_args.max_pixels=4096",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32",
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=1",
        "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    cmd = [sys.executable, "-m", "lightning_lvp", "fit", "-c", str(REPO / "experiments" / "qwen2_5_vl_rho05.yaml")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + flags, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ratio sweep" in proc.stdout and "rho0.5" in proc.stdout
    assert list((tmp_path / "run").rglob("*.ckpt")) or list((tmp_path / "runs").rglob("*.ckpt"))


@torch.no_grad()
def test_several_images_in_one_sample(folder, tmp_path):
    """Qwen2.5-VL takes several images per sample: ``"image": [a, b]`` with one <image> each, in order. The
    sample is token-exact (one vision block per image), its patches and grid rows are both images'; a batch
    mixing it with a one-image sample equals HF's forward. A count mismatch is refused at setup, naming it."""
    from lightning_lvp import adapter
    from lightning_lvp.data.collate import LlavaCollator
    from lightning_lvp.data.llava_dataset import filter_entries
    from lightning_lvp.model import PrunedVLM

    proc = load_processor(folder / "model", min_pixels=1024)
    tok, ip = proc.tokenizer, proc.image_processor
    turns = [{"from": "human", "value": "<image>\n<image>\nWhat is it ?"}, {"from": "gpt", "value": "a cat"}]
    two = {"id": "two", "image": ["im0.png", "im2.png"], "conversations": turns}
    one = {"id": "one", "image": "im1.png", "conversations": TURNS[0]}
    kept, _ = filter_entries([two, one], "data.json", max_images=None)
    assert [e["id"] for e in kept] == ["two", "one"]
    with pytest.raises(BadSampleError, match=r"id 'two'\): bad_image_field"):
        filter_entries([two], "data.json")  # LLaVA-1.5 / NeXT: one image path per sample
    mismatch = {**two, "image": ["im0.png", "im1.png", "im2.png"]}
    with pytest.raises(BadSampleError, match=r"id 'two'\): image_count_mismatch"):
        filter_entries([mismatch], "data.json", max_images=None)
    (tmp_path / "two.json").write_text(json.dumps([two, one]))
    dm = datamodule(folder, train_json=str(tmp_path / "two.json"), val_json=str(tmp_path / "two.json"))
    ds = dm.val_set  # the data module lets Qwen2.5-VL entries have several images
    assert len(ds) == 2 and dm.filter_reports[0].kept == 2
    sample = ds[0]
    pictures = [Image.open(folder / "images" / n).convert("RGB") for n in two["image"]]
    want = ip(images=pictures, return_tensors="pt")
    ids = processor_ids(tok, tok.apply_chat_template(chat_messages(turns), tokenize=False), want["image_grid_thw"])
    assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == qwen_finetune_labels(tok, ids)
    assert torch.equal(sample["pixel_values"], want["pixel_values"])
    assert sample["image_grid_thw"].tolist() == want["image_grid_thw"].tolist() == [[1, 8, 12], [1, 12, 8]]
    assert int(sample["vision_mask"].sum()) == 48 and sample["image"] == "im0.png,im2.png"
    batch = LlavaCollator(tok.pad_token_id, "left")([sample, ds[1]])
    assert batch["image_grid_thw"].shape == (3, 3)
    base = adapter.load_llava(str(folder / "model"))
    model = PrunedVLM(base, lvp())
    ours = model.logits(model.forward_infer(**model_inputs(batch), ratios=[1.0, 1.0, 1.0]).hidden)
    hf = base(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=(batch["input_ids"] == base.config.image_token_id).int(),
    ).logits
    for i in range(2):
        n = int(batch["attention_mask"][i].sum())
        torch.testing.assert_close(ours[i, -n:], hf[i, -n:], atol=1e-5, rtol=1e-5)
    out = model.forward_infer(**model_inputs(batch))  # kept counts: fractions of each sample's own pool
    assert [k.sum(1).tolist() for k in out.kept_patches] == [[24, 24], [14, 14], [5, 5]]
