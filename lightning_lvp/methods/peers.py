"""The methods papers compare against, by name, at the budgets they report (issue #15).

* :func:`build_peer` makes a method from a short spec such as ``"dart"`` or
  ``"visionzip:keep_ratio=0.111,contextual_fraction=0.15625"`` for a given LLM (so every command
  that takes ``--pruners`` also takes a training-free peer: sweep, evaluate, the lmms plugin).
* :func:`peer_entries` gives the comparison rows: VisionZip, DivPrune and DART keep the share of
  the vision tokens that 64 / 128 / 192 of LLaVA-1.5's 576 are (the papers' budgets; on the
  36-patch demo: 4 / 8 / 12); PyramidDrop, pruning inside the LLM in stages, is matched on the
  kept fraction averaged over the LLM layers (FLOPs-matched, as FastV in ``compare``) and skipped
  with a warning where its first quarter of unpruned layers already exceeds the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lightning_lvp.adapter import TextDims
from lightning_lvp.methods.base import PruningMethod
from lightning_lvp.methods.dart import DART
from lightning_lvp.methods.divprune import DivPrune
from lightning_lvp.methods.fastv import FastV
from lightning_lvp.methods.pdrop import PyramidDrop, pyramid_ratios
from lightning_lvp.methods.visionzip import VisionZip

log = logging.getLogger(__name__)
PEERS: dict[str, type[PruningMethod]] = {
    "visionzip": VisionZip,
    "divprune": DivPrune,
    "dart": DART,
    "pdrop": PyramidDrop,
    "fastv": FastV,
}
PAPER_TOKENS = (64, 128, 192)  # kept vision tokens the papers report, of LLaVA-1.5's 576
LLAVA15_TOKENS = 576


def paper_layers(num_layers: int) -> list[int]:
    """PyramidDrop's stage boundaries 8 / 16 / 24 of 32, scaled to an LLM of ``num_layers`` layers."""
    layers = sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3)})
    layers = [x for x in layers if x < num_layers]
    if not layers:
        raise ValueError(f"PyramidDrop needs an LLM of at least 2 layers, got {num_layers}")
    return layers


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "/" in text:  # layers=8/16/24
        return [int(x) for x in text.split("/")]
    return text


def is_peer_spec(text: str) -> bool:
    """Whether ``text`` names a peer (``"name"`` or ``"name:arg=value,..."``) rather than a path."""
    return text.split(":", 1)[0].lower() in PEERS


def build_peer(spec: str, dims: TextDims | None = None) -> PruningMethod:
    """A peer method from ``"name"`` or ``"name:arg=value,arg=value"`` (lists as ``8/16/24``).

    Args:
        spec: method name (one of :data:`PEERS`) and optional constructor arguments.
        dims: the LLM; PyramidDrop without ``layers`` then gets :func:`paper_layers` of its depth.
    """
    name, _, rest = spec.partition(":")
    cls = PEERS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(PEERS)}")
    kwargs = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method spec {spec!r}: expected arg=value, got {item!r}")
        kwargs[key.strip()] = _value(value.strip())
    if cls is PyramidDrop and "layers" not in kwargs and dims is not None:
        kwargs["layers"] = paper_layers(dims.num_layers)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"method spec {spec!r}: {err}") from err


def layer_mean(after_layers: Sequence[int], kept: Sequence[float], num_layers: int) -> float:
    """Kept fraction of the vision tokens averaged over the LLM layers (stage s acts after layer after_layers[s])."""
    total = 0.0
    for layer in range(1, num_layers + 1):
        done = [f for a, f in zip(after_layers, kept, strict=True) if a < layer]
        total += done[-1] if done else 1.0
    return total / num_layers


def pyramid_lambda(target: float, layers: Sequence[int], num_layers: int) -> float | None:
    """lambda whose schedule lambda^s has layer-mean kept fraction ``target`` (bisection); None if unreachable."""
    mean = lambda lam: layer_mean(layers, pyramid_ratios(lam, len(layers)), num_layers)  # noqa: E731
    lo, hi = 1e-6, 1.0
    if not mean(lo) <= target <= mean(hi):
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return (lo + hi) / 2


def peer_entries(
    num_layers: int,
    n_vision: int,
    tokens: Sequence[int] = PAPER_TOKENS,
    names: Sequence[str] = ("visionzip", "divprune", "dart", "pdrop"),
    dart_k: int = 2,
) -> list[tuple[str, PruningMethod, list[float]]]:
    """(row name, method, schedule) per peer and budget; names say the LLaVA-1.5 budget, e.g. ``visionzip_64``.

    Args:
        num_layers: LLM depth.
        n_vision: vision tokens per image of this model (the budgets are the same share of them).
        tokens: budgets as kept tokens of 576.
        names: which peers.
        dart_k: DART's layer.
    """
    unknown = set(names) - {"visionzip", "divprune", "dart", "pdrop"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from visionzip, divprune, dart, pdrop")
    out = []
    for t in tokens:
        share = t / LLAVA15_TOKENS
        r = round(max(share, 1.0 / n_vision), 6)
        if "visionzip" in names:
            out.append((f"visionzip_{t}", VisionZip(keep_ratio=r), [r]))
        if "divprune" in names:
            out.append((f"divprune_{t}", DivPrune(keep_ratio=r), [r]))
        if "dart" in names and dart_k < num_layers:
            out.append((f"dart_{t}", DART(k=dart_k, keep_ratio=r), [r]))
        if "pdrop" in names:
            layers = paper_layers(num_layers)
            lam = pyramid_lambda(share, layers, num_layers)
            if lam is None:
                log.warning(
                    "compare: PyramidDrop at layers %s cannot reach a layer-mean kept share %.3f; row skipped",
                    layers,
                    share,
                )
                continue
            ratios = [round(max(x, 1.0 / n_vision), 6) for x in pyramid_ratios(lam, len(layers))]  # >= 1 token
            out.append((f"pdrop_{t}", PyramidDrop(layers=layers, lam=round(lam, 6), keep_ratios=ratios), ratios))
    return out
