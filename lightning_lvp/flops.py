"""FLOPs of the token-removing inference forward, per inference schedule (the paper's TFLOPs table).

What is counted: ``PrunedLlava.forward_infer`` itself (vision tower, projector, LLM with the real
gathers, the pruning method) plus the LM head, under ``torch.utils.flop_counter.FlopCounterMode``,
attributed to components with its per-module counts. Convention (see :data:`CONVENTION`):
one FLOP = one multiply or add (a matmul is 2 x MACs); only matmuls, convolutions and attention
count; attention counts the full T_q x T_k scores (no causal halving). The LLM then costs exactly
``2 T (4 d^2 + 3 d m) + 4 T^2 d`` per layer for T tokens (:func:`llm_layer_flops`).

Shape-only execution: the 7B model is built on the ``meta`` device (no weights, instant) and its
parameters become stride-0 CPU zeros (no memory). :class:`ShapeOnlyMode` then evaluates every op
that is a FLOP op or has a large floating-point input on the meta device for its output shape and
returns never-initialised CPU memory, while the token bookkeeping (masks, indices, counts: what
``.item()`` and the gathers need) is computed for real. Pure-meta execution cannot run the pruned
forward: its kept counts are read with ``.item()``. For methods whose counts depend on the image
(CLS-knee), count a real model on real inputs with ``shape_only=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from lightning_lvp import adapter
from lightning_lvp.families.llava import LlavaFamily
from lightning_lvp.io import instantiate
from lightning_lvp.model import PrunedLlava

if TYPE_CHECKING:
    from transformers import LlavaConfig

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf.json",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-v1.6-vicuna-7b-hf.json",  # dummy image: 672 x 672 px -> 2,928 tokens
    "qwen/qwen2.5-vl-7b-instruct": "qwen2.5-vl-7b-instruct.json",  # dummy image: 1,024 x 768 px -> 999 tokens
}
COMPONENTS = ("vision_tower", "projector", "llm", "pruners", "lm_head")
LM_HEAD_MODES = ("last", "all", "none")
PRUNER_CONVENTIONS = ("alive", "all_vision")
# Paper Table 1 (LLaVA-1.5-7B, 1 image + 30 text tokens), keyed by schedule; () = the base model.
PAPER_TFLOPS = {(): 8.38, (0.6, 0.4, 0.2): 3.97, (0.5, 0.3, 0.1): 3.18, (0.45, 0.25, 0.05): 2.79}
PAPER_MODULES_TFLOPS = 0.71
CONVENTION = {
    "unit": "FLOP = one multiply or one add (matmul = 2 x MACs), torch.utils.flop_counter",
    "counted": "matmul, convolution, attention (4 T_q T_k d per layer, no causal halving); norms, activations, softmax, gathers not counted",
    "vision_tower": LlavaFamily.vision_tower_flops,  # the default model's; the flops command prints its model's family's
    "keep_counts": "k_s = round(rho_s x N_vision) of the ORIGINAL vision tokens",
    "pruning_points": "after_layer l = after the l-th decoder layer (1-based): layers 1..l see every token",
    "pruners_training_free": "the method's own work: LVPruning's decision modules; for training-free methods every FLOP outside "
    "the model's modules (recomputed attention rows / keys, similarity matrices, VisionZip's merge)",
}
LM_HEAD_TEXT = {
    "last": "LM head on the last position only (the first generated token)",
    "all": "LM head on every position that reaches the last layer",
    "none": "LM head not counted",
}
PRUNER_TEXT = {
    "alive": "module s scores the vision tokens alive when it runs (what forward_infer executes)",
    "all_vision": "every module scores all original vision tokens (the paper's 0.71 TFLOPs for three modules)",
}

aten = torch.ops.aten


# On CPU, SDPA dispatches to a fused kernel that FlopCounterMode (torch 2.13) has no formula for.
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}
_FLOP_OPS = set(flop_registry) | set(CPU_SDPA_FORMULAS)


# ------------------------------------------------------------------------------------------ config
def resolve_model_config(model: str) -> LlavaConfig:
    """LlavaConfig of a known hub id (shipped JSON, no download), a ``.json`` file or a model folder/hub id."""
    shipped = SHIPPED_CONFIGS.get(model.lower().rstrip("/"))
    if shipped is not None:
        return adapter.load_config(str(CONFIG_DIR / shipped))
    return adapter.load_config(model)


def llm_layer_flops(tokens: int, hidden: int, intermediate: int, kv_dim: int | None = None) -> int:
    """FLOPs of one Llama decoder layer on ``tokens`` tokens: 2T(4d^2 + 3dm) + 4T^2 d (kv_dim < d for GQA)."""
    kv = hidden if kv_dim is None else kv_dim
    return 2 * tokens * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate) + 4 * tokens**2 * hidden


def tokens_per_layer(
    n_vision: int, n_text: int, after_layers: Sequence[int], ratios: Sequence[float], num_layers: int
) -> list[int]:
    """Tokens each decoder layer runs on under a fixed-count schedule (k_s = round(rho_s N_vision))."""
    kept = [n_vision] + [math.floor(r * n_vision + 0.5) for r in ratios]
    return [n_text + kept[sum(p < i for p in after_layers)] for i in range(1, num_layers + 1)]


def decision_module_flops(n_query: int, n_key: int, dim: int, num_blocks: int = 2, ffn_mult: int = 2) -> int:
    """FLOPs of one LVPruning decision module (METHOD §2) scoring ``n_query`` tokens against ``n_key`` keys."""
    block = 2 * dim * dim * (2 * n_query + 2 * n_key) + 4 * n_query * n_key * dim + 4 * n_query * dim * ffn_mult * dim
    return num_blocks * block + 2 * n_query * dim * 2


# ------------------------------------------------------------------------------ shape-only mode
_META_CACHE: dict[tuple, Any] = {}  # (op, argument shapes) -> meta result, shared by every ShapeOnlyMode


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class ShapeOnlyMode(TorchDispatchMode):
    """Runs FLOP ops and ops on large floating-point tensors for their shape only (see module doc).

    Integer/bool results (masks, indices, counts) and small tensors are computed for real; so every
    data-dependent size the pruned forward reads is exact, while hidden states hold garbage.

    Args:
        small: floating-point tensors with fewer elements are computed for real.
    """

    def __init__(self, small: int = 1 << 15):
        super().__init__()
        self.small = small
        self._cache = _META_CACHE

    def _heavy(self, func, args, kwargs) -> bool:
        if func.overloadpacket in _FLOP_OPS:
            return True
        leaves, _ = tree_flatten((args, kwargs))
        return any(isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() >= self.small for x in leaves)

    def _like(self, m: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device)
        return out if m.numel() >= self.small else out.zero_()  # small results may be read: no garbage

    def _meta_out(self, func, args, kwargs):
        """Meta-device result of ``func`` (cached by shapes: the 32 layers repeat the same ops), or None = run for real."""
        leaves = tree_flatten((args, kwargs))[0]
        key = (
            func,
            len(args),
            tuple(kwargs),
            *((x.shape, x.stride(), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves),
        )
        try:
            return self._cache[key]
        except (KeyError, TypeError):  # TypeError: an unhashable argument, do not cache
            pass
        try:
            out = func(*tree_map_only(torch.Tensor, _to_meta, args), **tree_map_only(torch.Tensor, _to_meta, kwargs))
        except (NotImplementedError, RuntimeError):  # data-dependent output shape (boolean indexing)
            out = None
        tensors = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if func.overloadpacket not in _FLOP_OPS and any(not x.is_floating_point() for x in tensors):
            out = None  # integer/bool results drive control flow
        try:
            self._cache[key] = out
        except TypeError:
            pass
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view or not self._heavy(func, args, kwargs):
            return func(*args, **kwargs)
        out = self._meta_out(func, args, kwargs)
        if out is None:
            return func(*args, **kwargs)
        if func._schema.is_mutable:
            return kwargs.get("out", args[0] if args else None)
        device = next(x.device for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor))
        return tree_map_only(torch.Tensor, lambda m: self._like(m, device), out)


@contextmanager
def shape_only_context(enabled: bool):
    """:class:`ShapeOnlyMode` on one thread (nothing big is computed; saves OpenMP hand-offs per op)."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ShapeOnlyMode():
            yield
    finally:
        torch.set_num_threads(threads)


