"""Token-pruning methods under one interface (:class:`PruningMethod`)."""

from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.methods.lvp import LVPruning

__all__ = ["LVPruning", "PruningMethod", "StageContext"]
from lightning_lvp.methods.fastv import FastV  # noqa: E402
from lightning_lvp.methods.knee import ClsKneePruning  # noqa: E402
from lightning_lvp.methods.simple import RandomPruning, UniformPruning  # noqa: E402

__all__ += ["ClsKneePruning", "FastV", "RandomPruning", "UniformPruning"]
from lightning_lvp.methods.dart import DART  # noqa: E402
from lightning_lvp.methods.divprune import DivPrune  # noqa: E402
from lightning_lvp.methods.pdrop import PyramidDrop  # noqa: E402
from lightning_lvp.methods.visionzip import VisionZip  # noqa: E402

__all__ += ["DART", "DivPrune", "PyramidDrop", "VisionZip"]
