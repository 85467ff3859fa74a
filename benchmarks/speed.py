"""Real speed behind the FLOPs: prefill, decode, KV cache, training step, attention memory (not a test).

A random-weight LLaVA-shaped model where vision tokens dominate (1 image = 576 tokens at 336 px /
14 + 30 text tokens, a 16 x 512 Llama LLM with modules after layers 1, 4, 8: the paper's 1, 8, 16
of 32 scaled) on the CPU. Every number is the median of several runs in one process, the configs
interleaved run by run so drifting machine load hits all alike; ratios are printed beside the
absolute numbers. Results and the machine go to docs/BENCHMARKS.md.

    python benchmarks/speed.py                 # ~3 min (1 torch thread; --threads 2 on a quiet machine)
    python benchmarks/speed.py --quick         # fewer repeats, smoke run
    python benchmarks/speed.py --json out.json

Sections: (1) FLOPs per schedule (shape-only count of this very model); (2) prefill latency
(forward_infer with cache + first logits) and its ratio against the FLOPs ratio; (3) decode
tokens/s for 64 new tokens (generate(65) - generate(1)); (4) KV-cache bytes after prefill against
the kept token-layers; (5) masked training step (LVPruning forward_train + ratio loss, backward)
against a plain frozen forward + backward (same model, no method, SDPA, gradients to the
projector); (6) peak memory of one attention call, eq. 9 masked vs plain SDPA, forward + backward;
(7) dispatched-op counts of forward_infer for 576 vs 144 vision tokens (no per-token loops);
(0, first) transformers' own ``generate()`` on the unpruned LLaVA against ours (HF ``generate()``
over the PrunedCache, lightning_lvp/generation.py) unpruned and at rho 0.5, batch 1 and 8, 32 new
tokens (``--only_hf`` runs just this).

LLaVA-NeXT case (``--only_next`` runs just it; ``--next_repeats 0`` skips it): the same LLM and tower
behind llava-v1.6's anyres input -- ONE 672 x 672 px image = base view + 2 x 2 crops of 336 px (the
pinpoints of lightning_lvp/configs/llava-v1.6-vicuna-7b-hf.json) = 2,880 vision + 48 image_newline
tokens (kept as structure), + 64 text tokens; prefill latency unpruned vs rho 0.5 ([0.5, 0.3, 0.1]
after layers 1, L/4, L/2) interleaved in one process, against the project's FLOPs count of the same
forward (one convention: lightning_lvp/flops.py, attention counted over the full T_q x T_k).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_lvp import adapter
from lightning_lvp import flops as F
from lightning_lvp.attention import masked_attention_reference, masked_softmax_attention
from lightning_lvp.decision import ratio_loss
from lightning_lvp.methods import LVPruning
from lightning_lvp.model import PrunedLlava
from lightning_lvp.schedules import PAPER_RHOS, paper_schedule
from lightning_lvp.state import causal_mask
from lightning_lvp.tiny import TinyLlavaSpec, tiny_llava_config, tiny_llava_next_config

NEXT_CONFIG = os.path.join(os.path.dirname(F.__file__), "configs", "llava-v1.6-vicuna-7b-hf.json")
NEXT_SIDE = 672  # px: the FLOPs image of docs/FAMILIES.md (5 views, 2,880 vision tokens)


def schedule_of(rho: float, stages: int = 3) -> list[float]:
    """The paper's [rho, rho - 0.2, rho - 0.4] (:func:`lightning_lvp.schedules.paper_schedule`)."""
    return paper_schedule(rho, stages)


def bench_spec(layers: int, hidden: int) -> TinyLlavaSpec:
    """LLaVA-1.5 proportions at CPU size: 336 px / 14 (576 patches), MLP ratio 11008/4096, 64-dim heads."""
    return TinyLlavaSpec(
        vocab_size=32064,
        hidden_size=hidden,
        intermediate_size=round(hidden * 11008 / 4096),
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=hidden // 64,
        vision_hidden_size=256,
        vision_intermediate_size=1024,
        vision_layers=4,
        vision_heads=4,
        image_size=336,
        patch_size=14,
        image_token_id=32000,
        pad_token_id=32001,
        vision_feature_layer=-2,
        max_position_embeddings=4096,
    )