def zero_weights_(module: nn.Module) -> nn.Module:
    """Replaces ``meta`` parameters and buffers by stride-0 CPU zeros (no memory) of the same shape."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[name] = nn.Parameter(
                    torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False
                )
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros((), dtype=b.dtype).expand(b.shape)
    return module


def build_shape_only(config: LlavaConfig, method: dict[str, Any] | None = None) -> PrunedLlava:
    """PrunedLlava of ``config`` with weightless parameters (built on ``meta``), for :class:`ShapeOnlyMode`.

    Args:
        config: LLaVA architecture.
        method: ``{"class_path": ..., "init_args": ...}`` of the pruning method, or None.
    """
    with torch.device("meta"):
        llava = adapter.build_from_config(config)
        pruned = PrunedLlava(llava, instantiate(method) if method else None)
    return zero_weights_(pruned)


def dummy_batch(config: LlavaConfig, text_tokens: int = 30, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """``batch_size`` x (1 image + ``text_tokens`` text tokens): one text token (BOS) first, the image, the rest.

    Returns:
        dict with input_ids, attention_mask (B, T) and pixel_values (B, C, H, W), zeros.
    """
    family = adapter.family_for(config)
    if hasattr(family, "dummy_batch"):  # dynamic resolution (Qwen2.5-VL): the family's documented image size
        return family.dummy_batch(config, text_tokens, batch_size)
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be >= 1 (the decision modules need a text key), got {text_tokens}")
    vc = config.vision_config
    n_vision = adapter.vision_dims(config).tokens_per_image
    text_id = 1 if config.image_token_id != 1 else 2
    row = [text_id] + [config.image_token_id] * n_vision + [text_id] * (text_tokens - 1)
    ids = torch.tensor([row] * batch_size)
    pixels = torch.zeros(batch_size, vc.num_channels, vc.image_size, vc.image_size)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def describe_input(config, text_tokens: int = 30) -> str:
    """What :func:`dummy_batch` feeds the model, for the printed convention (families with a variable
    image size say which size: ``family.dummy_description``)."""
    family = adapter.family_for(config)
    if hasattr(family, "dummy_description"):
        image = family.dummy_description(config)
    else:
        dims = adapter.vision_dims(config)
        image = f"1 image of {dims.image_size} x {dims.image_size} px ({dims.tokens_per_image} vision tokens)"
    return f"{image} + {text_tokens} text tokens, batch 1"


# -------------------------------------------------------------------------------------- counting
class _Counted(nn.Module):
    """forward_infer + LM head as ONE module call, so FlopCounterMode names submodules by their path."""

    def __init__(self, pruned: PrunedLlava, lm_head: str):
        super().__init__()
        self.pruned, self.lm_head = pruned, lm_head

    def forward(self, batch: dict[str, torch.Tensor], ratios):
        p = self.pruned
        images = {k: batch[k] for k in p.family.image_input_names if k in batch}  # e.g. Qwen's image_grid_thw
        out = p.forward_infer(
            batch["input_ids"],
            batch["pixel_values"],
            batch.get("attention_mask"),
            batch.get("prompt_mask"),
            ratios,
            **images,
        )
        if self.lm_head == "last":
            p.logits(out.hidden[:, -1:])  # the last slot is the last real token (DESIGN: left-packed)
        elif self.lm_head == "all":
            p.logits(out.hidden[out.state.valid])
        return out


def _component_flops(counts: dict[str, dict], wrapper: _Counted) -> dict[str, int]:
    """Sums FlopCounterMode's per-module counts into COMPONENTS (+ ``other`` and ``total``)."""
    names = {id(m): f"{type(wrapper).__name__}.{n}" for n, m in wrapper.named_modules() if n}
    llava = wrapper.pruned.llava
    modules = {**adapter.component_modules(llava), "pruners": wrapper.pruned.method}
    totals = {k: sum(v.values()) for k, v in counts.items()}
    out = dict.fromkeys(COMPONENTS, 0)
    prefixes = {comp: names[id(mod)] for comp, mod in modules.items() if mod is not None}
    under = lambda key, prefix: key == prefix or key.startswith(prefix + ".")  # noqa: E731
    for comp, prefix in prefixes.items():
        keys = [k for k in totals if under(k, prefix)]
        top = [k for k in keys if not any(a != k and k.startswith(a + ".") for a in keys)]  # no double counting
        # a part nested in another (Qwen2.5-VL's merger inside its vision tower) counts for itself only
        inner = [p for c, p in prefixes.items() if c != comp and p != prefix and under(p, prefix)]
        out[comp] = sum(totals[k] for k in top) - sum(totals.get(p, 0) for p in inner)
    out["total"] = totals.get("Global", 0)
    # FLOPs outside every module are the pruning method's own work (training-free methods score with
    # plain tensor ops and recomputed keys / attention rows: FastV, DivPrune, DART, PyramidDrop, VisionZip).
    out["pruners"] += out["total"] - sum(out[c] for c in COMPONENTS)
    out["other"] = out["total"] - sum(out[c] for c in COMPONENTS)
    return out


