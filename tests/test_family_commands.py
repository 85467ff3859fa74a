"""Sweep, compare, evaluate and the lmms-eval plugin on LLaVA-NeXT and Qwen2.5-VL (#14 item 6, last sentence).

LLaVA-NeXT runs every command end to end from an experiment YAML on a tiny model folder saved with its
processor (LLaVA-format data of 4 image sizes: 4 different vision-token counts). Each test checks one thing
against an independent computation: kept counts per sample = round(rho x n_b) of each sample's own count
(both newline policies, chosen in the YAML), unpruned answers == HF ``generate()`` on the processor's own
inputs, mixed-size batches == one sample at a time, the plugin == the evaluate command's generator.
Qwen2.5-VL: the model-level paths of sweep / compare / FLOPs on hand-built batches (tests/qwen_fixtures.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_family_next import _write_tiny_next_folder, tiny_next_processor  # noqa: F401 (the NeXT folder)

from lightning_lvp.cli import main
from lightning_lvp.families.llava_next import NEWLINE, LlavaNextFamily
from lightning_lvp.io import save_pruners
from lightning_lvp.methods import LVPruning
from lightning_lvp.model import PrunedVLM

RATIOS = [0.5, 0.3, 0.1]


def _experiment_yaml(root, batch_size: int, data_extra: str = "") -> str:
    """The experiment YAML of the tiny folders under ``root`` (model/, data.json, images/)."""
    return f"""
model:
  class_path: lightning_lvp.training.module.LVPModule
  init_args:
    model_path: {root / "model"}
    method:
      class_path: lightning_lvp.methods.LVPruning
      init_args: {{after_layers: [1, 2, 3], train_ratios: {RATIOS}, keep_ratios: {RATIOS}, num_heads: 4}}
data:
  class_path: lightning_lvp.data.datamodule.LlavaDataModule
  init_args:
    dataset: llava
    train_json: {root / "data.json"}
    val_json: {root / "data.json"}
    image_folder: {root / "images"}
    batch_size: {batch_size}
    val_batch_size: {batch_size}
    num_workers: 0
{data_extra}"""


# (width, height) of the 8 images _write_tiny_next_folder writes, in entry order
PIL_SIZES = [(40, 16), (30, 30), (16, 16), (20, 33)] * 2


def lvp(after=(1, 2, 3)) -> LVPruning:
    torch.manual_seed(0)
    return LVPruning(after_layers=list(after), keep_ratios=RATIOS, train_ratios=RATIOS, num_heads=4)


def vision_counts(config, structure: str) -> list[int]:
    """Each entry's own vision-token count: patches (+ its image_newline tokens under "prune")."""
    counts = []
    for w, h in PIL_SIZES:
        layout = LlavaNextFamily().layouts(config, [(h, w)])[0]
        counts.append(int(layout.shape[0] if structure == "prune" else (layout[:, 0] != NEWLINE).sum()))
    return counts


def expected_kept(counts: list[int], ratios=RATIOS) -> list[float]:
    """Mean over samples of round(r x n_b) per stage (ratios are fractions of EACH sample's count)."""
    return [sum(keep_count(r, n) for n in counts) / len(counts) for r in ratios]


def keep_count(r: float, n: int) -> int:
    """round(r x n), halves up (the project's rounding: ``flops.tokens_per_layer``, ``keep_counts``)."""
    return math.floor(r * n + 0.5)


@pytest.fixture(scope="module")
def next_setup(tmp_path_factory):
    """A 4-layer tiny NeXT folder (weights + processor), pruners after layers 1, 2, 3 and an experiment YAML."""
    root = tmp_path_factory.mktemp("next_cmd")
    _write_tiny_next_folder(root, n_layers=4)
    model = PrunedVLM.from_pretrained(str(root / "model"))
    method = lvp()
    PrunedVLM(model.llava, method)  # binds the modules to the model's dims and records the family
    save_pruners(method, root / "pruners")
    cfg = _experiment_yaml(root, batch_size=8)
    (root / "cfg.yaml").write_text(cfg)
    (root / "cfg_prune.yaml").write_text(cfg.replace("    model_path:", "    structure: prune\n    model_path:"))
    return SimpleNamespace(root=root, config=model.llava.config)