def bench_batch(config, text_tokens: int = 30, answer_tokens: int = 0, batch_size: int = 1, seed: int = 0):
    """1 image + text (random ids, random pixels); the last ``answer_tokens`` text tokens are labels."""
    g = torch.Generator().manual_seed(seed)
    batch = F.dummy_batch(config, text_tokens, batch_size)
    ids = batch["input_ids"]
    text = ids != config.image_token_id
    high = min(config.text_config.vocab_size, config.image_token_id)  # ordinary text ids below the image token
    ids[text] = torch.randint(3, high, (int(text.sum()),), generator=g)
    batch["pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=g)
    if answer_tokens:
        answer = torch.zeros_like(text)
        answer[:, -answer_tokens:] = True
        batch["labels"] = torch.where(answer, ids, -100)
        batch["prompt_mask"] = text & ~answer
    return batch


def next_bench_config(layers: int, hidden: int):
    """LLaVA-NeXT-7B proportions at CPU size: :func:`bench_spec`'s LLM and tower (one view = 336 px / 14)
    with llava-v1.6-vicuna-7b's anyres ``image_grid_pinpoints`` (read from the shipped config)."""
    with open(NEXT_CONFIG) as f:
        pinpoints = json.load(f)["image_grid_pinpoints"]
    return tiny_llava_next_config(bench_spec(layers, hidden), grid_pinpoints=pinpoints)


def next_vision_tokens(config) -> int:
    """Prunable vision tokens of the NeXT image (newline tokens are structure under the default policy)."""
    from lightning_lvp.families.llava_next import NEWLINE, LlavaNextFamily

    layout = LlavaNextFamily().layouts(config, [(NEXT_SIDE, NEXT_SIDE)])[0]
    return int((layout[:, 0] != NEWLINE).sum())


def next_bench_batch(config, text_tokens: int = 64, seed: int = 0) -> dict:
    """One 672 x 672 px image (5 views: 2,880 vision + 48 newline tokens) + ``text_tokens`` random text ids."""
    from lightning_lvp.families import family_for

    batch = family_for(config).dummy_batch(config, text_tokens, 1, side=NEXT_SIDE)
    g = torch.Generator().manual_seed(seed)
    ids = batch["input_ids"]
    text = ids != config.image_token_id
    high = min(config.text_config.vocab_size, config.image_token_id)
    ids[text] = torch.randint(3, high, (int(text.sum()),), generator=g)
    batch["pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=g)
    return batch


def next_case(layers: int, hidden: int, text_tokens: int, rho: float = 0.5, num_heads: int = 8):
    """The NeXT model, its pruned / unpruned wrappers, the batch, the schedules and their FLOPs rows.

    Returns:
        dict with ``config``, ``models`` ({"base", f"rho{rho}"} -> PrunedVLM), ``schedules`` (None for
        base), ``batch`` and ``flops`` (:func:`lightning_lvp.flops.count_schedules` rows, shape-only).
    """
    config = next_bench_config(layers, hidden)
    after = [1, layers // 4, layers // 2]
    ratios = schedule_of(rho)
    method = LVPruning(after_layers=after, keep_ratios=ratios, train_ratios=ratios, num_heads=num_heads)
    llava = adapter.build_from_config(config)
    pruned, base = PrunedLlava(llava, method).eval(), PrunedLlava(llava, None).eval()
    batch = next_bench_batch(config, text_tokens)
    flops_rows = F.count_schedules(pruned, batch, [ratios], shape_only=True)
    name = f"rho{rho:g}"
    return {
        "config": config,
        "after_layers": after,
        "models": {"base": base, name: pruned},
        "schedules": {"base": None, name: ratios},
        "batch": batch,
        "flops": dict(zip(["base", name], flops_rows)),
    }


PARTS = ("merge", "layers", "pruners")  # timed parts of a prefill (ComponentTimer), the rest is "other"
FLOPS_PARTS = {"merge": ("vision_tower", "projector"), "layers": ("llm",), "pruners": ("pruners",)}


class ComponentTimer:
    """Wall time a prefill spends in the family's ``merge`` (vision tower on every view, projector, embedding,
    layout), its decoder layers (``run_layer``) and the method's pruning steps (``apply``: scoring + gathers).

    Wraps those three callables on the given objects (instance attributes, removed on exit); ``record(fn)``
    returns ``fn`` timed part by part, each call appending ``{part: s, "total": s, "cpu": s}`` to
    ``self.runs[key]`` ("cpu": CPU seconds of the calling thread, ``time.thread_time``: with ONE torch thread
    all the work runs there, and the time the scheduler gives other jobs is not in it).
    """

    def __init__(self, family, methods):
        self.family, self.methods = family, [m for m in methods if m is not None]
        self.current: dict[str, float] = {}
        self.runs: dict[str, list[dict[str, float]]] = {}

    def _wrap(self, fn, part: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[part] = self.current.get(part, 0.0) + time.perf_counter() - t0

        return timed

    def __enter__(self):
        self.family.merge = self._wrap(self.family.merge, "merge")
        self.family.run_layer = self._wrap(self.family.run_layer, "layers")
        for m in self.methods:
            m.apply = self._wrap(m.apply, "pruners")
        return self

    def __exit__(self, *exc):
        del self.family.merge, self.family.run_layer
        for m in self.methods:
            del m.apply

    def record(self, key: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            self.current = {}
            c0, t0 = time.thread_time(), time.perf_counter()
            out = fn()
            total, cpu = time.perf_counter() - t0, time.thread_time() - c0
            parts = {p: self.current.get(p, 0.0) for p in PARTS}
            self.runs.setdefault(key, []).append({**parts, "total": total, "cpu": cpu})
            return out

        return run


def breakdown(runs: list[dict[str, float]], warmup: int = 1) -> dict[str, float]:
    """Median seconds per part (and "other" = total - parts) over the timed runs (after ``warmup``)."""
    timed = runs[warmup:]
    out = {p: med([r[p] for r in timed]) for p in (*PARTS, "total")}
    out["other"] = med([r["total"] - sum(r[p] for p in PARTS) for r in timed])
    return out


def attention_flops(layer_tokens: list[list[int]], hidden: int) -> float:
    """The counter's attention FLOPs (full T_q x T_k scores: 4 T^2 d per layer) of a row's ``layer_tokens``."""
    return float(sum(4 * t * t * hidden * n for t, n in layer_tokens))


def sdpa_causal_fraction(lengths: list[int], heads: int, head_dim: int = 64, repeats: int = 5) -> dict[int, float]:
    """Time of SDPA's causal path over its full-square path, per sequence length (fastest of ``repeats``).

    The FLOPs convention counts every score; a causal kernel may skip blocks above the diagonal, and how
    many it skips depends on the length (its block size).
    """
    out = {}
    for t in lengths:
        q, k, v = (torch.randn(1, heads, t, head_dim) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fns = {"causal": lambda: sdpa(q, k, v, is_causal=True), "full": lambda: sdpa(q, k, v)}  # noqa: B023
        times = interleaved_times(fns, repeats)
        out[t] = min(times["causal"]) / min(times["full"])
    return out


def next_benchmark(args) -> dict:
    """Prefill latency of the NeXT case, unpruned vs rho 0.5, interleaved, against the FLOPs ratio."""
    case = next_case(args.layers, args.hidden, args.next_text_tokens)
    batch, models, schedules = case["batch"], case["models"], case["schedules"]
    n_img = int((batch["input_ids"] == case["config"].image_token_id).sum())
    family = models["base"].family
    with ComponentTimer(family, [m.method for m in models.values()]) as timer:
        fns = {k: timer.record(k, prefill_fn(models[k], batch, s)) for k, s in schedules.items()}
        times = interleaved_times(fns, args.next_repeats)
    base_flops = case["flops"]["base"]["tflops"]
    base_parts = breakdown(timer.runs["base"])
    rows = []
    for name in schedules:
        f = case["flops"][name]
        parts = breakdown(timer.runs[name])
        part_flops = {p: sum(f["by_component"][c] for c in cs) for p, cs in FLOPS_PARTS.items()}
        base_part_flops = {
            p: sum(case["flops"]["base"]["by_component"][c] for c in cs) for p, cs in FLOPS_PARTS.items()
        }
        row = {
            "parts_s": parts,
            "parts_gflops": {p: v * 1e3 for p, v in part_flops.items()},
            "layers_time_ratio": parts["layers"] / base_parts["layers"],
            "layers_flops_ratio": part_flops["layers"] / base_part_flops["layers"],
            "schedule": name,
            "gflops": f["tflops"] * 1e3,
            "flops_ratio": f["tflops"] / base_flops,
            "kept_vision": f["kept_vision"],
            "layer_tokens": f["layer_tokens"],
            "prefill_s": med(times[name]),
            "prefill_runs_s": times[name],
        }
        row["prefill_ratio"] = row["prefill_s"] / med(times["base"])
        row["paired_prefill_ratio"] = med([t / b for t, b in zip(times[name], times["base"])])
        row["percent_of_flops_speedup"] = 100 * row["flops_ratio"] / row["prefill_ratio"]
        # other jobs only ever ADD time: the fastest run of each is the least disturbed estimate
        row["min_prefill_ratio"] = min(times[name]) / min(times["base"])
        row["percent_of_flops_speedup_min"] = 100 * row["flops_ratio"] / row["min_prefill_ratio"]
        # thread CPU time (1 torch thread): what a core spent on the prefill, without the time other jobs held it
        cpu, base_cpu = [r["cpu"] for r in timer.runs[name][1:]], [r["cpu"] for r in timer.runs["base"][1:]]
        row["prefill_cpu_s"] = med(cpu)
        row["cpu_ratio"] = med(cpu) / med(base_cpu)
        row["paired_cpu_ratio"] = med([c / b for c, b in zip(cpu, base_cpu)])
        row["percent_of_flops_speedup_cpu"] = 100 * row["flops_ratio"] / row["paired_cpu_ratio"]
        rows.append(row)
        print(
            f"[next prefill] {name}: {row['prefill_s']:.3f} s, FLOPs ratio {row['flops_ratio']:.3f}, "
            f"parts {json.dumps({k: round(v, 3) for k, v in parts.items()})} s",
            flush=True,
        )
    # what the prediction would be if the causal kernel computed exactly half of every layer's scores
    base_row = case["flops"]["base"]
    half = {
        name: case["flops"][name]["tflops"] * 1e12
        - attention_flops(case["flops"][name]["layer_tokens"], args.hidden) / 2
        for name in schedules
    }
    for row in rows:
        row["flops_ratio_causal_half"] = half[row["schedule"]] / half["base"]
    lengths = sorted({t for r in rows for t, _ in r["layer_tokens"]}, reverse=True)
    causal = sdpa_causal_fraction(lengths, args.hidden // 64) if args.next_repeats > 1 else {}
    print(
        f"[next] SDPA causal / full-square time per length: {json.dumps({k: round(v, 2) for k, v in causal.items()})}"
    )
    return {
        "sdpa_causal_over_full": causal,
        "base_layer_tokens": base_row["layer_tokens"],
        "model": {
            "llm_layers": args.layers,
            "hidden": args.hidden,
            "after_layers": case["after_layers"],
            "image": f"{NEXT_SIDE} x {NEXT_SIDE} px",
            "image_tokens": n_img,
            "vision_tokens": next_vision_tokens(case["config"]),
            "text_tokens": args.next_text_tokens,
            "sequence": int(batch["input_ids"].shape[1]),
        },
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------- timing
def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds per call of each fn, the fns interleaved run by run (after ``warmup`` untimed rounds)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def image_inputs(model: PrunedLlava, batch) -> dict:
    """The family's extra image inputs of ``batch`` (LLaVA-NeXT: ``image_sizes``)."""
    return {k: batch[k] for k in model.family.image_input_names if k in batch}


def prefill_fn(model: PrunedLlava, batch, ratios):
    """Prefill as generate() does it: token-removing forward building the KV cache + first-token logits."""
    images = image_inputs(model, batch)

    def run():
        with torch.no_grad():
            out = model.forward_infer(
                batch["input_ids"],
                batch["pixel_values"],
                batch["attention_mask"],
                None,
                ratios,
                use_cache=True,
                **images,
            )
            return model.logits(out.hidden[:, -1:])

    return run


def generate_fn(model: PrunedLlava, batch, ratios, new_tokens: int):
    def run():
        return model.generate(
            batch["input_ids"],
            batch["pixel_values"],
            batch["attention_mask"],
            ratios=ratios,
            max_new_tokens=new_tokens,
            eos_token_id=-1,
        )

    return run


def hf_generate_fn(llava, batch, new_tokens: int):
    """transformers' own ``LlavaForConditionalGeneration.generate`` (greedy, no eos), the reference."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run():
        return llava.generate(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            generation_config=cfg,
        )

    return run


def hf_comparison(config, llava, base, pruned, batch_sizes, new_tokens: int, repeats: int) -> list[dict]:
    """HF ``generate()`` unpruned vs ours (same HF generate over the PrunedCache) unpruned and pruned.

    Same process, the three interleaved run by run; returns one row per batch size with medians.
    """
    llava.generation_config.eos_token_id = None  # decode exactly new_tokens everywhere
    rows = []
    for b in batch_sizes:
        batch = bench_batch(config, 30, batch_size=b)
        fns = {
            "hf_unpruned": hf_generate_fn(llava, batch, new_tokens),
            "ours_unpruned": generate_fn(base, batch, None, new_tokens),
            **{f"ours_rho{r:g}": generate_fn(pruned, batch, schedule_of(r), new_tokens) for r in (0.5,)},
        }
        hf_new = fns["hf_unpruned"]()[:, batch["input_ids"].shape[1] :]
        same = torch.equal(hf_new, fns["ours_unpruned"]())
        times = interleaved_times(fns, repeats)
        hf = med(times["hf_unpruned"])
        row = {
            "batch": b,
            "new_tokens": new_tokens,
            "same_tokens_unpruned": same,
            **{f"{k}_s": med(v) for k, v in times.items()},
            "runs_s": times,
        }
        row["ours_unpruned_over_hf"] = row["ours_unpruned_s"] / hf
        row["paired_ours_unpruned_over_hf"] = med([o / h for o, h in zip(times["ours_unpruned"], times["hf_unpruned"])])
        row["speedup_rho0.5_vs_hf"] = hf / row["ours_rho0.5_s"]
        print(
            f"[hf generate] {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != 'runs_s'})}",
            flush=True,
        )
        rows.append(row)
    return rows


def kv_bytes(model: PrunedLlava, batch, ratios) -> int:
    with torch.no_grad():
        out = model.forward_infer(
            batch["input_ids"], batch["pixel_values"], batch["attention_mask"], None, ratios, use_cache=True
        )
    return adapter.cache_bytes(out.cache)


def kv_expected(config, n_vision: int, n_text: int, after_layers, ratios, dtype_bytes: int, batch: int = 1) -> int:
    """Bytes of K and V for the kept token-layers: sum_i T_i x 2 x kv_heads x head_dim x bytes."""
    dims = adapter.text_dims(config)
    ratios = ratios or [1.0] * len(after_layers)
    tokens = F.tokens_per_layer(n_vision, n_text, after_layers, ratios, dims.num_layers)
    return batch * sum(tokens) * 2 * dims.num_kv_heads * dims.head_dim * dtype_bytes


def train_step_fns(llava, method: LVPruning, batch, tau: float = 1.0):
    """(masked, plain) closures: one forward + backward each (no optimizer step)."""
    masked_model = PrunedLlava(llava, method).train()
    plain_model = PrunedLlava(llava, None)
    projector = adapter.component_modules(llava)["projector"]
    targets = torch.tensor(method.train_ratios)
    args = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["prompt_mask"], batch["labels"])

    def masked():
        out = masked_model.forward_train(*args, tau=tau)
        (out.loss_causal + ratio_loss(out.kept, targets)).backward()
        method.zero_grad(set_to_none=True)

    def plain():
        projector.requires_grad_(True)  # something upstream of the whole LLM must want a gradient
        try:
            plain_model.forward_train(*args).loss_causal.backward()
        finally:
            projector.zero_grad(set_to_none=True)
            projector.requires_grad_(False)

    return masked, plain


# ------------------------------------------------------------------------------- attention memory
class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes held by tensors created inside the context (every aten op, forward and backward).

    Storage lifetimes are followed with weak references; storages that existed before the context
    (inputs, views of them) are not counted, nor workspace a fused kernel frees before it returns.
    """

    def __enter__(self):
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        if func.is_view or func._schema.is_mutable:  # no new storage (a view may alias an outside tensor)
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Runs ``fn`` and returns its output and the bytes autograd saved for backward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def attention_memory(b: int, h: int, t: int, dh: int, n_vision: int) -> list[dict]:
    """Peak live and saved bytes of one attention layer, forward + backward, three implementations."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, dh, generator=g) for _ in range(3))
    base = causal_mask(torch.ones(b, t, dtype=torch.bool), t)  # (B, 1, T, T)
    keep = torch.ones(b, t)
    keep[:, 1 : 1 + n_vision] = (torch.rand(b, n_vision, generator=g) < 0.5).float()  # eq. 7 decisions
    scale = dh**-0.5
    impls = {
        "plain SDPA (causal bool mask)": lambda q, k, v, d: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=base, scale=scale
        ),
        "eq. 9 masked (lightning_lvp.attention)": lambda q, k, v, d: masked_softmax_attention(q, k, v, base, d, scale),
        "eq. 9 literal reference": lambda q, k, v, d: masked_attention_reference(q, k, v, base, d, scale),
    }
    tt = b * h * t * t * 4  # one (B, H, T, T) fp32 tensor
    rows = []
    for name, fn in impls.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        d = keep.clone().requires_grad_("SDPA" not in name)
        with PeakLiveBytes() as mem:
            out, saved = saved_bytes(lambda: fn(*leaves, d))  # noqa: B023
            out.square().sum().backward()
        rows.append(
            {
                "impl": name,
                "peak_bytes": mem.peak,
                "saved_bytes": saved,
                "peak_in_BHTT": mem.peak / tt,
                "saved_in_BHTT": saved / tt,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------- ops
class OpCounter(TorchDispatchMode):
    def __enter__(self):
        self.n = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def op_counts(layers: int, hidden: int, method_args: dict, ratios) -> dict[str, int]:
    """aten ops dispatched by one pruned forward_infer (shape-only) for 576 and 144 vision tokens."""
    counts = {}
    for image_size in (336, 168):
        config = tiny_llava_config(bench_spec(layers, hidden), image_size=image_size)
        model = F.build_shape_only(config, {"class_path": "lightning_lvp.methods.LVPruning", "init_args": method_args})
        batch = F.dummy_batch(config, 30)
        with torch.no_grad(), F.shape_only_context(True), OpCounter() as c:
            model.forward_infer(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], None, ratios)
        counts[f"{(image_size // 14) ** 2} vision tokens"] = c.n
    return counts


# ------------------------------------------------------------------------------------------ main
def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only_next:
        report = {"machine": machine(), "model": {"llm_layers": args.layers, "hidden": args.hidden}}
        report["machine"]["load_avg_start"] = report["machine"].pop("load_avg_1_5_15")
        report["next"] = next_benchmark(args)
        report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        return report
    spec = bench_spec(args.layers, args.hidden)
    config = tiny_llava_config(spec)
    after = [1, args.layers // 4, args.layers // 2]
    method_args = {
        "after_layers": after,
        "keep_ratios": [0.5, 0.3, 0.1],
        "train_ratios": [0.5, 0.3, 0.1],
        "num_heads": 8,
    }
    llava = adapter.build_from_config(config)
    method = LVPruning(**method_args)
    pruned, base = PrunedLlava(llava, method), PrunedLlava(llava, None)
    schedules = {"base": None, **{f"rho{r:g}": schedule_of(r) for r in PAPER_RHOS}}
    models = {k: (base if s is None else pruned) for k, s in schedules.items()}
    batch = bench_batch(config, 30)
    report: dict = {
        "machine": machine(),
        "model": {"llm_layers": args.layers, "hidden": args.hidden, "after_layers": after},
    }
    report["machine"]["load_avg_start"] = report["machine"].pop("load_avg_1_5_15")
    if args.hf_batches:
        batches = [int(b) for b in args.hf_batches.split(",")]
        report["hf_generate"] = hf_comparison(config, llava, base, pruned, batches, args.hf_new_tokens, args.hf_repeats)
    if args.only_hf:
        report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        return report

    rows = F.count_schedules(pruned, batch, [s for s in schedules.values() if s], shape_only=True)
    flops = {name: row["tflops"] * 1e12 for name, row in zip(schedules, rows)}
    print(f"[flops] {json.dumps({k: round(v / 1e9, 2) for k, v in flops.items()})} GFLOPs", flush=True)

    pre = interleaved_times({k: prefill_fn(models[k], batch, s) for k, s in schedules.items()}, args.repeats)
    print(f"[prefill] {json.dumps({k: round(med(v), 3) for k, v in pre.items()})} s", flush=True)

    gen = {}
    for n in (1, args.new_tokens + 1):
        fns = {k: generate_fn(models[k], batch, s, n) for k, s in schedules.items()}
        gen[n] = interleaved_times(fns, args.decode_repeats)
    decode = {k: args.new_tokens / (med(gen[args.new_tokens + 1][k]) - med(gen[1][k])) for k in schedules}
    print(f"[decode] {json.dumps({k: round(v, 1) for k, v in decode.items()})} tokens/s", flush=True)

    kv = {
        k: (
            kv_bytes(models[k], batch, s),
            kv_expected(config, adapter.vision_dims(config).tokens_per_image, 30, after, s, 4),
        )
        for k, s in schedules.items()
    }

    train_batch = bench_batch(config, 30, answer_tokens=10)
    masked, plain = train_step_fns(llava, method, train_batch)
    train = interleaved_times({"plain": plain, "masked": masked}, args.train_repeats)
    print(f"[train] {json.dumps({k: round(med(v), 3) for k, v in train.items()})} s", flush=True)

    attn = attention_memory(1, args.hidden // 64, 606, 64, 576)
    ops = op_counts(args.layers, args.hidden, method_args, schedule_of(0.5))
    if args.next_repeats:
        report["next"] = next_benchmark(args)
    report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["rows"] = [
        {
            "schedule": name,
            "gflops": flops[name] / 1e9,
            "flops_ratio": flops[name] / flops["base"],
            "prefill_s": med(pre[name]),
            "prefill_ratio": med(pre[name]) / med(pre["base"]),
            "prefill_runs_s": pre[name],
            "decode_tok_s": decode[name],
            "decode_speedup": decode[name] / decode["base"],
            "kv_bytes": kv[name][0],
            "kv_expected_bytes": kv[name][1],
        }
        for name in schedules
    ]
    report["train"] = {k: {"median_s": med(v), "runs_s": v} for k, v in train.items()}
    report["train"]["ratio_masked_over_plain"] = med(train["masked"]) / med(train["plain"])
    report["train"]["median_paired_ratio"] = med([m / p for m, p in zip(train["masked"], train["plain"])])
    report["attention_memory"] = attn
    report["op_counts_rho0.5"] = ops
    return report


def print_hf(rows: list[dict]) -> None:
    print(
        "\n| batch | new tokens | HF generate() unpruned | ours unpruned | ours / HF (median of paired) | ours rho 0.5 | speed-up vs HF unpruned | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['batch']} | {x['new_tokens']} | {x['hf_unpruned_s']:.3f} s | {x['ours_unpruned_s']:.3f} s | "
            f"{x['ours_unpruned_over_hf']:.3f} ({x['paired_ours_unpruned_over_hf']:.3f}) | {x['ours_rho0.5_s']:.3f} s | "
            f"{x['speedup_rho0.5_vs_hf']:.2f}x | {'yes' if x['same_tokens_unpruned'] else 'NO'} |"
        )


def print_next(n: dict) -> None:
    m = n["model"]
    print(
        f"\nLLaVA-NeXT case: {m['image']}, {m['image_tokens']} image tokens ({m['vision_tokens']} vision + "
        f"{m['image_tokens'] - m['vision_tokens']} newline), {m['text_tokens']} text tokens, LLM {m['llm_layers']} x "
        f"{m['hidden']}, pruning after {m['after_layers']}"
    )
    print(
        "\n| schedule | GFLOPs | FLOPs ratio | prefill s (median) | prefill ratio (median of paired) | % of FLOPs "
        "speed-up | fastest-run ratio | % (fastest runs) | thread CPU s | CPU ratio (paired) | % (CPU, paired) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in n["rows"]:
        print(
            f"| {x['schedule']} | {x['gflops']:.1f} | {x['flops_ratio']:.3f} | {x['prefill_s']:.3f} | "
            f"{x['prefill_ratio']:.3f} ({x['paired_prefill_ratio']:.3f}) | {x['percent_of_flops_speedup']:.0f} % | "
            f"{x['min_prefill_ratio']:.3f} | {x['percent_of_flops_speedup_min']:.0f} % | {x['prefill_cpu_s']:.3f} | "
            f"{x['cpu_ratio']:.3f} ({x['paired_cpu_ratio']:.3f}) | {x['percent_of_flops_speedup_cpu']:.0f} % |"
        )
    print("\n| schedule | part | GFLOPs | seconds (median) | GFLOP/s |")
    print("|---|---|---|---|---|")
    for x in n["rows"]:
        for p in (*PARTS, "other"):
            g = x["parts_gflops"].get(p)
            sec = x["parts_s"][p]
            rate = f"{g / sec:.0f}" if g and sec else ""
            print(f"| {x['schedule']} | {p} | {'' if g is None else f'{g:.1f}'} | {sec:.3f} | {rate} |")
    for x in n["rows"][1:]:
        print(
            f"{x['schedule']}: decoder layers alone: time ratio {x['layers_time_ratio']:.3f} vs FLOPs ratio "
            f"{x['layers_flops_ratio']:.3f} ({100 * x['layers_flops_ratio'] / x['layers_time_ratio']:.0f} %); "
            f"FLOPs ratio if causal attention cost half its scores: {x['flops_ratio_causal_half']:.3f}"
        )
    if n.get("sdpa_causal_over_full"):
        print(f"SDPA causal / full-square time by length: {n['sdpa_causal_over_full']}")


def print_report(r: dict) -> None:
    m = r["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"load avg start {m['load_avg_start']} end {m['load_avg_end']}"
    )
    print(f"model: {r['model']}")
    if "hf_generate" in r:
        print_hf(r["hf_generate"])
    if "next" in r:
        print_next(r["next"])
    if "rows" not in r:
        return
    print(
        "\n| schedule | GFLOPs | FLOPs ratio | prefill s | prefill ratio | % of FLOPs speed-up | decode tok/s | decode speed-up | KV MB | KV = kept token-layers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        print(
            f"| {x['schedule']} | {x['gflops']:.1f} | {x['flops_ratio']:.3f} | {x['prefill_s']:.3f} | {x['prefill_ratio']:.3f} | "
            f"{100 * x['flops_ratio'] / x['prefill_ratio']:.0f} % | {x['decode_tok_s']:.1f} | {x['decode_speedup']:.2f}x | "
            f"{x['kv_bytes'] / 2**20:.2f} | {'yes' if x['kv_bytes'] == x['kv_expected_bytes'] else 'NO'} |"
        )
    t = r["train"]
    print(
        f"\ntraining fwd+bwd: plain {t['plain']['median_s']:.3f} s, masked {t['masked']['median_s']:.3f} s, "
        f"ratio of medians {t['ratio_masked_over_plain']:.2f}, median of paired ratios {t['median_paired_ratio']:.2f}"
    )
    print("\n| attention, fwd+bwd | peak live MB | in (B,H,T,T) fp32 | saved for backward MB | in (B,H,T,T) |")
    print("|---|---|---|---|---|")
    for a in r["attention_memory"]:
        print(
            f"| {a['impl']} | {a['peak_bytes'] / 2**20:.1f} | {a['peak_in_BHTT']:.2f} | {a['saved_bytes'] / 2**20:.1f} | {a['saved_in_BHTT']:.2f} |"
        )
    print(f"\nops dispatched by forward_infer at rho 0.5: {r['op_counts_rho0.5']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16, help="LLM layers (modules after 1, L/4, L/2)")
    p.add_argument("--hidden", type=int, default=512, help="LLM hidden size (64-dim heads)")
    p.add_argument("--repeats", type=int, default=7, help="timed prefill runs per schedule")
    p.add_argument(
        "--decode_repeats", "--decode-repeats", type=int, default=3, help="timed generate runs per schedule and length"
    )
    p.add_argument("--train_repeats", "--train-repeats", type=int, default=5, help="timed training steps per variant")
    p.add_argument("--new_tokens", "--new-tokens", type=int, default=64, help="decoded tokens")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (0 = torch's default; 1 is robust on a shared machine)"
    )
    p.add_argument(
        "--hf_batches", "--hf-batches", default="1,8", help="batch sizes of the HF generate() comparison ('' = skip it)"
    )
    p.add_argument(
        "--hf_new_tokens",
        "--hf-new-tokens",
        type=int,
        default=32,
        help="decoded tokens in the HF generate() comparison",
    )
    p.add_argument(
        "--hf_repeats",
        "--hf-repeats",
        type=int,
        default=3,
        help="timed runs per variant in the HF generate() comparison",
    )
    p.add_argument("--only_hf", "--only-hf", action="store_true", help="run only the HF generate() comparison")
    p.add_argument(
        "--next_repeats", type=int, default=5, help="timed prefill runs per schedule of the NeXT case (0 = skip it)"
    )
    p.add_argument("--next_text_tokens", type=int, default=64, help="text tokens of the NeXT case's prompt")
    p.add_argument("--only_next", action="store_true", help="run only the LLaVA-NeXT case")
    p.add_argument("--quick", action="store_true", help="2 repeats everywhere (smoke run)")
    p.add_argument("--json", help="also write the report as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = args.decode_repeats = args.train_repeats = args.hf_repeats = 2
        args.next_repeats = min(args.next_repeats, 2)
    t0 = time.time()
    report = run(args)
    report["wall_s"] = time.time() - t0
    print_report(report)
    print(f"\nwall time {report['wall_s']:.0f} s; command: python benchmarks/speed.py {' '.join(argv or sys.argv[1:])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
