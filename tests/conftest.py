"""Test set-up: offline hub (an accidental download fails at once), few threads, shared tiny models."""

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _called_by_us(frame) -> bool:
    """True if the warning comes from transformers code that OUR code called (not a test, not HF itself).

    Walks outward from the frame that called ``warnings.warn``: it must be in a transformers module;
    the first frame outside transformers and torch (``nn.Module.__call__``) must be in lightning_lvp.
    """
    if not _module(frame).startswith("transformers."):
        return False
    while frame is not None and _module(frame).split(".")[0] in ("transformers", "torch"):
        frame = frame.f_back
    return _module(frame).split(".")[0] == "lightning_lvp"


@pytest.fixture(autouse=True)
def _deprecations_from_our_transformers_calls_fail(monkeypatch):
    """A FutureWarning / DeprecationWarning raised by transformers inside a call made by lightning_lvp
    is an error (issue #12: stay inside the pin, e.g. ``past_key_values=`` -> ``cache=`` in 5.24).
    ``warnings.warn`` is looked up at call time by ``transformers.utils.deprecation``."""
    original = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(cat, (DeprecationWarning, FutureWarning)) and _called_by_us(sys._getframe(1)):
            raise cat(f"deprecated transformers usage in lightning_lvp: {message}")
        return original(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