def count_forward(
    pruned: PrunedLlava,
    batch: dict[str, torch.Tensor],
    ratios: Sequence[float | None] | None = None,
    lm_head: str = "last",
    shape_only: bool = False,
):
    """FLOPs of one inference forward by component.

    Args:
        pruned: the model (``pruned.method`` None = unpruned).
        batch: input_ids, pixel_values, attention_mask (and optional prompt_mask).
        ratios: inference schedule (None = the method's default).
        lm_head: "last", "all" or "none" (see :data:`LM_HEAD_TEXT`).
        shape_only: run under :class:`ShapeOnlyMode` (weightless models; fixed-count methods only).

    Returns:
        ({component: FLOPs, "other", "total"}, the :class:`~lightning_lvp.model.InferOutput`).
    """
    if lm_head not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
    wrapper = _Counted(pruned, lm_head)
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS)
    with torch.no_grad(), shape_only_context(shape_only), counter:
        out = wrapper(batch, ratios)
    return _component_flops(counter.get_flop_counts(), wrapper), out


def all_vision_pruner_flops(
    pruned: PrunedLlava, n_vision: int, n_keys: int, batch_size: int = 1, shape_only: bool = False
) -> int:
    """FLOPs of every decision module scoring all ``n_vision`` original vision tokens (the paper's 0.71 T)."""
    decision = getattr(pruned.method, "decision", None)
    if not decision:
        raise ValueError("the 'all_vision' pruner convention needs decision modules (LVPruning)")
    like = next(decision.parameters())
    queries = torch.zeros(batch_size, n_vision, pruned.dims.hidden_size, dtype=like.dtype, device=like.device)
    keys = queries.new_zeros(batch_size, n_keys, pruned.dims.hidden_size)
    key_mask = torch.ones(batch_size, n_keys, dtype=torch.bool, device=like.device)
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS)
    with torch.no_grad(), shape_only_context(shape_only), counter:
        for module in decision:
            module(queries, keys, key_mask)
    return counter.get_total_flops()


