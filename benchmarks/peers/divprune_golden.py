"""Golden outputs of the authors' DivPrune on the tiny original-LLaVA of ``visionzip_golden.py``.

The authors' DivPrune is a patched copy of the LLaVA repository (github.com/vbdi/divprune, folder
``LLaVA/``); it runs in the same old-transformers venv as ``visionzip_golden.py`` (plus
``matplotlib``, which their vision tower imports) with ``--divprune-src`` pointing at that
``LLaVA`` folder (it replaces ``llava-torch`` on ``sys.path``; nothing of it is copied here).
Their switches are environment variables (``LAYER_INDEX=0``, ``SUBSET_RATIO``) and the image must
start at sequence index 35 (``SYS_TOKEN_LEN``, LLaVA-1.5's system prompt), so every prompt here has
35 tokens before the image.

Writes ``divprune.json`` (prompts, per ratio the kept patch indices and the greedy tokens) next to
the weights ``visionzip_golden.py`` wrote (checked equal: same seeds, same architecture).

    /work/venv437/bin/python benchmarks/peers/divprune_golden.py \
        --divprune-src /work/peers_src/divprune/LLaVA --out tests/golden
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

RATIOS = (0.125, 0.25, 0.5)  # of 64 patches: 8 / 16 / 32 kept
SYS_TOKEN_LEN = 35  # the authors' hard-coded image start


def prompts() -> list[tuple[list[int], list[int]]]:
    """3 prompts: BOS + 34 tokens, the image, then 3 / 5 / 8 tokens."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for post in (3, 5, 8):
        ids = torch.randint(3, 120, (SYS_TOKEN_LEN - 1 + post,), generator=gen).tolist()
        out.append(([1] + ids[: SYS_TOKEN_LEN - 1], ids[SYS_TOKEN_LEN - 1 :]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--divprune_src", "--divprune-src", required=True, help="the LLaVA/ folder of github.com/vbdi/divprune"
    )
    p.add_argument("--out", default="tests/golden")
    args = p.parse_args()
    sys.path.insert(0, args.divprune_src)  # the authors' patched llava package, before llava-torch
    sys.path.insert(0, str(Path(__file__).parent))
    import visionzip_golden as vz  # the tiny model and the prompt images (our code)
    from safetensors.torch import load_file

    os.environ["BASELINE"] = "NONE"  # their vision tower reads it (PruMerge switch)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = vz.build_original(tmp)
        import llava

        assert str(Path(llava.__file__).resolve()).startswith(str(Path(args.divprune_src).resolve()))
        saved = load_file(os.path.join(args.out, "tiny_llava_original.safetensors"))
        weights = vz.hf5_state_dict(model)
        assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in saved)
        pixels = vz.make_pixels()
        os.environ["LAYER_INDEX"] = "0"
        for ratio in RATIOS:
            os.environ["SUBSET_RATIO"] = str(ratio)
            rows = []
            for (pre, post), px in zip(prompts(), pixels, strict=True):
                with torch.no_grad():
                    features = model.encode_images(px)[0]  # (64, D): what their DivPrune call reads
                    kept, _ = model.DivPrune(features, features.shape[0], None, threshold_ratio=ratio)
                tokens = vz.run(model, pre + [vz.ORIGINAL_IMAGE_TOKEN] + post, px)
                rows.append({"kept_patches": sorted(kept.tolist()), "tokens": tokens})
            results.append({"ratio": ratio, "samples": rows})
    golden = {
        "made_by": "benchmarks/peers/divprune_golden.py",
        "source": "github.com/vbdi/divprune (LLaVA/llava/model/llava_arch.py)",
        "prompts": [{"pre": pre, "post": post} for pre, post in prompts()],
        "settings": results,
    }
    Path(args.out, "divprune.json").write_text(json.dumps(golden))
    print(f"wrote {args.out}/divprune.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
