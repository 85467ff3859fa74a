"""FLOPs of the shipped Qwen2.5-VL-7B architecture on the meta device at 1,024 x 768 px (issue #14 item 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_lvp import flops
from lightning_lvp.families import qwen2_5_vl as qwen


@pytest.fixture(scope="module")
def config():
    return flops.resolve_model_config("Qwen/Qwen2.5-VL-7B-Instruct")  # shipped JSON, no download


def test_shipped_config_is_qwen2_5_vl_7b(config):
    from lightning_lvp.families import family_for

    assert isinstance(family_for(config), qwen.Qwen2_5_VLFamily)
    tc, vc = config.text_config, config.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_key_value_heads, tc.intermediate_size) == (3584, 28, 4, 18944)
    assert (vc.depth, vc.hidden_size, vc.window_size, list(vc.fullatt_block_indexes)) == (
        32,
        1280,
        112,
        [7, 15, 23, 31],
    )
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_documented_image_size_gives_999_tokens(config):
    assert qwen.image_grid(config, height=768, width=1024) == (1, 54, 74)  # resized to 756 x 1,036 px
    batch = qwen.dummy_batch(config, text_tokens=30)
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 999
    assert batch["input_ids"].shape[1] == 999 + 30


def test_tflops_per_schedule_on_the_meta_device(config):
    method = {
        "class_path": "lightning_lvp.methods.lvp.LVPruning",
        "init_args": {"after_layers": [1, 8, 16], "keep_ratios": [0.5, 0.3, 0.1], "train_ratios": [0.5, 0.3, 0.1]},
    }
    base, pruned = flops.count_config(config, method, [[0.5, 0.3, 0.1]])
    tc = config.text_config
    kv = tc.num_key_value_heads * tc.hidden_size // tc.num_attention_heads
    layer = lambda t: flops.llm_layer_flops(t, tc.hidden_size, tc.intermediate_size, kv)  # noqa: E731
    assert base["by_component"]["llm"] * 1e12 == pytest.approx(28 * layer(1029), rel=1e-9)
    assert base["by_component"]["pruners"] == 0 and base["by_component"]["other"] == 0
    assert base["by_component"]["projector"] > 0  # the 2x2 merger, not double counted in the tower
    assert base["tflops"] == pytest.approx(sum(base["by_component"].values()), rel=1e-9)
    assert pruned["kept_vision"] == [500, 300, 100]  # round(rho x 999)
    assert pruned["layer_tokens"] == [[1029, 1], [530, 7], [330, 8], [130, 12]]
    expected_llm = layer(1029) + 7 * layer(530) + 8 * layer(330) + 12 * layer(130)
    assert pruned["by_component"]["llm"] * 1e12 == pytest.approx(expected_llm, rel=1e-9)
    assert pruned["tflops"] < 0.6 * base["tflops"]


def test_flops_command_prints_each_familys_vision_tower_convention(capsys):
    """The printed convention names what the vision_tower column counts for the config's own family."""
    from lightning_lvp.cli import main

    repo = Path(__file__).resolve().parents[1]
    expected = {
        "qwen2_5_vl_rho05.yaml": "windowed-attention ViT",
        "llava_next_rho05.yaml": "every anyres crop",
        "rho05.yaml": "all CLIP layers run by transformers",
    }
    for name, text in expected.items():
        assert main(["flops", "-c", str(repo / "experiments" / name)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("vision_tower:"))
        assert text in line, (name, line)
