"""The interface every token-pruning method implements (LVPruning and the training-free baselines).

A method owns a list of pruning points ``after_layers`` and, at each point, picks which vision
tokens survive given the hidden states and the token layout (:class:`~lightning_lvp.state.SeqState`)
plus a :class:`StageContext` with what some methods need (the layer's input for attention scores,
the vision tower's CLS similarity). The model does the removal; methods only decide.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lvp.families.base import TextDims
from lightning_lvp.schedules import validate_ratios  # noqa: F401  (re-exported: methods import it from here)
from lightning_lvp.state import SeqState


@dataclass
class StageContext:
    """What a method may read at a pruning point besides the :class:`SeqState`.

    Attributes:
        stage: stage index s (0-based).
        layer_index: 0-based index of the LLM layer whose output is being pruned (None: LLM input).
        vision_hidden: (B, 1 + N, Dv) hidden states of the vision tower's selected layer, CLS first,
            patch order = ``state.patch_index``.
        attention_row: callable ``query_index (B,) -> (B, H, L)`` giving the softmax attention of
            one query per sample in layer ``layer_index`` (recomputed on demand; None at the input).
        next_attention_row: the same for layer ``layer_index + 1`` applied to the current hidden
            states (the attention the next layer would compute before any removal; PyramidDrop).
        layer_keys: callable ``() -> (B, L, H * Dh)``, the rotary keys of layer ``layer_index`` over
            the current slots, all query heads (DART's pivots).
        final_norm: the LLM's final norm, ``(..., D) -> (..., D)`` (DART's similarity space).
        vision_attention: callable ``() -> (cls_attention (B, Hv, 1 + N), keys (B, 1 + N, Dh))``:
            the CLS query's softmax attention and the head-averaged keys of the vision tower's
            selected layer (VisionZip); token order as ``vision_hidden``.
        project: the multimodal projector, ``(B, M, Dv) -> (B, M, D)`` (tokens merged in vision space).
        cls_similarity: callable ``() -> (B, N)``: cosine similarity of every vision token's state in
            the selected vision layer to its CLS state, patch order (CLS-knee); LLaVA-NeXT compares a
            crop's tokens with that crop's own CLS (docs/FAMILIES.md). None: column 0 of ``vision_hidden``.
    """

    stage: int
    layer_index: int | None
    vision_hidden: torch.Tensor | None = None
    attention_row: Callable[[torch.Tensor], torch.Tensor] | None = None
    next_attention_row: Callable[[torch.Tensor], torch.Tensor] | None = None
    layer_keys: Callable[[], torch.Tensor] | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    vision_attention: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    cls_similarity: Callable[[], torch.Tensor] | None = None


def validate_layers(after_layers: Sequence[int], field: str = "after_layers") -> list[int]:
    """Checks pruning points are non-negative, strictly increasing integers."""
    layers = list(after_layers)
    if not layers:
        raise ValueError(f"{field} must name at least one layer")
    if any(not isinstance(x, int) or x < 0 for x in layers):
        raise ValueError(f"{field} must be non-negative integers, got {layers}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{field} must be strictly increasing, got {layers}")
    return layers


def keep_counts(ratio: float, n_vision: torch.Tensor, stage: int) -> torch.Tensor:
    """k_s = round(rho_s * |I_V original|) per sample (METHOD §4); an error if it is zero.

    Each sample's count is a fraction of ITS OWN original vision-token count (LLaVA-NeXT images
    give different counts).

    Args:
        ratio: kept fraction of the ORIGINAL number of vision tokens.
        n_vision: (B,) original vision-token counts.
        stage: for the error message.

    Raises:
        ValueError: a sample would keep zero tokens; the message names the first such sample.
    """
    counts = torch.floor(ratio * n_vision.double() + 0.5).long()
    if bool((counts < 1).any()):
        i = int((counts < 1).nonzero()[0, 0])
        n = int(n_vision[i])
        raise ValueError(
            f"keep ratio {ratio} at stage {stage} leaves zero vision tokens for sample {i} "
            f"(round({ratio} x {n}) = 0 of its {n}); use a larger ratio"
        )
    return counts


def topk_keep(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keeps the ``counts[b]`` highest-scoring candidates of each row (one topk, no Python loop).

    Args:
        scores: (B, L) higher = keep.
        candidates: (B, L) bool, the tokens that compete (alive vision tokens).
        counts: (B,) how many to keep; clamped to the number of candidates.

    Returns:
        (B, L) bool, True for the kept candidates (non-candidates are False).
    """
    counts = torch.minimum(counts, candidates.sum(1))
    kmax = int(counts.max().item())
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    index = masked.topk(kmax, dim=1).indices  # (B, kmax), best first
    take = torch.arange(kmax, device=scores.device)[None, :] < counts[:, None]
    keep = torch.zeros_like(candidates).scatter(1, index, take)
    return keep & candidates