# ------------------------------------------------------------------------------------------- sweep
@pytest.mark.parametrize("structure", ["keep", "prune"])
def test_sweep_on_next_keeps_each_samples_own_share(next_setup, tmp_path, structure):
    """`sweep -c CONFIG` on NeXT: 8 samples of 4 image sizes; the mean kept tokens per stage are the mean of
    round(rho x n_b) over the samples' own counts, under the newline policy the YAML sets."""
    root = next_setup.root
    cfg = root / ("cfg.yaml" if structure == "keep" else "cfg_prune.yaml")
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "-c",
        str(cfg),
        "--pruners",
        str(root / "pruners"),
        "--schedules",
        "0.5,0.3,0.1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert torch.is_grad_enabled()  # the command run in-process leaves autograd as it found it
    data = json.loads((out / "results.json").read_text())
    base, pruned = data["rows"]
    counts = vision_counts(next_setup.config, structure)
    assert len(set(counts)) >= 3  # different vision-token counts in one batch
    assert base["n"] == pruned["n"] == 8
    assert pruned["n_vision"] == pytest.approx(sum(counts) / 8)
    assert pruned["kept_tokens"] == pytest.approx(expected_kept(counts))
    assert pruned["tflops"] < base["tflops"]
    assert data["settings"].get("structure", "keep") == structure


