"""Old module path of :mod:`lightning_lvp.training.module` (kept so saved LightningCLI configs with
``class_path: lightning_lvp.lit_module.LVPModule``, checkpoints and user code still load)."""

from lightning_lvp.training.module import DTYPES, LVPModule, warmup_cosine

__all__ = ["DTYPES", "LVPModule", "warmup_cosine"]
