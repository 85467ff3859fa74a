"""lightning_lvp/eval/plots.py: one accuracy-vs-TFLOPs figure, no pyplot state, no backend chosen at import."""

import subprocess
import sys

from lightning_lvp.eval.plots import accuracy_vs_tflops, save_png

ROWS = [
    {"name": "base", "ratios": None, "tflops": 2.0, "accuracy": 0.9},
    {"name": "a", "ratios": [0.5], "tflops": 1.0, "accuracy": 0.8},
    {"name": "b", "ratios": [0.3], "tflops": 0.5, "accuracy": 0.6},
]


def test_line_joins_the_chosen_rows_in_tflops_order_and_markers_get_legend_entries(tmp_path):
    fig = accuracy_vs_tflops(
        ROWS, on_line=lambda r: r["ratios"] is not None, line_label="pruned", markers={"base": ("*", "k")}
    )
    ax = fig.axes[0]
    line, base = ax.get_lines()
    assert list(line.get_xdata()) == [0.5, 1.0] and list(line.get_ydata()) == [60.0, 80.0]
    assert (list(base.get_xdata()), list(base.get_ydata()), base.get_marker()) == ([2.0], [90.0], "*")
    assert [t.get_text() for t in ax.texts] == ["base", "a", "b"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pruned", "base"]
    path = save_png(fig, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_module_needs_no_pyplot():
    code = "import sys, lightning_lvp.eval.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_the_commands_never_calls_matplotlib_use():
    """Issue #12: importing the lmms plugin (or any command) must not pick a backend for the host program."""
    code = (
        "import matplotlib\n"
        "def use(*a, **k): raise AssertionError('matplotlib.use called at import')\n"
        "matplotlib.use = use\n"
        "import lightning_lvp.callbacks, lightning_lvp.sweep, lightning_lvp.compare, lightning_lvp.eval.lmms_plugin\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
