"""Golden outputs of the authors' VisionZip on a tiny random original-LLaVA (issue #15, point 6).

Runs OUTSIDE the project's environment, in a venv with the original LLaVA stack (docs/BASELINES.md,
/work/shared/FACTS.md): ``torch==2.13.0 transformers==4.37.2 "numpy<2" pillow`` plus
``llava-torch==1.2.2.post1 --no-deps``, and the authors' ``visionzip==0.1.3`` sdist unpacked
(its wheel is empty) and given with ``--visionzip-src``. Nothing of the authors' code is copied:
it is imported from that folder at run time.

The script builds a tiny ``LlavaLlamaForCausalLM`` (24-layer CLIP, because VisionZip's layer
schedule is hard-coded for 24 layers; widths 32; select layer -2, "patch" features,
``mlp2x_gelu`` projector), runs the unpruned model and the authors' VisionZip at a few
(dominant, contextual) settings, and writes

* ``tiny_llava_original.safetensors``: the weights, renamed to transformers-5
  ``LlavaForConditionalGeneration`` names (FACTS: 0 missing / 0 unexpected keys);
* ``visionzip.json``: the dimensions, prompts, per setting the dominant patch indices the authors
  return, the LLM-input image block they build and the greedy generated tokens.

``tests/test_peers_golden.py`` checks that ``lightning_lvp.methods.VisionZip`` reproduces them in
the normal environment. Usage::

    /work/venv437/bin/python benchmarks/peers/visionzip_golden.py \
        --visionzip-src /work/peers_src/visionzip-0.1.3 --out tests/golden
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

DIMS = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_layers": 24,
    "vision_heads": 4,
    "image_size": 32,
    "patch_size": 4,
    "image_token_id": 127,  # transformers-5 side: one placeholder per patch (the original LLaVA uses -200)
    "vision_feature_layer": -2,
}
SETTINGS = [(14, 2), (26, 6), (40, 8)]  # (dominant incl. CLS, contextual) of 64 patches: 16 / 32 / 48 tokens
PROMPTS = [([1, 5, 9], [12, 40, 7, 33]), ([1, 22], [3, 64, 90, 17, 8, 51]), ([1, 70, 71, 72, 73], [44, 45])]
MAX_NEW_TOKENS = 8
ORIGINAL_IMAGE_TOKEN = -200
PIXEL_SEED = 2


def make_pixels() -> list[torch.Tensor]:
    """One (1, 3, H, W) image per prompt from ``PIXEL_SEED`` (the test draws the same ones)."""
    gen = torch.Generator().manual_seed(PIXEL_SEED)
    return [torch.randn(1, 3, DIMS["image_size"], DIMS["image_size"], generator=gen) for _ in PROMPTS]


def build_original(folder: str):
    """The tiny original LLaVA: CLIP saved to ``folder`` (the repo loads its tower from a path), random LLM."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    d = DIMS
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=d["vision_hidden_size"],
            intermediate_size=d["vision_intermediate_size"],
            num_hidden_layers=d["vision_layers"],
            num_attention_heads=d["vision_heads"],
            image_size=d["image_size"],
            patch_size=d["patch_size"],
            projection_dim=d["vision_hidden_size"],
        )
    )
    with torch.no_grad():  # peaked attention: the CLS ranking must not hinge on rounding
        for layer in vision.vision_model.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    vision.save_pretrained(folder)
    size = d["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    cfg = LlavaConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_layers"],
        num_attention_heads=d["num_heads"],
        num_key_value_heads=d["num_heads"],
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    cfg.mm_vision_tower = folder
    cfg.mm_vision_select_layer = d["vision_feature_layer"]
    cfg.mm_vision_select_feature = "patch"
    cfg.mm_projector_type = "mlp2x_gelu"
    cfg.mm_hidden_size = d["vision_hidden_size"]
    cfg.mm_use_im_start_end = False
    cfg.mm_use_im_patch_token = False
    cfg.image_aspect_ratio = "square"
    cfg.mm_patch_merge_type = "flat"
    torch.manual_seed(1)
    model = LlavaLlamaForCausalLM(cfg)
    model.get_model().get_vision_tower().load_model()
    return model.eval()


def hf5_state_dict(model) -> dict[str, torch.Tensor]:
    """The original LLaVA's weights under transformers-5 ``LlavaForConditionalGeneration`` names (FACTS)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.vision_tower.vision_tower.vision_model."):
            new = "model.vision_tower." + name[len("model.vision_tower.vision_tower.vision_model.") :]
        elif name.startswith("model.mm_projector."):
            index = {"0": "linear_1", "2": "linear_2"}[name.split(".")[2]]
            new = f"model.multi_modal_projector.{index}." + name.split(".")[3]
        elif name.startswith("model."):
            new = "model.language_model." + name[len("model.") :]
        else:
            new = name  # lm_head
        out[new] = tensor.detach().clone().contiguous()
    return out


def run(model, ids: list[int], pixels: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), images=pixels, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, use_cache=True
        )
    return out[0].tolist()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--visionzip_src",
        "--visionzip-src",
        required=True,
        help="the unpacked visionzip-0.1.3 sdist (folder holding visionzip/)",
    )
    p.add_argument("--out", default="tests/golden", help="output folder")
    args = p.parse_args()
    import transformers

    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_original(tmp)
        from safetensors.torch import save_file

        save_file(hf5_state_dict(model), os.path.join(args.out, "tiny_llava_original.safetensors"))
        n = (DIMS["image_size"] // DIMS["patch_size"]) ** 2
        pixels = make_pixels()
        samples = [{"pre": pre, "post": post, "pixel_sum": float(px.sum())} for (pre, post), px in zip(PROMPTS, pixels)]
        for s, (pre, post), px in zip(samples, PROMPTS, pixels, strict=True):
            s["base_tokens"] = run(model, pre + [ORIGINAL_IMAGE_TOKEN] + post, px)
        sys.path.insert(0, args.visionzip_src)
        from visionzip import visionzip  # the authors' code, from the sdist

        results = []
        for dominant, contextual in SETTINGS:
            model = visionzip(build_original(tmp), dominant=dominant, contextual=contextual)
            tower = model.get_model().get_vision_tower()
            rows = []
            for (pre, post), px in zip(PROMPTS, pixels, strict=True):
                with torch.no_grad():
                    block, all_indices = tower(px)
                    features = model.get_model().mm_projector(block)
                rows.append(
                    {
                        "dominant_patches": sorted(int(i) - 1 for i in all_indices[0, 1:].tolist()),
                        "image_block": [[round(v, 6) for v in row] for row in features[0].tolist()],
                        "tokens": run(model, pre + [ORIGINAL_IMAGE_TOKEN] + post, px),
                    }
                )
            results.append({"dominant": dominant, "contextual": contextual, "samples": rows})
    golden = {
        "made_by": "benchmarks/peers/visionzip_golden.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "visionzip": "0.1.3"},
        "dims": DIMS,
        "num_patches": n,
        "max_new_tokens": MAX_NEW_TOKENS,
        "pixel_seed": PIXEL_SEED,
        "samples": samples,
        "settings": results,
    }
    with open(os.path.join(args.out, "visionzip.json"), "w") as f:
        json.dump(golden, f)
    print(f"wrote {args.out}/visionzip.json and tiny_llava_original.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
