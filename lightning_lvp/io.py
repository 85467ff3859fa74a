"""Saving and loading pruning methods on their own: ``pruners.safetensors`` + ``pruners.json``.

The JSON holds what is needed to rebuild the method (``class_path`` and ``init_args``) and the
LLM dimensions and the model family (``"llava"``, ``"llava_next"``, ...) it was built for; loading onto a
model of another family, hidden size or depth fails with a message naming both (folders written
before the family entry existed are not family-checked). Both files are written atomically (temporary file in the folder + rename);
a folder without the weights of a method that has parameters, or a truncated file, is an error
naming the file (never randomly initialised modules evaluated as if trained).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from lightning_lvp.checkpoint import atomic_write, atomic_write_text
from lightning_lvp.families.base import TextDims
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
        with atomic_write(folder / WEIGHTS, "wb") as f:
            f.write(save(tensors))
    elif (folder / WEIGHTS).exists():  # overwriting trained pruners with a parameter-free method
        (folder / WEIGHTS).unlink()
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method_spec(method),
        "dims": vars(method.dims),
        "family": getattr(method, "family", None),  # the base's family (PrunedVLM sets it when binding)
        "after_layers": method.after_layers,
        "keep_ratios": method.keep_ratios,
        "num_parameters": sum(t.numel() for t in tensors.values()),
    }
    atomic_write_text(folder / META, json.dumps(meta, indent=2))
    return folder


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_path: str | Path, full_hash_below: int = 1 << 30) -> str:
    """What identifies a model folder's weights: sha256 of its config and weight files when they total less
    than ``full_hash_below`` bytes; else of the config plus each weight file's name, size and mtime (hashing
    a 14 GB LLaVA-7B would take minutes). A hub id that is not a local folder is returned as it is."""
    folder = Path(model_path)
    if not folder.is_dir():
        return f"hub:{model_path}"
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    full = sum(p.stat().st_size for p in files) < full_hash_below
    for p in files:
        digest.update(p.name.encode())
        if full or p.name == "config.json":
            digest.update(file_fingerprint(p).encode())
        else:
            digest.update(f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return ("sha256:" if full else "sizes+mtimes:") + digest.hexdigest()


def pruner_source_fingerprint(source: str | Path) -> str:
    """Fingerprint of whatever ``--pruners`` names: a pruner folder (:func:`pruners_fingerprint`), a checkpoint
    file (sha256), another folder such as a DeepSpeed checkpoint (its files' names, sizes and mtimes: the
    shards are gigabytes), or a training-free peer spec (the spec itself)."""
    path = Path(source)
    if path.is_dir() and (path / META).exists():
        return pruners_fingerprint(path)
    if path.is_file():
        return file_fingerprint(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            digest.update(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
        return "sizes+mtimes:" + digest.hexdigest()
    return f"spec:{source}"


def pruners_fingerprint(folder: str | Path) -> str:
    """sha256 over the pruner files of ``folder`` (what sweep/compare record their rows were measured with)."""
    digest = hashlib.sha256()
    for name in (META, WEIGHTS):
        path = Path(folder) / name
        if path.exists():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_family(source: str | Path, saved: str | None, family: str | None) -> None:
    """An error when pruners trained on one model family are loaded on another (None = unknown, not checked)."""
    if saved and family and saved != family:
        raise ValueError(
            f"pruners in {source} were trained on a {saved!r} model, but this model is a {family!r} model: "
            "pruners do not transfer between model families (train or export pruners for this family)"
        )


def load_pruners(
    folder: str | Path, dims: TextDims, device: str | torch.device = "cpu", family: str | None = None
) -> PruningMethod:
    """Rebuilds a method from ``folder`` for an LLM with ``dims``.

    Args:
        family: the base model's family name (``VLMFamily.name``); None = not checked.

    Raises:
        FileNotFoundError: no ``pruners.json`` in the folder, or no ``pruners.safetensors`` for a method
            that has parameters (a trainable method would otherwise run with random weights).
        ValueError: a truncated or foreign file (named), or pruners built for another family, hidden size or depth.
    """
    folder = Path(folder)
    if not (folder / META).exists():
        raise FileNotFoundError(f"{folder / META} not found (expected a folder written by save_pruners / export)")
    try:
        meta = json.loads((folder / META).read_text())
        saved = TextDims(**meta["dims"])
        spec = meta["method"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{folder / META} is truncated or not written by save_pruners / export ({type(e).__name__}: {e})"
        ) from None
    check_family(folder, meta.get("family"), family)
    for name in ("hidden_size", "num_layers"):
        if getattr(saved, name) != getattr(dims, name):
            raise ValueError(
                f"pruners in {folder} were trained for an LLM with {name}={getattr(saved, name)}, "
                f"but this LLaVA has {name}={getattr(dims, name)}"
            )
    method = instantiate(spec)
    method.bind(dims)
    method.family = meta.get("family") or family
    expected = method.state_dict()
    if not (folder / WEIGHTS).exists():
        if expected or method.trainable:
            raise FileNotFoundError(
                f"{folder / WEIGHTS} not found: {type(method).__name__} has {len(expected)} weight tensors and "
                f"{folder / META} alone would give randomly initialised modules. Export the pruners again "
                "(python -m lightning_lvp export --ckpt_path CKPT --out DIR)."
            )
        return method.to(device)
    try:
        weights = load((folder / WEIGHTS).read_bytes())
    except Exception as e:  # safetensors: SafetensorError on a truncated or foreign file
        raise ValueError(
            f"{folder / WEIGHTS} is truncated or not a safetensors file ({type(e).__name__}: {e})"
        ) from None
    try:
        method.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS} does not match {folder / META}: {e}") from None
    return method.to(device)


def load_method(
    path: str | Path, dims: TextDims, device: str | torch.device = "cpu", family: str | None = None
) -> PruningMethod:
    """Pruners from an exported folder (``pruners.json``), any training checkpoint, or a peer spec.

    A peer spec names a training-free method and its arguments, e.g. ``"visionzip"`` or
    ``"dart:k=2,keep_ratio=0.222"`` (:func:`lightning_lvp.methods.peers.build_peer`).

    A Lightning ``.ckpt`` file or a DeepSpeed folder is first exported to a temporary folder
    (:func:`lightning_lvp.export.export_pruners`), then loaded like an exported one. ``family``: the base
    model's family name, checked against the one the pruners were saved for (None = not checked).
    """
    import tempfile

    from lightning_lvp.methods.peers import build_peer, is_peer_spec

    if not Path(path).exists() and is_peer_spec(str(path)):  # a training-free peer, e.g. "dart:k=2"
        method = build_peer(str(path), dims)
        method.bind(dims)
        return method.to(device)
    path = Path(path)
    if path.is_dir() and (path / META).exists():
        return load_pruners(path, dims, device, family)
    from lightning_lvp.export import export_pruners

    with tempfile.TemporaryDirectory() as tmp:
        export_pruners(path, tmp)
        try:
            return load_pruners(tmp, dims, device, family)
        except ValueError as e:  # name the checkpoint, not the temporary folder
            raise ValueError(str(e).replace(tmp, str(path))) from None
