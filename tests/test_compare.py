"""compare.py: schedule matching maths, the result files on a tiny model, and the CLI end to end."""

import csv
import json
import math

import pytest
import torch

from lightning_lvp import adapter
from lightning_lvp.cli import main
from lightning_lvp.compare import (
    COLUMNS,
    RESULT_FILES,
    build_entries,
    layer_fractions,
    lvp_schedule,
    matched_single_stage_ratio,
    run_comparison,
    write_results,
)
from lightning_lvp.methods import LVPruning
from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

SPEC = TinyLlavaSpec()  # 4 LLM layers, 16 patches
PEER_ROWS_4_LAYERS = [f"{m}_{t}" for t in (64, 128, 192) for m in ("visionzip", "divprune", "dart")]
PEER_ROWS_4_LAYERS.append("pdrop_192")


def test_schedule_maths():
    assert lvp_schedule(0.45, 3) == [0.45, 0.25, 0.05]
    assert lvp_schedule(0.3, 3) == [0.3, 0.1, 0.05]  # the one clip policy: floored at 0.05 (schedules.py)
    # paper: points after 1, 8, 16 of 32 layers, [0.5, 0.3, 0.1]
    fr = layer_fractions([1, 8, 16], [0.5, 0.3, 0.1], 32)
    assert fr[:2] == [1.0, 0.5] and fr[8] == 0.3 and fr[16] == 0.1 and len(fr) == 32
    r = matched_single_stage_ratio([1, 8, 16], [0.5, 0.3, 0.1], 32, 2, 576)
    assert r == pytest.approx((8.5 - 2) / 30)  # (2 + 30 r) / 32 = 8.5 / 32
    assert layer_fractions([0, 2], [0.4, 0.2], 4) == [0.4, 0.4, 0.2, 0.2]


