"""The fit summary table: relevance columns only where the rows carry them."""

from __future__ import annotations

from lightning_lvp.eval.teacher_forced import RelevanceStats
from lightning_lvp.training.callbacks import format_sweep, gather_relevance

ROWS = [
    {"schedule": "base", "ratios": None, "accuracy": 0.99, "tflops": 2e-4},
    {"schedule": "rho0.5", "ratios": [0.5, 0.3, 0.1], "accuracy": 0.9, "tflops": 1e-4},
]


def test_format_sweep_without_relevance_has_no_columns():
    text = format_sweep(ROWS, None)
    assert "relevant kept" not in text and "overlap" not in text
    assert "0.50x" in text


def test_format_sweep_prints_per_stage_relevance():
    stages = {"layer1": 1.0, "layer2": 0.75, "layer4": 0.5}
    rows = [
        ROWS[0],
        {**ROWS[1], "relevant_kept": stages, "kept_overlap": {"layer1": 1.0, "layer2": 0.9, "layer4": 0.25}},
    ]
    lines = format_sweep(rows, None).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("schedule"))
    assert "relevant kept" in lines[head] and "kept overlap" in lines[head]
    assert lines[head + 1].split()[-2:] == ["-", "-"]  # base: absent, not 1.0
    assert lines[head + 2].split()[-2:] == ["1.00/0.75/0.50", "1.00/0.90/0.25"]
    assert "(layer1/layer2/layer4)" in lines[-1]


def test_gather_relevance_without_distributed_is_identity():
    stats = RelevanceStats(["layer1"])
    assert gather_relevance(stats) is stats
