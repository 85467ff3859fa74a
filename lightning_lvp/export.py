"""Pruner weights from any checkpoint (``python -m lightning_lvp export --ckpt_path CKPT --out DIR``,
lightning_lvp/commands/export.py).

Works with a Lightning ``.ckpt`` file and with a DeepSpeed (ZeRO-2/3, sharded) checkpoint folder,
which is first consolidated with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``. The
output (``pruners.safetensors`` + ``pruners.json``) loads on a single device with
:func:`lightning_lvp.io.load_pruners`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_lvp.checkpoint import load_checkpoint_file
from lightning_lvp.families.base import TextDims
from lightning_lvp.io import instantiate, save_pruners

PREFIX = "method."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint dict; DeepSpeed folders are consolidated to fp32 first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():  # DeepSpeed: <dir>/checkpoint/*_states.pt (+ "latest")
        try:
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
        except ImportError as err:
            raise ImportError("reading a DeepSpeed checkpoint needs deepspeed: pip install -e '.[deepspeed]'") from err
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            return load_checkpoint_file(out)
    return load_checkpoint_file(path)  # a truncated or foreign file: an error naming it


def pruner_state(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], TextDims, dict[str, torch.Tensor]]:
    """(method spec, LLM dims, method weights) stored in a checkpoint written by LVPModule."""
    if "lvp_method" not in checkpoint:
        raise ValueError(
            "checkpoint has no 'lvp_method' entry: it was not written by lightning_lvp's LVPModule with a pruning "
            "method (a base trained with model.train_base has no pruners)"
        )
    meta = checkpoint["lvp_method"]
    state = checkpoint.get("state_dict") or checkpoint.get("module") or {}
    # DeepSpeed consolidation may prefix keys with "_forward_module."
    weights = {}
    for key, value in state.items():
        key = key.removeprefix("_forward_module.")
        if key.startswith("model." + PREFIX):  # ZeRO consolidation names parameters by module path (#12)
            key = key.removeprefix("model.")
        if key.startswith(PREFIX):
            weights[key[len(PREFIX) :]] = value
    if not weights:
        raise ValueError("checkpoint holds no pruner weights (no 'method.*' keys in its state_dict)")
    return meta["spec"], TextDims(**meta["dims"]), weights


def export_pruners(ckpt_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Writes the pruners of ``ckpt_path`` into ``out``; returns ``out``."""
    checkpoint = read_checkpoint(ckpt_path)
    try:
        spec, dims, weights = pruner_state(checkpoint)
    except ValueError as e:
        raise ValueError(f"{ckpt_path}: {e}") from None
    method = instantiate(spec)
    method.bind(dims)
    method.family = checkpoint["lvp_method"].get("family")  # checkpoints before #14 have none
    method.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return save_pruners(method, out, overwrite=overwrite)