class PruningMethod(nn.Module):
    """Base class: decides which vision tokens survive at each pruning point.

    Args:
        after_layers: pruning points; ``l`` reads the output of LLM layer l (1-based), 0 = LLM input.
        keep_ratios: default inference kept ratio per point, a fraction of the ORIGINAL vision
            tokens (None where the method sets the count itself).
    """

    trainable: ClassVar[bool] = False
    init_args: dict[str, Any]

    def __init_subclass__(cls, **kwargs):
        """Records each subclass's constructor arguments in ``init_args`` (for save/load and export)."""
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            bound = inspect.signature(init).bind(self, *args, **kw)
            bound.apply_defaults()
            recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items() if k != "self"}
            self.init_args = recorded  # the outermost subclass call writes last

        cls.__init__ = recording_init

    def __init__(self, after_layers: Sequence[int], keep_ratios: Sequence[float | None]):
        super().__init__()
        self.after_layers = validate_layers(after_layers)
        self.keep_ratios = validate_ratios(keep_ratios, "keep_ratios", allow_none=True)
        if len(self.keep_ratios) != len(self.after_layers):
            raise ValueError(
                f"keep_ratios has {len(self.keep_ratios)} entries but after_layers has {len(self.after_layers)}: "
                f"{list(keep_ratios)} vs {list(after_layers)}"
            )
        self.dims: TextDims | None = None
        self.family: str | None = None  # the base's model family (set by PrunedVLM; saved in pruners.json)

    @property
    def num_stages(self) -> int:
        return len(self.after_layers)

    def bind(self, dims: TextDims) -> None:
        """Attaches the method to an LLM of these dimensions (validates the layer indices)."""
        if self.after_layers[-1] >= dims.num_layers:
            raise ValueError(
                f"after_layers {self.after_layers} out of range for an LLM with {dims.num_layers} layers "
                f"(each must be < {dims.num_layers})"
            )
        self.dims = dims

    def resolve_ratios(self, ratios: Sequence[float | None] | None) -> list[float | None]:
        """The inference schedule: ``ratios`` if given, else the method's ``keep_ratios``."""
        if ratios is None:
            return list(self.keep_ratios)
        ratios = validate_ratios(ratios, "ratios", allow_none=True)
        if len(ratios) != self.num_stages:
            raise ValueError(f"ratios has {len(ratios)} entries, the method has {self.num_stages} stages")
        return ratios

    def scores(self, state: SeqState, ctx: StageContext) -> torch.Tensor:
        """(B, L) keep scores (higher = keep) over the current slots; only alive vision slots are read."""
        raise NotImplementedError

    def counts(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        """(B,) number of vision tokens to keep at this stage."""
        if ratio is None:
            raise ValueError(f"{type(self).__name__} needs a keep ratio at stage {ctx.stage}")
        return keep_counts(ratio, state.n_vision, ctx.stage)

    def select(self, state: SeqState, ctx: StageContext, ratio: float | None) -> torch.Tensor:
        """(B, L) bool: tokens that survive this stage (text and kept vision tokens)."""
        alive = state.alive_vision
        keep_vision = topk_keep(self.scores(state, ctx), alive, self.counts(state, ctx, ratio))
        return (state.valid & ~state.vision) | keep_vision

    def apply(self, state: SeqState, ctx: StageContext, ratio: float | None) -> SeqState:
        """The state after this stage: by default the tokens of :meth:`select`, physically removed.

        Methods that also change the surviving tokens (VisionZip's merged tokens) override this.
        """
        return state.select(self.select(state, ctx, ratio))

    def decide(self, state: SeqState, ctx: StageContext, tau: float) -> torch.Tensor:
        """(B, L) hard differentiable keep decisions for the masked training path (trainable methods)."""
        raise NotImplementedError(f"{type(self).__name__} is training-free: it has no training path")
