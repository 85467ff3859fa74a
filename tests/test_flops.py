"""FLOPs counting (lightning_lvp/flops.py): closed forms, the paper's table, the command, real vs shape-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_lvp import adapter
from lightning_lvp import flops as F
from lightning_lvp.cli import main
from lightning_lvp.commands.experiment import Experiment
from lightning_lvp.io import instantiate
from lightning_lvp.methods import ClsKneePruning, LVPruning
from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava, tiny_llava_config

LVP = "lightning_lvp.methods.LVPruning"
PAPER = [[0.6, 0.4, 0.2], [0.5, 0.3, 0.1], [0.45, 0.25, 0.05]]
LVP_7B = {"class_path": LVP, "init_args": {"after_layers": [1, 8, 16], "keep_ratios": [0.5, 0.3, 0.1], "num_heads": 8}}
TINY = TinyLlavaSpec(num_layers=6, hidden_size=64, intermediate_size=160, image_size=32, patch_size=4)  # 64 patches
LVP_TINY = {"class_path": LVP, "init_args": {"after_layers": [1, 3, 4], "keep_ratios": [0.5, 0.3, 0.1], "num_heads": 4}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny real models gain nothing from 2 threads; one avoids OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config7b():
    return F.resolve_model_config("llava-hf/llava-1.5-7b-hf")


@pytest.fixture(scope="module")
def model7b(config7b):
    return F.build_shape_only(config7b, LVP_7B)


@pytest.fixture(scope="module")
def counts7b(model7b, config7b):
    """Exact integer counts: None (unpruned) and each paper schedule -> (flops by component, InferOutput)."""
    batch = F.dummy_batch(config7b, 30)
    out = {None: F.count_forward(PrunedLlava(model7b.llava, None), batch, None, shape_only=True)}
    for s in PAPER:
        out[tuple(s)] = F.count_forward(model7b, batch, s, shape_only=True)
    return out


def closed_form_llm(layer_tokens: list[int], config) -> int:
    """Sum over layers of the per-layer closed form (the rotary (64 x 1) @ (1 x T) product is a broadcast: 0 FLOPs)."""
    dims = adapter.text_dims(config)
    kv = config.text_config.num_key_value_heads * dims.head_dim
    return sum(F.llm_layer_flops(t, dims.hidden_size, dims.intermediate_size, kv) for t in layer_tokens)


def test_shipped_7b_config(config7b):
    tc, vc = config7b.text_config, config7b.vision_config
    assert (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads) == (4096, 11008, 32, 32)
    assert (tc.vocab_size, tc.max_position_embeddings, tc.rms_norm_eps) == (32064, 4096, 1e-5)
    assert (vc.hidden_size, vc.num_hidden_layers, vc.image_size, vc.patch_size) == (1024, 24, 336, 14)
    assert (config7b.image_token_id, config7b.vision_feature_layer, config7b.projector_hidden_act) == (
        32000,
        -2,
        "gelu",
    )
    with torch.device("meta"):
        n = sum(p.numel() for p in adapter.build_from_config(config7b).parameters())
    assert 7.0e9 < n < 7.1e9  # LLaVA-1.5-7B: 7.06 B


def test_llm_equals_closed_form_for_kept_tokens(counts7b, config7b):
    for schedule, (flops, out) in counts7b.items():
        expected_tokens = F.tokens_per_layer(576, 30, [1, 8, 16], schedule or [1.0, 1.0, 1.0], 32)
        layer_tokens = [int(out.stage_valid[s].sum()) for s in out.layer_stage]
        assert layer_tokens == expected_tokens
        assert flops["llm"] == closed_form_llm(layer_tokens, config7b)
    # the bare closed form 2T(4d^2 + 3dm) + 4T^2 d of the issue, for one layer of 606 tokens
    assert F.llm_layer_flops(606, 4096, 11008) == 2 * 606 * (4 * 4096**2 + 3 * 4096 * 11008) + 4 * 606**2 * 4096


def test_pruner_conventions(counts7b, model7b, config7b):
    for schedule in PAPER:
        flops, out = counts7b[tuple(schedule)]
        alive = [576] + [int(k.sum()) for k in out.kept_patches[:-1]]  # module s scores the survivors of s-1
        assert flops["pruners"] == sum(F.decision_module_flops(n, 30, 4096) for n in alive)
    all_vision = F.all_vision_pruner_flops(model7b, 576, 30, shape_only=True)
    assert all_vision == 3 * F.decision_module_flops(576, 30, 4096)
    assert all_vision / 1e12 == pytest.approx(F.PAPER_MODULES_TFLOPS, rel=0.01)  # paper: 0.71 TFLOPs


def test_paper_table_within_3_percent(counts7b):
    """Convention: alive pruners, LM head on the last position, all 24 CLIP layers (docs/BENCHMARKS.md)."""
    base = counts7b[None][0]["total"]
    for schedule, (flops, _) in counts7b.items():
        paper = F.paper_tflops(schedule)
        assert flops["total"] / 1e12 == pytest.approx(paper, rel=0.03), schedule
        if schedule is not None:
            paper_reduction = paper / F.PAPER_TFLOPS[()] - 1
            assert flops["total"] / base - 1 == pytest.approx(paper_reduction, abs=0.01)
    assert counts7b[None][0]["other"] == 0  # every FLOP is attributed to a component


def test_flops_fall_strictly_with_rho():
    config = tiny_llava_config(TINY)
    schedules = [[r, max(r - 0.2, 0.05), max(r - 0.4, 0.02)] for r in (1.0, 0.8, 0.7, 0.6, 0.5, 0.45, 0.3)]
    rows = F.count_config(config, LVP_TINY, schedules, text_tokens=12)
    totals = [r["tflops"] for r in rows[1:]]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    llm = [r["by_component"]["llm"] for r in rows]
    assert all(a > b for a, b in zip(llm, llm[1:]))  # the unpruned LLM first


@pytest.mark.parametrize("lm_head", ["last", "all"])
def test_shape_only_equals_real_model(lm_head):
    """The weightless shape-only count equals FlopCounterMode on a real model (SDPA counted on CPU too)."""
    config = tiny_llava_config(TINY)
    torch.manual_seed(0)
    real = PrunedLlava(build_tiny_llava(TINY), instantiate(LVP_TINY))
    batch = F.dummy_batch(config, 12)
    batch["pixel_values"] = torch.randn_like(batch["pixel_values"])
    rows_real = F.count_schedules(real, batch, PAPER, lm_head=lm_head, shape_only=False)
    rows_meta = F.count_config(config, LVP_TINY, PAPER, text_tokens=12, lm_head=lm_head)
    for a, b in zip(rows_real, rows_meta):
        assert a["by_component"] == b["by_component"] and a["layer_tokens"] == b["layer_tokens"]
    flops, out = F.count_forward(real, batch, PAPER[1])
    assert flops["llm"] == closed_form_llm([int(out.stage_valid[s].sum()) for s in out.layer_stage], config)


def test_data_dependent_method_counts_on_real_model():
    config = tiny_llava_config(TINY)
    real = PrunedLlava(build_tiny_llava(TINY), ClsKneePruning(llm_layer=2, keep_ratio=0.5))
    batch = F.dummy_batch(config, 12)
    batch["pixel_values"] = torch.randn_like(batch["pixel_values"])
    rows = F.count_schedules(real, batch, [[None, 0.5]], shape_only=False)
    assert rows[1]["tflops"] < rows[0]["tflops"] and rows[1]["kept_vision"][0] <= 64
    with pytest.raises(ValueError, match="data-dependent"):
        F.count_schedules(real, batch, [[None, 0.5]], shape_only=True)


def _write_yaml(path, text: str):
    path.write_text(text)
    return str(path)


def _model_section(model_path: str, method: dict) -> str:
    return f"""