def _row(schedule, flops: dict[str, int], base_total: int, out) -> dict[str, Any]:
    state = out.state
    b = state.valid.shape[0]
    runs: list[list[int]] = []  # [tokens, consecutive layers] (run-length over the decoder layers)
    for s in out.layer_stage:
        tokens = int(out.stage_valid[s].sum()) // b
        if runs and runs[-1][0] == tokens:
            runs[-1][1] += 1
        else:
            runs.append([tokens, 1])
    row = {
        "schedule": None if schedule is None else [None if r is None else float(r) for r in schedule],
        "tflops": flops["total"] / 1e12,
        "by_component": {c: flops[c] / 1e12 for c in (*COMPONENTS, "other")},
        "reduction": flops["total"] / base_total - 1.0,
        "kept_vision": [int(k.sum()) / b for k in out.kept_patches],
        "layer_tokens": runs,
    }
    return row


def count_schedules(
    pruned: PrunedLlava,
    batch: dict[str, torch.Tensor],
    schedules: Sequence[Sequence[float | None]],
    lm_head: str = "last",
    pruners: str = "alive",
    shape_only: bool = False,
) -> list[dict[str, Any]]:
    """FLOPs of the unpruned model and of ``pruned`` under each schedule, one JSON-able row each.

    Rows: ``schedule`` (None = unpruned), ``tflops``, ``by_component`` (TFLOPs), ``reduction``
    (tflops / unpruned - 1, the paper's "-62.1 %"), ``kept_vision`` per stage (mean per sample),
    ``layer_tokens`` ([tokens, layers] runs over the decoder layers, per sample). Per-sample FLOPs of a batch are the batch total / B.

    Args:
        pruners: "alive" or "all_vision" (see :data:`PRUNER_TEXT`).
        shape_only: see :func:`count_forward`; use False (a real model) for data-dependent methods.
    """
    if pruners not in PRUNER_CONVENTIONS:
        raise ValueError(f"pruners must be one of {PRUNER_CONVENTIONS}, got {pruners!r}")
    if shape_only and any(r is None for s in schedules for r in s):
        raise ValueError(
            "a schedule with None (data-dependent counts, e.g. CLS-knee) cannot be counted shape-only: "
            "count a real model on real inputs (count_schedules(..., shape_only=False))"
        )
    base, base_out = count_forward(PrunedLlava(pruned.llava, None), batch, None, lm_head, shape_only)
    rows = [_row(None, base, base["total"], base_out)]
    for schedule in schedules:
        flops, out = count_forward(pruned, batch, schedule, lm_head, shape_only)
        if pruners == "all_vision":
            n_vision = int(out.state.n_vision.max())
            text = batch["attention_mask"].bool() & (batch["input_ids"] != adapter.image_token_id(pruned.llava))
            n_keys = int(text.sum(1).max())
            extra = all_vision_pruner_flops(pruned, n_vision, n_keys, batch["input_ids"].shape[0], shape_only)
            flops["total"] += extra - flops["pruners"]
            flops["pruners"] = extra
        rows.append(_row(schedule, flops, base["total"], out))
    return rows


