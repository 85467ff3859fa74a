"""Checkpoint files that a kill cannot destroy, and that fail with the file's name when unreadable.

* :func:`atomic_write`: every result file of this package (checkpoints, pruners, sweep and compare
  results) is written to a temporary file IN THE SAME FOLDER, flushed to disk, then renamed over the
  target (``os.replace``, atomic on POSIX). Lightning's own writer goes through an fsspec transaction
  whose temporary file lives in ``$TMPDIR``; when that is another filesystem (``/dev/shm``, a local
  disk under a network home) the final step is a copy, and a kill during it left ``last.ckpt`` empty or
  truncated with the previous good copy gone.
* :func:`load_checkpoint_file`: ``torch.load`` with errors that name the file (a truncated zip gave
  "PytorchStreamReader failed reading zip archive", a cut pickle a bare ``EOFError``). Lightning's side,
  :class:`~lightning_lvp.training.checkpoint_io.AtomicCheckpointIO` (that writer and that reader as a
  ``CheckpointIO`` plugin), lives in the training package: this module does not import Lightning.
* :func:`find_last_checkpoint`: what ``fit --ckpt_path last`` resumes (Lightning alone looks in the NEW
  run's folder, finds nothing and silently trains from scratch).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file next to ``path``; on success it replaces ``path`` atomically.

    A kill or an exception leaves ``path`` as it was (the temporary ``.<name>.tmp-<pid>`` is removed on
    exceptions; after a kill it stays behind, harmless, and is overwritten by the next write).

    Args:
        path: the final file.
        mode: ``"w"`` (text) or ``"wb"``.
        **open_kwargs: passed to ``open`` (e.g. ``newline=""`` for CSV, ``encoding``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``fig.savefig`` through :func:`atomic_write` (the format is taken from ``path``'s suffix)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)


def rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and plain data (loadable with
    ``torch.load(weights_only=True)``, which LightningCLI uses to read a checkpoint's hyperparameters)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read: truncated, not a checkpoint, or of another program."""


def load_checkpoint_file(
    path: str | os.PathLike, weights_only: bool = False, map_location: Any = "cpu"
) -> dict[str, Any]:
    """``torch.load`` of a Lightning checkpoint, with errors that name the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointReadError: truncated or corrupt file, or not a dict with a ``state_dict`` (not a
            Lightning checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        raise CheckpointReadError(
            f"checkpoint {path} ({path.stat().st_size} bytes) cannot be read: it is truncated, corrupt, not a "
            "PyTorch checkpoint, or holds objects other than tensors and plain data "
            f"({type(e).__name__}: {e}). Resume from an earlier checkpoint of the run."
        ) from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        what = f"keys {sorted(checkpoint)[:8]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointReadError(f"{path} is not a Lightning checkpoint (no 'state_dict'; found {what})")
    return checkpoint


def __getattr__(name: str) -> Any:
    """``lightning_lvp.checkpoint.AtomicCheckpointIO`` (its old path) without importing Lightning here."""
    if name == "AtomicCheckpointIO":
        from lightning_lvp.training.checkpoint_io import AtomicCheckpointIO

        return AtomicCheckpointIO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _version_number(folder: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def find_last_checkpoint(run_folders: list[Path], described: str) -> Path:
    """``last.ckpt`` of the newest run that has one.

    Args:
        run_folders: the logger's run folders (``<save_dir>/<name>/version_N``), or checkpoint folders
            (a ``ModelCheckpoint.dirpath``), in any order.
        described: where they come from, for the error.

    Raises:
        FileNotFoundError: no candidate holds a ``last.ckpt``; the message lists where it looked.
    """
    ordered = sorted(run_folders, key=lambda p: (_version_number(p), p.stat().st_mtime if p.exists() else 0))
    for folder in reversed(ordered):
        for candidate in (folder / "checkpoints" / "last.ckpt", folder / "last.ckpt"):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(p) for p in ordered) or "nothing there"
    raise FileNotFoundError(
        f"--ckpt_path last: no last.ckpt in the runs of {described} (looked in: {looked}). Give the checkpoint "
        "file itself (--ckpt_path PATH), or keep ModelCheckpoint(save_last=true) in the run's config."
    )