model:
  class_path: lightning_lvp.lit_module.LVPModule
  init_args:
    model_path: {model_path}
    method: {json.dumps(method)}
"""


def test_flops_command_json_7b(tmp_path, capsys):
    """fit's layout (model.init_args.X), the shipped 7B config, one schedule: JSON with the paper column."""
    cfg = _write_yaml(tmp_path / "rho05.yaml", _model_section("llava-hf/llava-1.5-7b-hf", LVP_7B))
    assert main(["flops", "-c", cfg, "--schedules", "0.5,0.3,0.1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == [None, [0.5, 0.3, 0.1]]
    assert set(rows[1]["by_component"]) >= set(F.COMPONENTS)
    assert rows[1]["tflops"] == pytest.approx(3.18, rel=0.03) and rows[1]["paper_tflops"] == 3.18
    assert rows[1]["reduction"] == pytest.approx(rows[1]["tflops"] / rows[0]["tflops"] - 1)
    assert rows[1]["layer_tokens"] == [[606, 1], [318, 7], [203, 8], [88, 16]]
    assert "lm_head" in rows[0]["convention"] and "pruners" in rows[0]["convention"]


def test_flops_command_overrides(tmp_path, capsys):
    """A --model_config override, --schedules, --convention all_vision, the table output."""
    config_json = tmp_path / "tiny.json"
    tiny_llava_config(TINY).to_json_file(str(config_json))
    cfg = _write_yaml(tmp_path / "tiny.yaml", _model_section("some/unreachable-model", LVP_TINY))
    argv = ["flops", "-c", cfg, "--model_config", str(config_json), "--text_tokens", "12"]
    assert main([*argv, "--schedules", "0.6,0.4,0.2;0.5,0.3,0.1", "--json", "--convention", "all_vision"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == [None, [0.6, 0.4, 0.2], [0.5, 0.3, 0.1]]
    assert rows[1]["by_component"]["pruners"] == rows[2]["by_component"]["pruners"] > 0  # all 64 tokens each time
    assert rows[0]["paper_tflops"] is None
    assert main([*argv, "--schedules", "0.6,0.4,0.2;0.5,0.3,0.1"]) == 0
    table = capsys.readouterr().out
    assert "unpruned" in table and "[0.5, 0.3, 0.1]" in table and "pruners" in table
    # the common schedule syntax (lightning_lvp/schedules.py): the paper rule gives the same rows
    assert main([*argv, "--schedules", "0.6,0.4,0.2;paper:0.5", "--json", "--convention", "all_vision"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in same] == [None, [0.6, 0.4, 0.2], [0.5, 0.3, 0.1]]
    assert [r["tflops"] for r in same] == [r["tflops"] for r in rows]
    # without --schedules and without a RatioSweep callback: the method's keep_ratios
    assert main([*argv, "--json"]) == 0
    assert [r["schedule"] for r in json.loads(capsys.readouterr().out)] == [None, [0.5, 0.3, 0.1]]


def test_flops_schedules_default_to_the_ratio_sweep_callback(tmp_path, capsys):
    """Without --schedules, the RatioSweep callback's rhos give [rho, rho-0.2, rho-0.4] (its schedules win)."""
    callbacks = """
trainer:
  callbacks:
    - class_path: lightning_lvp.callbacks.RatioSweep
      init_args: {rhos: [0.6, 0.45]}
"""
    cfg = _write_yaml(tmp_path / "cb.yaml", callbacks + _model_section("llava-hf/llava-1.5-7b-hf", LVP_7B))
    experiment = Experiment.load(cfg)
    assert experiment.schedules(None, 3) == [[0.6, 0.4, 0.2], [0.45, 0.25, 0.05]]
    assert experiment.model_path() == "llava-hf/llava-1.5-7b-hf" and experiment.method_spec()["class_path"] == LVP
    assert isinstance(instantiate(experiment.method_spec()), LVPruning)
    explicit = cfg.replace("cb.yaml", "explicit.yaml")
    _write_yaml(Path(explicit), Path(cfg).read_text().replace("rhos: [0.6, 0.45]", "schedules: [[0.5, 0.3, 0.1]]"))
    assert Experiment.load(explicit).schedules(None, 3) == [[0.5, 0.3, 0.1]]
    assert Experiment.load(explicit).schedules("paper:0.6", 3) == [[0.6, 0.4, 0.2]]  # the flag wins


def test_flops_pseudo_keys_and_old_flags_fail_naming_them(tmp_path, capsys):
    """The keys the hand reader accepted and fit rejects fail as fit fails; old flag spellings name the new."""
    text = _model_section("llava-hf/llava-1.5-7b-hf", LVP_7B) + "    sweep_schedules: [[0.5, 0.3, 0.1]]\n"
    cfg = _write_yaml(tmp_path / "pseudo.yaml", text)
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "-c", cfg])
    assert exit_.value.code == 2 and "sweep_schedules" in capsys.readouterr().err
    cfg = _write_yaml(tmp_path / "cfg.yaml", _model_section("llava-hf/llava-1.5-7b-hf", LVP_7B))
    for old, new in (
        ("--model-config", "--model_config"),
        ("--text-tokens", "--text_tokens"),
        ("--lm-head", "--lm_head"),
    ):
        with pytest.raises(SystemExit):
            main(["flops", "-c", cfg, old, "x"])
        assert new in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flops", "-c", cfg, "--schedules", "0.6,0.4,0.2", "0.5,0.3,0.1"])  # nargs="+" before
    assert "--schedules '0.6,0.4,0.2;0.5,0.3,0.1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flops", "-c", cfg, "--text_tokens", "many"])
    assert "text_tokens" in capsys.readouterr().err  # jsonargparse's error names the field
