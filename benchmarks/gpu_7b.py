"""LLaVA-1.5-7B shape, random bf16 weights, on a GPU: prefill, decode, KV cache, training step (not a test).

Same measurements as benchmarks/speed.py, on the true architecture (lightning_lvp/configs/
llava-1.5-7b-hf.json: CLIP ViT-L/14-336 + Llama-7B, 576 + 30 tokens) with LVPruning modules after
layers 1, 8, 16 (C = 4096, 8 heads): the unpruned model against rho 0.6 / 0.5 / 0.45. Random
weights: no download, and latency does not depend on the values (the kept counts are fixed).
Needs ~20 GB of GPU memory (~45 GB with --train).

    python benchmarks/gpu_7b.py --json gpu_7b.json          # on a CUDA machine, ~2-4 min
    python benchmarks/gpu_7b.py --device cpu --dtype float32 --model-config tiny.json \\
        --after-layers 1,2,3 --repeats 1 --decode-repeats 1 --train-repeats 1 --new-tokens 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import bench_batch, generate_fn, interleaved_times, kv_expected, med, prefill_fn, schedule_of, train_step_fns  # noqa: E402

from lightning_lvp import adapter  # noqa: E402
from lightning_lvp import flops as F  # noqa: E402
from lightning_lvp.methods import LVPruning  # noqa: E402
from lightning_lvp.model import PrunedLlava  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def build(config, after_layers: list[int], device: torch.device, dtype: torch.dtype):
    """Random-weight LLaVA + LVPruning directly on ``device`` (no CPU copy of 7 B parameters)."""
    torch.manual_seed(0)
    with torch.device(device):
        llava = adapter.build_from_config(config, dtype=dtype)
        method = LVPruning(
            after_layers=after_layers, keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=8
        )
        pruned = PrunedLlava(llava, method)
    method.to(device=device, dtype=dtype)
    return llava, method, pruned


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def peak_prefill_bytes(fn, device: torch.device) -> int | None:
    """Peak GPU memory above the resident weights during one prefill (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = F.resolve_model_config(args.model_config)
    after = [int(x) for x in args.after_layers.split(",")]
    llava, method, pruned = build(config, after, device, dtype)
    base = PrunedLlava(llava, None)
    schedules = {"base": None, **{f"rho{r:g}": schedule_of(r, len(after)) for r in args.rhos}}
    models = {k: (base if s is None else pruned) for k, s in schedules.items()}
    batch = to_device(bench_batch(config, args.text_tokens), device, dtype)
    n_vision = int((batch["input_ids"][0] == config.image_token_id).sum())
    counts = F.count_config(
        config,
        {"class_path": "lightning_lvp.methods.LVPruning", "init_args": method.init_args},
        [s for s in schedules.values() if s],
        args.text_tokens,
    )
    tflops = {k: row["tflops"] for k, row in zip(schedules, counts)}

    pre = interleaved_times({k: prefill_fn(models[k], batch, s) for k, s in schedules.items()}, args.repeats, 2, sync)
    print(f"[prefill] {json.dumps({k: round(med(v) * 1e3, 2) for k, v in pre.items()})} ms", flush=True)
    gen = {
        n: interleaved_times(
            {k: generate_fn(models[k], batch, s, n) for k, s in schedules.items()}, args.decode_repeats, 1, sync
        )
        for n in (1, args.new_tokens + 1)
    }
    decode = {k: args.new_tokens / (med(gen[args.new_tokens + 1][k]) - med(gen[1][k])) for k in schedules}
    rows = []
    for k, s in schedules.items():
        with torch.no_grad():
            out = models[k].forward_infer(
                batch["input_ids"], batch["pixel_values"], batch["attention_mask"], None, s, use_cache=True
            )
        rows.append(
            {
                "schedule": k,
                "tflops": tflops[k],
                "flops_ratio": tflops[k] / tflops["base"],
                "prefill_ms": med(pre[k]) * 1e3,
                "prefill_ratio": med(pre[k]) / med(pre["base"]),
                "prefill_runs_ms": [t * 1e3 for t in pre[k]],
                "decode_tok_s": decode[k],
                "decode_speedup": decode[k] / decode["base"],
                "kv_bytes": adapter.cache_bytes(out.cache),
                "kv_expected_bytes": kv_expected(
                    config, n_vision, args.text_tokens, after, s, torch.finfo(dtype).bits // 8
                ),
                "prefill_peak_bytes": peak_prefill_bytes(prefill_fn(models[k], batch, s), device),
            }
        )
        del out
    report = {
        "device": device_info(device),
        "model": args.model_config,
        "dtype": args.dtype,
        "after_layers": after,
        "rows": rows,
    }
    if args.train_repeats:
        train_batch = to_device(bench_batch(config, args.text_tokens, answer_tokens=10), device, dtype)
        masked, plain = train_step_fns(llava, method, train_batch)
        train = interleaved_times({"plain": plain, "masked": masked}, args.train_repeats, 1, sync)
        report["train"] = {k: {"median_s": med(v), "runs_s": v} for k, v in train.items()}
        report["train"]["ratio_masked_over_plain"] = med(train["masked"]) / med(train["plain"])
    return report


def print_report(r: dict) -> None:
    print(f"\ndevice: {r['device']}  dtype {r['dtype']}  model {r['model']}  modules after {r['after_layers']}")
    print(
        "| schedule | TFLOPs | FLOPs ratio | prefill ms | prefill ratio | decode tok/s | decode speed-up | KV MiB | KV = kept token-layers | prefill peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        peak = "-" if x["prefill_peak_bytes"] is None else f"{x['prefill_peak_bytes'] / 2**20:.0f}"
        print(
            f"| {x['schedule']} | {x['tflops']:.2f} | {x['flops_ratio']:.3f} | {x['prefill_ms']:.1f} | {x['prefill_ratio']:.3f} | "
            f"{x['decode_tok_s']:.1f} | {x['decode_speedup']:.2f}x | {x['kv_bytes'] / 2**20:.1f} | "
            f"{'yes' if x['kv_bytes'] == x['kv_expected_bytes'] else 'NO'} | {peak} |"
        )
    if "train" in r:
        t = r["train"]
        print(
            f"training fwd+bwd: plain {t['plain']['median_s']:.3f} s, masked {t['masked']['median_s']:.3f} s, "
            f"ratio {t['ratio_masked_over_plain']:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model-config", default="llava-hf/llava-1.5-7b-hf", help="hub id (shipped config), config.json or folder"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--after_layers", "--after-layers", default="1,8,16", help="LVPruning module positions")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.6, 0.5, 0.45], help="schedules [rho, rho-0.2, rho-0.4]")
    p.add_argument("--text_tokens", "--text-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=20, help="timed prefill runs per schedule")
    p.add_argument("--decode_repeats", "--decode-repeats", type=int, default=5)
    p.add_argument(
        "--train_repeats", "--train-repeats", type=int, default=5, help="0 = skip the training-step comparison"
    )
    p.add_argument("--new_tokens", "--new-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the report as JSON here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine (or --device cpu with a small --model-config for a smoke run)")
        return 2
    t0 = time.time()
    report = run(args)
    report["wall_s"] = time.time() - t0
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
