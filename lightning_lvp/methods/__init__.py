"""Token-pruning methods under one interface (:class:`PruningMethod`)."""

from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.methods.lvp import LVPruning

__all__ = ["LVPruning", "PruningMethod", "StageContext"]
from lightning_lvp.methods.fastv import FastV  # noqa: E402
from lightning_lvp.methods.knee import ClsKneePruning  # noqa: E402
from lightning_lvp.methods.simple import RandomPruning, UniformPruning  # noqa: E402

__all__ += ["ClsKneePruning", "FastV", "RandomPruning", "UniformPruning"]
