"""benchmarks/speed.py's LLaVA-NeXT case (#14 item 7): it builds, and its FLOPs prediction is the closed form.

No timing is asserted (the numbers live in docs/BENCHMARKS.md); a small LLM keeps it fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightning_lvp import flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
speed = pytest.importorskip("speed")

LAYERS, HIDDEN, TEXT = 8, 64, 64


@pytest.fixture(scope="module")
def case():
    return speed.next_case(LAYERS, HIDDEN, TEXT)


def test_next_case_has_the_7b_input_and_proportions(case):
    """One 672 px image = 5 views of 336 px with llava-v1.6's pinpoints: 2,880 vision + 48 newline tokens."""
    cfg = case["config"]
    assert cfg.model_type == "llava_next"
    assert cfg.image_grid_pinpoints == json.loads(Path(speed.NEXT_CONFIG).read_text())["image_grid_pinpoints"]
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    dims = case["models"]["base"].dims
    assert dims.intermediate_size == round(HIDDEN * 11008 / 4096) and dims.head_dim == 64  # 7B's MLP ratio, heads
    batch = case["batch"]
    assert int((batch["input_ids"] == cfg.image_token_id).sum()) == 2928
    assert speed.next_vision_tokens(cfg) == 2880
    assert batch["pixel_values"].shape[:2] == (1, 5) and batch["image_sizes"].tolist() == [[672, 672]]
    assert case["after_layers"] == [1, LAYERS // 4, LAYERS // 2]  # the paper's 1, 8, 16 of 32, scaled


def test_next_case_flops_prediction_is_the_closed_form(case):
    """The FLOPs rows the speed-up is compared with: kept counts round(rho x 2,880) (newlines kept as
    structure), tokens per layer, and the LLM's 2T(4d^2 + 3dm) + 4T^2 d per layer, exactly."""
    dims = case["models"]["base"].dims
    base, pruned = case["flops"]["base"], case["flops"]["rho0.5"]
    n_text = TEXT + 48  # the newline tokens stay in every layer, like text
    seq = 2880 + n_text
    d, m = dims.hidden_size, dims.intermediate_size
    assert base["layer_tokens"] == [[seq, LAYERS]]
    assert base["by_component"]["llm"] * 1e12 == pytest.approx(LAYERS * flops.llm_layer_flops(seq, d, m), rel=1e-12)
    assert pruned["kept_vision"] == [1440.0, 864.0, 288.0]
    per_layer = flops.tokens_per_layer(2880, n_text, case["after_layers"], [0.5, 0.3, 0.1], LAYERS)
    runs = [t for t, n in pruned["layer_tokens"] for _ in range(n)]
    assert runs == per_layer
    want = sum(flops.llm_layer_flops(t, d, m) for t in per_layer)
    assert pruned["by_component"]["llm"] * 1e12 == pytest.approx(want, rel=1e-12)
    # the unpruned parts are the same FLOPs in both, the pruners only in the pruned forward
    for part in ("vision_tower", "projector"):
        assert pruned["by_component"][part] == pytest.approx(base["by_component"][part], rel=1e-12)
    assert base["by_component"]["pruners"] == 0 < pruned["by_component"]["pruners"]
    assert 0 < pruned["tflops"] / base["tflops"] < 1


def test_component_timer_wraps_and_restores(case):
    """The prefill breakdown times merge / layers / pruners of the real forward and leaves the objects as found."""
    models, batch = case["models"], case["batch"]
    family, method = models["base"].family, models["rho0.5"].method
    with speed.ComponentTimer(family, [method]) as timer:
        run = timer.record("rho0.5", speed.prefill_fn(models["rho0.5"], batch, [0.5, 0.3, 0.1]))
        logits = run()
    assert logits.shape == (1, 1, models["base"].dims.vocab_size)
    assert "merge" not in vars(family) and "run_layer" not in vars(family) and "apply" not in vars(method)
    (parts,) = timer.runs["rho0.5"]
    assert set(parts) == {"merge", "layers", "pruners", "total", "cpu"} and all(parts[p] > 0 for p in parts)


@pytest.mark.slow
def test_next_benchmark_runs_end_to_end(tmp_path):
    """``python benchmarks/speed.py --only_next`` on a small LLM: the JSON report has both rows."""
    out = tmp_path / "next.json"
    argv = ["--only_next", "--next_repeats", "1", "--layers", str(LAYERS), "--hidden", str(HIDDEN), "--json", str(out)]
    assert speed.main(argv) == 0
    report = json.loads(out.read_text())["next"]
    assert [r["schedule"] for r in report["rows"]] == ["base", "rho0.5"]
    assert report["model"]["image_tokens"] == 2928 and report["model"]["vision_tokens"] == 2880
