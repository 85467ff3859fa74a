"""Filters LLaVA-1.5's instruction mix to its image subset and checks every image (nanoGPT-style prepare script).

    python data/llava_mix/prepare.py \\
        --json data/llava_mix/llava_v1_5_mix665k.json --image-folder data/llava_mix/images

Reads the 665,298-entry ``llava_v1_5_mix665k.json``, drops the text-only entries (40,688 ShareGPT
conversations; the paper trains on the ~620k with an image) and entries that the data module would
refuse (no conversations, turns not alternating human/gpt, no or two ``<image>``, empty reply), checks
that every image exists and opens (``--decode`` decodes it fully, which also catches truncated files),
and writes:

- ``<json stem>_images.json``: the kept entries, in their original order (``data.train_json``);
- ``<json stem>_report.json``: counts per source folder (coco, gqa, ocr_vqa, textvqa, vg), dropped
  entries per reason, and the missing / unreadable files.

The rules are the data module's own (``lightning_lvp.data.llava_dataset``), so what this script keeps
is exactly what training accepts. See data/README.md for the downloads and the folder layout.

``--benchmark`` instead measures the data loader (lazy decoding in workers, pad-to-square, LLaVA-1.5's
336-px CLIP processing, tokenization, collation) in samples/s, on ``--json``/``--image-folder`` when
given, else on COCO-sized JPEGs made from scikit-learn's two sample photos (docs/DATA.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from lightning_lvp.data.llava_dataset import entry_problem, load_entries, open_rgb  # noqa: E402

SOURCES = ("coco", "gqa", "ocr_vqa", "textvqa", "vg")


def check_image(args: tuple[str, bool]) -> str | None:
    """None when the image is usable, else ``missing`` or ``unreadable: <error>``."""
    path, decode = args
    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        if decode:
            open_rgb(p)
        else:
            with Image.open(p) as image:
                image.verify()  # header and (for PNG) chunk checksums, without decoding the pixels
    except Exception as e:  # any PIL failure means the trainer could not use it either
        return f"unreadable: {type(e).__name__}: {e}"
    return None


def source_of(image: str) -> str:
    """The top folder of an image path (``coco/train2017/x.jpg`` -> ``coco``)."""
    head = Path(image).parts[0] if Path(image).parts else ""
    return head if head in SOURCES else f"other:{head}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="llava_v1_5_mix665k.json (or any LLaVA-format JSON/JSONL)")
    p.add_argument("--image-folder", default=None, help="folder holding coco/, gqa/, ocr_vqa/, textvqa/, vg/")
    p.add_argument("--out", default=None, help="subset JSON to write (default: <json stem>_images.json)")
    p.add_argument("--report", default=None, help="report JSON to write (default: <json stem>_report.json)")
    p.add_argument("--decode", action="store_true", help="decode every image fully (slower; catches truncation)")
    p.add_argument(
        "--workers", type=int, default=8, help="processes checking images (DataLoader workers with --benchmark)"
    )
    p.add_argument("--benchmark", action="store_true", help="measure the loader's samples/s instead of preparing")
    p.add_argument(
        "--processor",
        default=None,
        help="--benchmark: model folder with a LlavaProcessor (default: demo tokenizer + LLaVA-1.5's 336-px CLIP processing)",
    )
    p.add_argument("--samples", type=int, default=512, help="--benchmark: samples to load")
    p.add_argument("--batch-size", type=int, default=16, help="--benchmark: batch size")
    args = p.parse_args(argv)
    if not args.benchmark and (args.json is None or args.image_folder is None):
        p.error("--json and --image-folder are required (unless --benchmark)")
    return args


def llava15_processor(folder: str | None):
    """The processor of ``folder``, else the demo tokenizer with LLaVA-1.5's image processing (CLIP ViT-L/14 at 336 px)."""
    from transformers import AutoProcessor, CLIPImageProcessorPil

    from lightning_lvp.data.tokenizer import build_tiny_processor

    if folder:
        return AutoProcessor.from_pretrained(folder)
    processor = build_tiny_processor(image_size=336, patch_size=14)
    processor.image_processor = CLIPImageProcessorPil(  # openai/clip-vit-large-patch14-336's preprocessor_config.json
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return processor


def synthetic_entries(folder: Path, n: int) -> list[dict]:
    """``n`` LLaVA-style 2-turn entries over COCO-sized JPEGs (640x427) of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, array in enumerate(load_sample_images().images):
        for quality in (85, 95):  # distinct files so the OS cache is not all that is measured
            names.append(f"sample{i}_q{quality}.jpg")
            Image.fromarray(array).save(folder / names[-1], quality=quality)
    reply = " ".join(["The picture shows a building with trees in front of it and people walking by."] * 4)
    return [
        {
            "id": f"synthetic-{k}",
            "image": names[k % len(names)],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture? Describe it in detail."},
                {"from": "gpt", "value": reply},
                {"from": "human", "value": "Is it day or night?"},
                {"from": "gpt", "value": "It is day."},
            ],
        }
        for k in range(n)
    ]


def benchmark(args: argparse.Namespace) -> dict:
    """Samples/s of the data loader (decode + pad-to-square + CLIP processing + tokenize + collate)."""
    import tempfile

    import torch

    from lightning_lvp.data.collate import LlavaCollator, SkipCountingLoader
    from lightning_lvp.data.llava_dataset import LlavaDataset, filter_entries

    processor = llava15_processor(args.processor)
    tmp = tempfile.TemporaryDirectory()
    if args.json:
        entries, _ = filter_entries(load_entries(args.json), args.json, policy="skip")
        folders = [args.image_folder]
    else:
        entries, folders = synthetic_entries(Path(tmp.name), args.samples), [tmp.name]
    entries = (entries * (args.samples // max(1, len(entries)) + 1))[: args.samples]
    dataset = LlavaDataset(entries, folders, processor, policy="skip")
    loader = SkipCountingLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=LlavaCollator(processor.tokenizer.pad_token_id),
    )
    torch.set_num_threads(1)
    iterator = iter(loader)
    first = next(iterator)  # worker start-up is not counted
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["ids"])
    seconds = time.perf_counter() - start
    result = {
        "samples_per_s": round(count / seconds, 1),
        "samples": count,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "pixel_values": list(first["pixel_values"].shape[1:]),
        "tokens_per_sample": first["input_ids"].shape[1],
        "image_tokens": int(first["vision_mask"][0].sum()),
    }
    print(json.dumps(result))
    tmp.cleanup()
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.benchmark:
        return benchmark(args)
    src = Path(args.json)
    out = Path(args.out or src.with_name(src.stem + "_images.json"))
    report_path = Path(args.report or src.with_name(src.stem + "_report.json"))
    start = time.time()
    entries = load_entries(src)
    dropped: Counter = Counter()
    candidates = []
    for e in entries:
        reason = entry_problem(e)
        if reason is None:
            candidates.append(e)
        else:
            dropped[reason] += 1
    folder = Path(args.image_folder)
    jobs = [(str(folder / e["image"]), args.decode) for e in candidates]
    if args.workers <= 1:
        results = [check_image(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(check_image, jobs, chunksize=256))
    per_source: dict[str, Counter] = defaultdict(Counter)
    missing, unreadable, kept = [], {}, []
    for e, problem in zip(candidates, results, strict=True):
        counts = per_source[source_of(e["image"])]
        counts["entries"] += 1
        if problem is None:
            counts["kept"] += 1
            kept.append(e)
        elif problem == "missing":
            counts["missing"] += 1
            missing.append(e["image"])
        else:
            counts["unreadable"] += 1
            unreadable[e["image"]] = problem
    dropped["missing_image"] = len(missing)
    dropped["unreadable_image"] = len(unreadable)
    out.write_text(json.dumps(kept))
    report = {
        "source": str(src),
        "image_folder": str(folder),
        "total_entries": len(entries),
        "kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "per_source": {k: dict(v) for k, v in sorted(per_source.items())},
        "missing_files": sorted(set(missing)),
        "unreadable_files": dict(sorted(unreadable.items())),
        "decoded": args.decode,
        "seconds": round(time.time() - start, 1),
    }
    report_path.write_text(json.dumps(report, indent=2))
    print(f"{src}: {len(entries)} entries, kept {len(kept)} -> {out}")
    for reason, n in sorted(dropped.items()):
        print(f"  dropped {n:>7} {reason}")
    for name, counts in sorted(per_source.items()):
        print(f"  {name:<10} " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for path in sorted(set(missing))[:10]:
        print(f"  missing: {folder / path}")
    print(f"report: {report_path}")
    return report


if __name__ == "__main__":
    main()
