"""Old module path of :mod:`lightning_lvp.eval.plots` (kept for user code)."""

from lightning_lvp.eval.plots import Row, accuracy_vs_tflops, save_png

__all__ = ["Row", "accuracy_vs_tflops", "save_png"]
