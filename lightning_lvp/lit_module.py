"""Old module path of :mod:`lightning_lvp.training.module` (kept so saved LightningCLI configs with
``class_path: lightning_lvp.lit_module.LVPModule``, checkpoints and user code still load).

``LVPModule`` here is :class:`lightning_lvp.training.module.LVPModule` that also takes the arguments
moved to :class:`~lightning_lvp.training.demo_base.DemoBaseModule` (#12), only to fail naming it: an old
``demo_base`` config (``train_base: true``) says what to use instead of "Option 'train_base' is not accepted".
"""

from __future__ import annotations

from typing import Any

from lightning_lvp.training import module as _module
from lightning_lvp.training.module import DTYPES, warmup_cosine

# LVPModule's arguments before #12 that now belong to DemoBaseModule, with their old defaults
MOVED_TO_DEMO_BASE = {
    "from_scratch": False,
    "train_base": False,
    "curriculum": False,
    "curriculum_start": 4,
    "curriculum_window": 256,
    "save_base_to": None,
}


class LVPModule(_module.LVPModule):
    """:class:`lightning_lvp.training.module.LVPModule` under its old class path.

    Args:
        *args: as the new class.
        from_scratch: removed (#12); the demo base: lightning_lvp.training.demo_base.DemoBaseModule.
        train_base: removed (#12); the demo base: lightning_lvp.training.demo_base.DemoBaseModule.
        curriculum: removed (#12); the demo base: lightning_lvp.training.demo_base.DemoBaseModule.
        curriculum_start: removed (#12); the demo base: lightning_lvp.training.demo_base.DemoBaseModule.
        curriculum_window: removed (#12); the demo base: lightning_lvp.training.demo_base.DemoBaseModule.
        save_base_to: removed (#12); the demo base: lightning_lvp.training.demo_base.DemoBaseModule.
        **kwargs: as the new class.
    """

    def __init__(
        self,
        *args: Any,
        from_scratch: bool = False,
        train_base: bool = False,
        curriculum: bool = False,
        curriculum_start: int = 4,
        curriculum_window: int = 256,
        save_base_to: str | None = None,
        **kwargs: Any,
    ):
        given = dict(
            from_scratch=from_scratch,
            train_base=train_base,
            curriculum=curriculum,
            curriculum_start=curriculum_start,
            curriculum_window=curriculum_window,
            save_base_to=save_base_to,
        )
        used = [k for k, v in given.items() if v != MOVED_TO_DEMO_BASE[k]]
        if used:
            raise ValueError(
                f"model.{', model.'.join(used)}: LVPModule trains pruners only since #12; the demo base is trained "
                "from scratch by class_path: lightning_lvp.training.demo_base.DemoBaseModule (same arguments, no "
                "model.method; see experiments/demo_base.yaml)"
            )
        super().__init__(*args, **kwargs)
        for name in MOVED_TO_DEMO_BASE:  # collected by save_hyperparameters from this frame: not hparams
            self._hparams.pop(name, None)
            self._hparams_initial.pop(name, None)


__all__ = ["DTYPES", "LVPModule", "warmup_cosine"]
