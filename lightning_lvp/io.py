"""Saving and loading pruning methods on their own: ``pruners.safetensors`` + ``pruners.json``.

The JSON holds what is needed to rebuild the method (``class_path`` and ``init_args``) and the
LLM dimensions it was built for; loading onto a LLaVA of another hidden size or depth fails with
a message naming both.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lightning_lvp.adapter import TextDims
from lightning_lvp.methods.base import PruningMethod

log = logging.getLogger(__name__)
WEIGHTS, META = "pruners.safetensors", "pruners.json"
FORMAT_VERSION = 1


def instantiate(spec: dict[str, Any]) -> Any:
    """Builds ``{"class_path": "pkg.mod.Class", "init_args": {...}}`` (LightningCLI's format)."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"expected a mapping with 'class_path' (and optional 'init_args'), got {spec!r}")
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path {spec['class_path']!r} cannot be imported: {err}") from err
    return cls(**(spec.get("init_args") or {}))


def method_spec(method: PruningMethod) -> dict[str, Any]:
    """``class_path`` + ``init_args`` of a method (methods record their init args in ``hparams``)."""
    cls = type(method)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(method.init_args)}


def save_pruners(method: PruningMethod, folder: str | Path, overwrite: bool = False) -> Path:
    """Writes the method's weights and description into ``folder``.

    Raises:
        FileExistsError: if the folder already holds pruners and ``overwrite`` is False.
    """
    folder = Path(folder)
    if (folder / WEIGHTS).exists() or (folder / META).exists():
        if not overwrite:
            raise FileExistsError(f"{folder} already holds pruners; pass overwrite=True to replace them")
        log.warning("overwriting the pruners in %s", folder)
    if method.dims is None:
        raise ValueError("the method is not bound to a model (PrunedLlava binds it)")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in method.state_dict().items()}
    if tensors:
        save_file(tensors, str(folder / WEIGHTS))
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method_spec(method),
        "dims": vars(method.dims),
        "after_layers": method.after_layers,
        "keep_ratios": method.keep_ratios,
        "num_parameters": sum(t.numel() for t in tensors.values()),
    }
    (folder / META).write_text(json.dumps(meta, indent=2))
    return folder


def load_pruners(folder: str | Path, dims: TextDims, device: str | torch.device = "cpu") -> PruningMethod:
    """Rebuilds a method from ``folder`` for an LLM with ``dims``.

    Raises:
        FileNotFoundError: no ``pruners.json`` in the folder.
        ValueError: the pruners were built for another hidden size or depth.
    """
    folder = Path(folder)
    if not (folder / META).exists():
        raise FileNotFoundError(f"{folder / META} not found (expected a folder written by save_pruners / export)")
    meta = json.loads((folder / META).read_text())
    saved = TextDims(**meta["dims"])
    for name in ("hidden_size", "num_layers"):
        if getattr(saved, name) != getattr(dims, name):
            raise ValueError(
                f"pruners in {folder} were trained for an LLM with {name}={getattr(saved, name)}, "
                f"but this LLaVA has {name}={getattr(dims, name)}"
            )
    method = instantiate(meta["method"])
    method.bind(dims)
    if (folder / WEIGHTS).exists():
        method.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)))
    return method.to(device)


def load_method(path: str | Path, dims: TextDims, device: str | torch.device = "cpu") -> PruningMethod:
    """Pruners from an exported folder (``pruners.json``) or from any training checkpoint.

    A Lightning ``.ckpt`` file or a DeepSpeed folder is first exported to a temporary folder
    (:func:`lightning_lvp.export.export_pruners`), then loaded like an exported one.
    """
    import tempfile

    path = Path(path)
    if path.is_dir() and (path / META).exists():
        return load_pruners(path, dims, device)
    from lightning_lvp.export import export_pruners

    with tempfile.TemporaryDirectory() as tmp:
        export_pruners(path, tmp)
        return load_pruners(tmp, dims, device)
