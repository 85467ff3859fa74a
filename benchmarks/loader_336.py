"""Data-loading speed of the LLaVA-1.5 path at 336 px (not a test).

Writes N synthetic 640x480 JPEGs (COCO-like size) and a LLaVA JSON, then times LlavaDataModule-style
loading (decode, pad to square, CLIP processor at 336 px, vicuna_v1 tokenisation, collate) with
0 and 2 DataLoader workers. Usage: python benchmarks/loader_336.py [--n 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from transformers import CLIPImageProcessorPil, LlavaProcessor

from lightning_lvp.data.collate import LlavaCollator
from lightning_lvp.data.llava_dataset import LlavaDataset
from lightning_lvp.data.tokenizer import build_tiny_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="samples")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16, help="batch size")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    entries = []
    for i in range(args.n):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(tmp / f"{i}.jpg", quality=90)
        entries.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the image? Answer briefly."},
                    {"from": "gpt", "value": "a photo of a digit"},
                ],
            }
        )
    (tmp / "data.json").write_text(json.dumps(entries))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ds = LlavaDataset(entries, [str(tmp)], processor)
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=workers, collate_fn=collate)
        t0 = time.perf_counter()
        n = 0
        for b in loader:
            n += b["input_ids"].shape[0]
        dt = time.perf_counter() - t0
        print(
            f"num_workers={workers}: {n} samples in {dt:.1f} s = {n / dt:.1f} samples/s "
            f"(tokens per sample {b['input_ids'].shape[1]}, pixel_values {tuple(b['pixel_values'].shape[1:])})"
        )


if __name__ == "__main__":
    main()
