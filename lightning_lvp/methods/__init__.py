"""Token-pruning methods under one interface (:class:`PruningMethod`)."""

from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.methods.lvp import LVPruning

__all__ = ["LVPruning", "PruningMethod", "StageContext"]