def labelled_batches(n_batches=2, batch_size=3, seed=0):
    """Left-padded prompt + one-token answer, labels on the answer (the evaluate contract)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        rows = []
        for i in range(batch_size):
            pre, post = 1 + i, 3 + i
            text = torch.randint(3, 90, (pre + post + 1,), generator=g).tolist()
            rows.append([1] + text[:pre] + [SPEC.image_token_id] * SPEC.num_image_tokens + text[pre:])
        t = max(map(len, rows))
        ids = torch.zeros(batch_size, t, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, t - len(r) :], mask[i, t - len(r) :] = torch.tensor(r), 1
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        prompt = mask.bool() & (ids != SPEC.image_token_id) & (labels == -100)
        pixels = torch.randn(batch_size, 3, SPEC.image_size, SPEC.image_size, generator=g)
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels, prompt_mask=prompt, pixel_values=pixels))
    return batches


@pytest.fixture(scope="module")
def tiny():
    llava = build_tiny_llava(SPEC, seed=0)
    torch.manual_seed(0)
    lvp = LVPruning([1, 2, 3], [0.5, 0.3, 0.1], [0.5, 0.3, 0.1], num_blocks=1, num_heads=2, dim=16)
    PrunedLlava(llava, lvp)  # binds the decision modules
    return llava, lvp


def test_entries(tiny):
    llava, lvp = tiny
    entries = build_entries(lvp, 4, 16, fastv_k=1, knee_args={"llm_layer": 1})
    names = [e.name for e in entries]
    assert names[:8] == ["base", "lvp_rho0.6", "lvp_rho0.5", "lvp_rho0.45", "cls_knee", "fastv", "random", "uniform"]
    assert names[8:] == PEER_ROWS_4_LAYERS  # PyramidDrop cannot reach 64 or 128 of 576 with 3 of 4 layers unpruned
    by = {e.name: e for e in entries}
    assert by["visionzip_192"].ratios == [pytest.approx(1 / 3, abs=1e-6)] and by["dart_64"].method.after_layers == [2]
    pdrop = by["pdrop_192"]
    assert pdrop.method.after_layers == [1, 2, 3]
    lam = pdrop.method.lam
    assert (1 + lam + lam**2 + lam**3) / 4 == pytest.approx(1 / 3, abs=1e-5)  # layer-mean kept share 192 / 576
    assert pdrop.ratios[-1] == 0.0625  # lambda^3 x 16 < 1 token: raised to one token
    assert by["random"].ratios == [0.5, 0.3, 0.1] and by["random"].method.after_layers == [1, 2, 3]
    assert by["uniform"].method.after_layers == [1, 2, 3]
    # FastV after layer 1 of 4: (1 + 3 r) / 4 = mean([1, .5, .3, .1]) -> r = 0.3
    assert by["fastv"].ratios == [pytest.approx(0.3)]


def test_run_and_write_results(tiny, tmp_path):
    llava, lvp = tiny
    batches = labelled_batches(n_batches=1)
    rows = run_comparison(
        llava, lvp, batches, fastv_k=1, knee_args={"llm_layer": 1}, flops_samples=0, peer_tokens=(192,)
    )  # FLOPs: slow test
    assert [r["name"] for r in rows][:2] == ["base", "lvp_rho0.6"]
    base, rho05, knee = rows[0], rows[2], rows[4]
    assert base["kept_frac_final"] == 1.0 and base["n"] == 3 and math.isnan(base["tflops"])
    assert rho05["kept_vision"] == pytest.approx(round(0.1 * 16))
    assert rho05["kept_frac_layers"] == pytest.approx((1 + 0.5 + 0.3125 + 0.125) / 4)  # round(k x 16) / 16
    assert 0 < knee["kept_frac_final"] <= 1 and knee["ratios"] == [None, 0.5]
    for r in rows[6:8]:  # random / uniform: LVPruning's exact per-stage counts at rho 0.5
        assert r["kept_per_stage"] == rho05["kept_per_stage"]
    by = {r["name"]: r for r in rows}
    assert by["visionzip_192"]["kept_vision"] == round(16 / 3) - 1  # kept PATCHES: its CLS token is none
    assert by["divprune_192"]["kept_vision"] == 5 and "pdrop_192" in by
    assert by["dart_192"]["kept_vision"] == 4  # 4 image pivots, 5 // 8 = 0 tokens per pivot
    paths = write_results(rows, tmp_path / "out", {"command": "python -m lightning_lvp compare ..."})
    assert [p.name for p in paths] == list(RESULT_FILES) and all(p.stat().st_size > 0 for p in paths)
    with open(paths[0]) as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows)
    saved = json.loads(paths[1].read_text())
    assert saved["rows"][2]["name"] == "lvp_rho0.5" and "command" in saved
    assert "| lvp_rho0.5 |" in paths[2].read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_results(rows, tmp_path / "out", {})
    write_results(rows, tmp_path / "out", {}, overwrite=True)
    # no relevant patches in these batches: the relevance metrics are absent (not zero), and so are their columns
    assert not any("relevant_kept" in r or "kept_overlap" in r for r in rows)
    assert "relevant kept" not in paths[2].read_text()


def test_relevance_columns_in_the_result_files(tiny, tmp_path):
    llava, lvp = tiny
    rows = run_comparison(llava, lvp, labelled_batches(n_batches=1), fastv_k=1, flops_samples=0)
    by = {r["name"]: r for r in rows}
    by["lvp_rho0.5"].update(relevant_kept={"layer1": 1.0, "layer2": 0.75, "layer3": 0.5}, kept_overlap={"layer1": 0.9})
    by["fastv"].update(relevant_kept={"layer1": 0.25})
    paths = write_results(rows, tmp_path / "out", {})
    with open(paths[0]) as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert tuple(table["base"])[len(COLUMNS) :] == (
        "relevant_kept/layer1", "relevant_kept/layer2", "relevant_kept/layer3", "kept_overlap/layer1",
    )  # fmt: skip
    assert table["lvp_rho0.5"]["relevant_kept/layer3"] == "0.5" and table["fastv"]["relevant_kept/layer1"] == "0.25"
    assert table["base"]["relevant_kept/layer1"] == ""  # absent, not 0
    md = paths[2].read_text()
    assert "| relevant kept (final) | kept overlap (final) |" in md
    assert "| 0.50 (layer3) | 0.90 (layer1) |" in md and "| 0.25 (layer1) | - |" in md
    assert json.loads(paths[1].read_text())["rows"][2]["relevant_kept"]["layer2"] == 0.75


@pytest.mark.slow
def test_compare_command_end_to_end(tmp_path):
    """The CLI on a saved tiny model + pruner folder + digits data (meaningless accuracy; files and columns)."""
    from lightning_lvp.demo import init_demo_folder
    from lightning_lvp.io import save_pruners

    spec = TinyLlavaSpec(
        hidden_size=32, num_layers=4, vision_hidden_size=32, vision_layers=1, image_size=48, patch_size=8
    )
    model_dir = init_demo_folder(tmp_path / "model", spec=spec)
    torch.manual_seed(0)
    llava = adapter.build_from_config(adapter.load_config(str(model_dir)))
    llava.save_pretrained(str(model_dir))
    lvp = LVPruning([1, 2, 3], [0.5, 0.3, 0.1], [0.5, 0.3, 0.1], num_blocks=1, num_heads=2, dim=16)
    PrunedLlava(llava, lvp)
    save_pruners(lvp, tmp_path / "pruners")
    data = tmp_path / "data.yaml"
    data.write_text(
        "data:\n  class_path: lightning_lvp.data.datamodule.LlavaDataModule\n  init_args:\n    dataset: digits\n"
        f"    cache_dir: {tmp_path / 'cache'}\n"
        "    val_batch_size: 4\n    digits:\n      grid_size: 6\n      train_images: 2\n      val_images: 2\n"
        "      questions_per_type: 1\n"
    )
    argv = ["compare", "-c", str(data), "--model_path", str(model_dir), "--pruners", str(tmp_path / "pruners")]
    argv += ["--out", str(tmp_path / "out"), "--flops_samples", "2", "--fastv_k", "1"]
    assert main(argv) == 0
    with open(tmp_path / "out" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0])[: len(COLUMNS)] == COLUMNS
    assert "relevant_kept/layer3" in rows[0] and rows[0]["relevant_kept/layer3"] == ""  # digits: relevant patches
    assert 0.0 <= float(rows[2]["relevant_kept/layer3"]) <= 1.0  # lvp_rho0.5; the unpruned base: absent
    assert [r["name"] for r in rows] == [
        "base",
        "lvp_rho0.6",
        "lvp_rho0.5",
        "lvp_rho0.45",
        "cls_knee",
        "fastv",
        "random",
        "uniform",
        *PEER_ROWS_4_LAYERS,
    ]
    assert int(rows[0]["n"]) == 2  # 2 images x 1 question type (the default, cell) x 1
    tflops = {r["name"]: float(r["tflops"]) for r in rows}
    assert all(tflops[name] < tflops["base"] for name in tflops if name != "base")
    assert float(rows[0]["flops_change"]) == 0.0
    assert main(argv) == 2  # refuses to overwrite
    assert main([*argv, "--overwrite"]) == 0
