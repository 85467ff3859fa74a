"""Lightning's side of :mod:`lightning_lvp.checkpoint`: a ``CheckpointIO`` plugin that writes atomically
and names the file in loading errors. :class:`~lightning_lvp.training.module.LVPModule` installs it in
``setup`` (in place of the strategy's default ``TorchCheckpointIO``)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_lvp.checkpoint import atomic_write, load_checkpoint_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes with :func:`atomic_write` and names the file in loading errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path)
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)
        return None

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, weights_only=bool(weights_only), map_location=map_location)