def count_config(
    config: LlavaConfig,
    method: dict[str, Any] | None,
    schedules: Sequence[Sequence[float]],
    text_tokens: int = 30,
    lm_head: str = "last",
    pruners: str = "alive",
) -> list[dict[str, Any]]:
    """:func:`count_schedules` for an architecture config (weightless, shape-only) on :func:`dummy_batch`."""
    pruned = build_shape_only(config, method)
    return count_schedules(pruned, dummy_batch(config, text_tokens), schedules, lm_head, pruners, shape_only=True)


def paper_tflops(schedule: Sequence[float] | None) -> float | None:
    """The paper's TFLOPs for a schedule of the 7B table (None if the schedule is not in it)."""
    key = () if schedule is None else tuple(round(float(r), 4) for r in schedule)
    return PAPER_TFLOPS.get(key)


# ------------------------------------------------------------------------------------------ table
def format_table(rows: list[dict[str, Any]], with_paper: bool) -> str:
    """Plain-text table of :func:`count_schedules` rows."""
    head = f"{'schedule':<22}{'TFLOPs':>8}{'change':>9}" + "".join(f"{c:>13}" for c in COMPONENTS)
    lines = [head + (f"{'paper':>16}" if with_paper else "")]
    for r in rows:
        name = "unpruned" if r["schedule"] is None else str(r["schedule"])
        change = "" if r["schedule"] is None else f"{100 * r['reduction']:+.1f}%"
        line = f"{name:<22}{r['tflops']:>8.3f}{change:>9}" + "".join(
            f"{r['by_component'][c]:>13.3f}" for c in COMPONENTS
        )
        if with_paper and r.get("paper_tflops") is not None:
            line += f"{r['paper_tflops']:>8.2f} ({100 * (r['tflops'] / r['paper_tflops'] - 1):+.1f}%)"
        lines.append(line)
    return "\n".join(lines)
