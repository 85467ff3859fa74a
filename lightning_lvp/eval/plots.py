"""Figures: accuracy against TFLOPs (sweep callback, ``sweep`` and ``compare`` commands), PNG output.

matplotlib's object API only (``matplotlib.figure.Figure``), never ``pyplot``: no global figure
state, and importing this module (or anything that imports it) does not pick a backend with
``matplotlib.use``. PNGs are rendered by the Agg canvas; TensorBoard's ``add_figure`` takes the
``Figure`` as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Row = dict[str, Any]


def accuracy_vs_tflops(
    rows: Sequence[Row],
    label_key: str = "name",
    on_line: Callable[[Row], bool] = lambda row: True,
    line_label: str | None = None,
    markers: dict[str, tuple[str, str]] | None = None,
    xlabel: str = "TFLOPs per sample",
    ylabel: str = "accuracy (%)",
    title: str | None = None,
    size: tuple[float, float] = (5.0, 3.5),
) -> Figure:
    """Accuracy (%) against TFLOPs, one annotated point per row.

    Args:
        rows: dicts with ``tflops``, ``accuracy`` (a fraction) and a label under ``label_key``.
        label_key: the key that names a row (``"name"``, or ``"schedule"`` for the sweep callback).
        on_line: which rows are joined by a line, in TFLOPs order (e.g. one method's schedules).
        line_label: legend entry of that line (None: no legend entry).
        markers: label -> (matplotlib marker, colour) for rows drawn as single marked points with a
            legend entry (e.g. ``{"base": ("*", "k")}``).
        xlabel, ylabel, title: axis labels and optional title.
        size: figure size in inches.
    """
    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    line = sorted((r["tflops"], 100 * r["accuracy"]) for r in rows if on_line(r))
    if line:
        ax.plot([x for x, _ in line], [y for _, y in line], "-o", color="C0", label=line_label)
    for r in rows:
        name, point = str(r[label_key]), (r["tflops"], 100 * r["accuracy"])
        if markers and name in markers:
            marker, color = markers[name]
            ax.plot(*point, marker, color=color, markersize=9, label=name)
        ax.annotate(name, point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if line_label or markers:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Renders ``fig`` with the Agg canvas into ``path`` (no pyplot, no global backend)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return Path(path)