# ----------------------------------------------------------------------------------------- compare
def test_compare_on_next_runs_every_method_it_can(next_setup, tmp_path):
    """`compare` on NeXT: LVPruning, CLS-knee (per-view CLS), FastV, random, uniform and DivPrune rows on the
    mixed-size batch; VisionZip (no CLS attention on NeXT) is skipped, named in comparison.json."""
    root = next_setup.root
    out = tmp_path / "cmp"
    argv = [
        "compare", "-c", str(root / "cfg.yaml"), "--pruners", str(root / "pruners"), "--out", str(out),
        "--schedules", "0.5,0.3,0.1", "--flops_samples", "2", "--peers", "divprune,visionzip", "--peer_tokens", "64",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert {"base", "cls_knee", "fastv", "random", "uniform", "divprune_64"} <= set(rows)
    assert "visionzip_64" not in rows
    (skip,) = data["meta"]["skipped"] if "meta" in data else data["skipped"]
    assert skip["name"] == "visionzip_64" and "CLS attention" in skip["reason"]
    assert {r["n"] for r in rows.values()} == {8}
    counts = vision_counts(next_setup.config, "keep")
    assert rows["random"]["kept_per_stage"] == pytest.approx(expected_kept(counts))  # LVPruning's rho 0.5 counts
    assert all(r["tflops"] < rows["base"]["tflops"] for name, r in rows.items() if name != "base")


# ---------------------------------------------------------------------------------------- evaluate
QUESTION = "what digit is in row 2"


def evaluate_argv(setup, answers: Path, batch_size: int, pruned: bool) -> list[str]:
    root = setup.root
    questions = root / "questions.jsonl"
    lines = [{"question_id": i, "image": f"{i}.png", "text": QUESTION} for i in range(4)]
    questions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = [
        "evaluate", "--benchmark", "gqa", "--questions", str(questions), "--image_folder", str(root / "images"),
        "--answers", str(answers), "--model_path", str(root / "model"), "--batch_size", str(batch_size),
        "--max_new_tokens", "4", "--prompt_suffix", "false",
    ]  # fmt: skip
    if pruned:
        argv += ["--pruners", str(root / "pruners"), "--schedules", "0.5,0.3,0.1"]
    return argv


def read_answers(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_evaluate_on_next_unpruned_equals_hf_generate(next_setup, tmp_path):
    """`evaluate` on NeXT without pruners: each answer == HF LlavaNext generate() on the processor's own
    inputs (anyres views, image_sizes, <image> expanded for that size) for the same vicuna_v1 prompt."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from lightning_lvp.data.conversation import render_conversation

    answers = tmp_path / "answers.jsonl"
    assert main(evaluate_argv(next_setup, answers, batch_size=4, pruned=False)) == 0
    got = read_answers(answers)
    model_dir = str(next_setup.root / "model")
    processor = AutoProcessor.from_pretrained(model_dir)
    hf = LlavaNextForConditionalGeneration.from_pretrained(model_dir).eval()
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ""}]
    prompt = render_conversation(turns, prompt_only=True).text
    want = []
    for i in range(4):
        inputs = processor(text=prompt, images=Image.open(next_setup.root / "images" / f"{i}.png").convert("RGB"),
                           return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
        want.append(
            processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    assert got == want


def test_evaluate_on_next_pruned_batch_equals_one_at_a_time(next_setup, tmp_path):
    """`evaluate --pruners ... --schedules 0.5,0.3,0.1` on NeXT: a batch of 4 image sizes == batch size 1."""
    batched, single = tmp_path / "b.jsonl", tmp_path / "s.jsonl"
    assert main(evaluate_argv(next_setup, batched, batch_size=4, pruned=True)) == 0
    assert main(evaluate_argv(next_setup, single, batch_size=1, pruned=True)) == 0
    assert read_answers(batched) == read_answers(single) and len(read_answers(single)) == 4


# ------------------------------------------------------------------------------------ lmms plugin
def plugin_requests(images, gen_kwargs, continuation=None):
    docs = {"t": {"test": {i: {"image": im} for i, im in enumerate(images)}}}
    second = dict(gen_kwargs) if continuation is None else continuation
    reqs = [
        SimpleNamespace(args=(f"<image>\n{QUESTION}", second, lambda doc: [doc["image"]], i, "t", "test"))
        for i in range(len(images))
    ]
    return docs, reqs


def test_lmms_plugin_on_next(next_setup):
    """The plugin on NeXT: samples as NeXT's processor expands them; generate_until == the evaluate command's
    generator on the same files; loglikelihood of a mixed-size batch == one request at a time."""
    from lightning_lvp.eval.benchmarks import PromptItem
    from lightning_lvp.eval.lmms_plugin import LVPLmms, encode_sample
    from lightning_lvp.eval.runner import PrunedGenerator

    root = next_setup.root
    args = dict(pretrained=str(root / "model"), pruners=str(root / "pruners"), rho=0.5, max_new_tokens=4)
    plugin = LVPLmms(**args, batch_size=4)
    assert plugin.model.family.name == "llava_next" and plugin.ratios == RATIOS
    images = [Image.open(root / "images" / f"{i}.png").convert("RGB") for i in range(4)]
    processor = plugin.processor
    for im in images[:2]:
        sample = encode_sample(processor, QUESTION, im)
        want = processor(text="<image>", images=im, return_tensors="pt")
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        assert int(sample["vision_mask"].sum()) == int((want["input_ids"] == image_id).sum())
        assert torch.equal(sample["pixel_values"], want["pixel_values"][0])
        assert sample["image_size"].tolist() == [im.height, im.width]
    plugin.task_dict, reqs = plugin_requests(images, {"max_new_tokens": 4})
    got = plugin.generate_until(reqs)
    ref = PrunedGenerator(plugin.model, processor, [str(root / "images")], ratios=RATIOS, max_new_tokens=4)
    assert got == ref([PromptItem(str(i), f"{i}.png", QUESTION) for i in range(4)])
    plugin.task_dict, reqs = plugin_requests(images, {}, continuation=" 3")
    batched = plugin.loglikelihood(reqs)
    one = LVPLmms(**args, batch_size=1, model=plugin.model, processor=processor)
    one.task_dict = plugin.task_dict
    single = one.loglikelihood(reqs)
    assert [b for _, b in batched] == [b for _, b in single]
    torch.testing.assert_close(torch.tensor([x for x, _ in batched]), torch.tensor([x for x, _ in single]))


# ------------------------------------------------------------------------ newline policy option
@pytest.mark.parametrize("structure", ["keep", "prune"])
def test_structure_option_from_yaml_to_the_model(tmp_path, structure):
    """``model.init_args.structure`` (LVPModule, typed keep | prune) parses from YAML, reaches PrunedVLM, and
    gives the documented kept counts: round(rho x n_b) of the patches ("keep": newlines kept on top, never
    counted) or of patches + newlines ("prune")."""
    from test_family_next import SIZES, inputs, make_batch

    from lightning_lvp.commands.experiment import Experiment
    from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava_next
    from lightning_lvp.training.module import LVPModule

    build_tiny_llava_next(TinyLlavaSpec(), seed=0).save_pretrained(tmp_path / "model")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model:\n  class_path: lightning_lvp.training.module.LVPModule\n  init_args:\n"
        f"    model_path: {tmp_path / 'model'}\n    structure: {structure}\n"
        "    method:\n      class_path: lightning_lvp.methods.LVPruning\n"
        f"      init_args: {{after_layers: [1, 2, 3], train_ratios: {RATIOS}, keep_ratios: {RATIOS}, num_heads: 4}}\n"
    )
    assert Experiment.load(cfg).structure() == structure
    module = LVPModule(model_path=str(tmp_path / "model"), method=lvp(), structure=structure)
    module.configure_model()
    model = module.model
    assert model.structure == structure
    batch = make_batch(model.llava, SIZES)
    with torch.no_grad():
        out = model.forward_infer(**inputs(batch))
    layouts = LlavaNextFamily().layouts(model.llava.config, batch["image_sizes"].tolist())
    newlines = [int((lay[:, 0] == NEWLINE).sum()) for lay in layouts]
    patches = [lay.shape[0] - k for lay, k in zip(layouts, newlines)]
    n = patches if structure == "keep" else [p + k for p, k in zip(patches, newlines)]
    assert out.state.n_vision.tolist() == n
    for r, kept in zip(RATIOS, out.kept_patches):
        assert kept.sum(1).tolist() == [keep_count(r, x) for x in n]
    if structure == "keep":  # the newlines survive every stage as structure
        assert (out.state.valid & ~out.state.vision).sum(1).tolist() == [
            int(m.sum()) - p for m, p in zip(batch["attention_mask"], patches)
        ]


def test_structure_prune_is_refused_for_llava15(tmp_path):
    """LLaVA-1.5 has no non-patch image tokens: LVPModule(structure="prune") fails when built, naming the family."""
    from lightning_lvp.tiny import build_tiny_llava
    from lightning_lvp.training.module import LVPModule

    build_tiny_llava(seed=0).save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"structure must be one of \['keep'\] for a llava model"):
        LVPModule(model_path=str(tmp_path / "llava"), method=lvp(), structure="prune")


# =========================================================================================== Qwen2.5-VL
@pytest.fixture(scope="module")
def qwen_setup(tmp_path_factory):
    """A 4-layer tiny Qwen2.5-VL folder (weights + tokenizer + image processor), 4 images of 4 sizes
    (24 / 48 / 24 / 49 tokens at min_pixels 1,024), LLaVA-format data, pruners and an experiment YAML."""
    from qwen_fixtures import tiny_qwen_folder, write_images
    from test_family_qwen_train import SIZES, TURNS

    root = tmp_path_factory.mktemp("qwen_cmd")
    model, _ = tiny_qwen_folder(root / "model", seed=1)  # seed 1: its answers differ from image to image
    (root / "images").mkdir()
    names = write_images(root / "images", SIZES)
    entries = [{"id": f"e{i}", "image": n, "conversations": t} for i, (n, t) in enumerate(zip(names, TURNS))]
    (root / "data.json").write_text(json.dumps(entries))
    method = lvp()
    PrunedVLM(model, method)
    save_pruners(method, root / "pruners")
    (root / "cfg.yaml").write_text(_experiment_yaml(root, batch_size=4, data_extra="    min_pixels: 1024\n"))
    return SimpleNamespace(root=root, counts=[24, 48, 24, 49])


def test_sweep_on_qwen_keeps_each_samples_own_share(qwen_setup, tmp_path):
    """`sweep -c CONFIG` on Qwen2.5-VL (dynamic resolution: 4 token counts in one batch): mean kept tokens per
    stage == mean of round(rho x n_b); the FLOPs of the first sample are counted on its own flat patches."""
    root = qwen_setup.root
    out = tmp_path / "sweep"
    argv = ["sweep", "-c", str(root / "cfg.yaml"), "--pruners", str(root / "pruners"), "--schedules", "0.5,0.3,0.1"]
    assert main([*argv, "--out", str(out)]) == 0
    base, pruned = json.loads((out / "results.json").read_text())["rows"]
    assert base["n"] == pruned["n"] == 4
    assert pruned["n_vision"] == pytest.approx(sum(qwen_setup.counts) / 4)
    assert pruned["kept_tokens"] == pytest.approx(expected_kept(qwen_setup.counts))
    assert pruned["tflops"] > 0 and base["tflops"] > 0  # (a 32-wide model: the modules cost what pruning saves)


def test_first_sample_flops_use_its_own_images():
    """count_schedule_flops (sweep, RatioSweep) on a Qwen batch == count_forward on sample 0 alone (its patch
    rows of the flat pixel_values and its grid rows, not the batch's first patch row)."""
    from qwen_fixtures import build, make_batch, sample_of

    from lightning_lvp.eval.teacher_forced import count_schedule_flops
    from lightning_lvp.flops import count_forward

    model = PrunedVLM(build(seed=0), lvp())
    batch = make_batch([(2, [(4, 6), (4, 4)], 3, 1), (1, [(8, 4)], 2, 1)])
    alone = {k: v for k, v in sample_of(batch, 0).items() if k != "labels"}
    for ratios in (None, RATIOS):
        method = model.method
        model.method = None if ratios is None else method
        want = count_forward(model, alone, ratios)[0]["total"]
        model.method = method
        assert count_schedule_flops(model, batch, ratios) == want


def test_compare_on_qwen_skips_the_cls_methods(qwen_setup, tmp_path):
    """`compare` on Qwen2.5-VL: LVPruning, FastV, random, uniform, DivPrune and DART rows run; CLS-knee and
    VisionZip (no CLS token in Qwen's vision encoder) are skipped with that reason in comparison.json."""
    root = qwen_setup.root
    out = tmp_path / "cmp"
    argv = [
        "compare", "-c", str(root / "cfg.yaml"), "--pruners", str(root / "pruners"), "--out", str(out),
        "--schedules", "0.5,0.3,0.1", "--flops_samples", "2", "--peers", "divprune,visionzip,dart", "--peer_tokens", "64",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert {"base", "fastv", "random", "uniform", "divprune_64", "dart_64"} <= set(rows)
    assert {s["name"] for s in data["skipped"]} == {"cls_knee", "visionzip_64"}
    assert all("no CLS token" in s["reason"] for s in data["skipped"])
    assert {r["n"] for r in rows.values()} == {4}
    assert rows["random"]["kept_per_stage"] == pytest.approx(expected_kept(qwen_setup.counts))
    assert rows["fastv"]["tflops"] < rows["base"]["tflops"]  # no modules: fewer tokens, fewer FLOPs


def qwen_reference_answers(root: Path, names: list[str], question: str, new_tokens: int) -> list[str]:
    """HF Qwen2.5-VL generate() on inputs built from the tokenizer's own chat template + the image processor."""
    from test_family_qwen_train import chat_messages, processor_ids
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lightning_lvp.data.processors import load_processor

    processor = load_processor(root / "model")
    tok = processor.tokenizer
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(root / "model")).eval()
    text = tok.apply_chat_template(
        chat_messages([{"from": "human", "value": f"<image>\n{question}"}]), tokenize=False, add_generation_prompt=True
    )
    out = []
    for name in names:
        image = processor.image_processor(
            images=[Image.open(root / "images" / name).convert("RGB")], return_tensors="pt"
        )
        ids = torch.tensor([processor_ids(tok, text, image["image_grid_thw"])])
        with torch.no_grad():
            gen = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=image["pixel_values"],
                image_grid_thw=image["image_grid_thw"],
                mm_token_type_ids=(ids == hf.config.image_token_id).int(),
                max_new_tokens=new_tokens,
                do_sample=False,
            )
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def qwen_evaluate_argv(root: Path, answers: Path, batch_size: int, pruned: bool) -> list[str]:
    questions = root / "questions.jsonl"
    lines = [{"question_id": i, "image": f"im{i}.png", "text": QUESTION} for i in range(4)]
    questions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = [
        "evaluate", "--benchmark", "gqa", "--questions", str(questions), "--image_folder", str(root / "images"),
        "--answers", str(answers), "--model_path", str(root / "model"), "--batch_size", str(batch_size),
        "--max_new_tokens", "4", "--prompt_suffix", "false",
    ]  # fmt: skip
    return argv + (["--pruners", str(root / "pruners"), "--schedules", "0.5,0.3,0.1"] if pruned else [])


def test_evaluate_on_qwen(qwen_setup, tmp_path):
    """`evaluate` on Qwen2.5-VL: unpruned answers == HF generate() on the chat template's own prompt; pruned,
    a left-padded batch of 4 image sizes == one question at a time."""
    root = qwen_setup.root
    unpruned = tmp_path / "u.jsonl"
    assert main(qwen_evaluate_argv(root, unpruned, batch_size=4, pruned=False)) == 0
    want = qwen_reference_answers(root, [f"im{i}.png" for i in range(4)], QUESTION, 4)
    assert read_answers(unpruned) == want and len(set(want)) > 1  # the images matter
    batched, single = tmp_path / "b.jsonl", tmp_path / "s.jsonl"
    assert main(qwen_evaluate_argv(root, batched, batch_size=4, pruned=True)) == 0
    assert main(qwen_evaluate_argv(root, single, batch_size=1, pruned=True)) == 0
    assert read_answers(batched) == read_answers(single)


def test_lmms_plugin_on_qwen(qwen_setup):
    """The plugin on Qwen2.5-VL: samples == the data pipeline's prompt-only samples (ChatML, flat patches,
    image_grid_thw); generate_until == the evaluate command's generator; loglikelihood batch == one at a time."""
    from lightning_lvp.data.llava_dataset import LlavaDataset
    from lightning_lvp.eval.benchmarks import PromptItem
    from lightning_lvp.eval.lmms_plugin import LVPLmms, encode_sample
    from lightning_lvp.eval.runner import PrunedGenerator

    root = qwen_setup.root
    args = dict(pretrained=str(root / "model"), pruners=str(root / "pruners"), rho=0.5, max_new_tokens=4)
    plugin = LVPLmms(**args, batch_size=4)
    assert plugin.model.family.name == "qwen2_5_vl"
    processor = plugin.processor
    images = [Image.open(root / "images" / f"im{i}.png").convert("RGB") for i in range(4)]
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ""}]
    ds = LlavaDataset([{"id": "0", "image": "im1.png", "conversations": turns}], [str(root / "images")], processor,
                      prompt_only=True)  # fmt: skip
    want, got = ds[0], encode_sample(processor, QUESTION, images[1])
    for key in ("input_ids", "vision_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(got[key], want[key]), key
    plugin.task_dict, reqs = plugin_requests(images, {"max_new_tokens": 4})
    ref = PrunedGenerator(plugin.model, processor, [str(root / "images")], ratios=RATIOS, max_new_tokens=4)
    assert plugin.generate_until(reqs) == ref([PromptItem(str(i), f"im{i}.png", QUESTION) for i in range(4)])
    plugin.task_dict, reqs = plugin_requests(images, {}, continuation=" black")
    batched = plugin.loglikelihood(reqs)
    one = LVPLmms(**args, batch_size=1, model=plugin.model, processor=processor)
    one.task_dict = plugin.task_dict
    single = one.loglikelihood(reqs)
    assert [b for _, b in batched] == [b for _, b in single]
    torch.testing.assert_close(torch.tensor([x for x, _ in batched]), torch.tensor([x for x, _ in single]))
