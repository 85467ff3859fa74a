"""Model families behind one protocol (:class:`~lightning_lvp.families.base.VLMFamily`, docs/FAMILIES.md).

The family is always chosen from the model's config (``config.model_type``), never from a user flag:
:func:`family_for` takes a config or a model. A new family registers one line in ``_FAMILIES``.
"""

from __future__ import annotations

import importlib
import os

import torch

from lightning_lvp.families.base import VLMFamily

# model_type -> "module:Class"; imported lazily so a family's transformers classes load only when used.
_FAMILIES: dict[str, str] = {
    "llava": "lightning_lvp.families.llava:LlavaFamily",
    "llava_next": "lightning_lvp.families.llava_next:LlavaNextFamily",
    "qwen2_5_vl": "lightning_lvp.families.qwen2_5_vl:Qwen2_5_VLFamily",
}
_ARCHITECTURES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
_INSTANCES: dict[str, VLMFamily] = {}


def supported_families() -> str:
    """``"llava (LlavaForConditionalGeneration), ..."`` for error messages."""
    return ", ".join(f"{t} ({_ARCHITECTURES.get(t, '?')})" for t in _FAMILIES)


def _model_type(config_or_model) -> tuple[str | None, str]:
    config = getattr(config_or_model, "config", config_or_model)
    if isinstance(config, dict):
        return config.get("model_type"), ",".join(config.get("architectures") or [])
    arch = ",".join(getattr(config, "architectures", None) or []) or type(config_or_model).__name__
    return getattr(config, "model_type", None), arch


def family_for(config_or_model) -> VLMFamily:
    """The family object of a model, a config, or a config dict (chosen by ``model_type``).

    Raises:
        ValueError: an unsupported model family; the message lists the supported ones.
    """
    model_type, arch = _model_type(config_or_model)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported model family: model_type {model_type!r} ({arch}); supported: {supported_families()}"
        )
    if model_type not in _INSTANCES:
        module, _, cls = _FAMILIES[model_type].partition(":")
        _INSTANCES[model_type] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[model_type]


def family_by_name(name: str) -> VLMFamily:
    """The family of ``VLMFamily.name`` (as stored in ``pruners.json``)."""
    for model_type in _FAMILIES:
        family = family_for({"model_type": model_type})
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; supported: {supported_families()}")


def load_config(path: str):
    """The config of a model folder / hub id / ``config.json`` of any supported family."""
    import json

    from transformers import AutoConfig

    if path.endswith(".json"):
        with open(path) as f:
            model_type = json.load(f).get("model_type")
        return family_for({"model_type": model_type}).load_config(path)
    config = AutoConfig.from_pretrained(path)
    family_for(config)
    return config


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """A frozen model of any supported family from a folder / hub id, with our attention on its LLM."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model folder {path!r} has no config.json (expected a save_pretrained folder)")
    return family_for(load_config(path)).load(path, dtype=dtype, device=device)


def build_from_config(config, dtype: torch.dtype = torch.float32):
    """Random-weight model of the config's family (on the current default device, e.g. ``meta``)."""
    return family_for(config).build_from_config(config, dtype=dtype)


__all__ = ["VLMFamily", "build_from_config", "family_by_name", "family_for", "load_config", "load_model"]
