"""The CPU demo's tiny LLaVA: a model folder (config + processor) that `fit` trains from scratch.

``python -m lightning_lvp demo init assets/demo_init`` writes the folder used by
``experiments/demo_base.yaml`` (which trains the base and saves it to ``assets/demo_base``);
``experiments/demo.yaml`` then trains the pruners on the frozen ``assets/demo_base``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lightning_lvp.data.tokenizer import save_tiny_processor, tiny_spec_overrides
from lightning_lvp.tiny import TinyLlavaSpec, tiny_llava_config

# LLM 128 x 8 layers and a 2-layer 64-wide CLIP on 48 px / 8 px patches (36 vision tokens, one per
# digit cell of a 6x6 grid): the shape FACTS.md measured to learn the digits grid in minutes.
DEMO_SPEC = TinyLlavaSpec(
    hidden_size=128,
    intermediate_size=512,
    num_layers=8,
    num_heads=4,
    num_kv_heads=4,
    vision_hidden_size=64,
    vision_intermediate_size=256,
    vision_layers=2,
    vision_heads=4,
    image_size=48,
    patch_size=8,
    vision_feature_layer=-1,
    max_position_embeddings=512,
)


def init_demo_folder(folder: str | Path, spec: TinyLlavaSpec = DEMO_SPEC, overwrite: bool = False) -> Path:
    """Writes ``config.json`` + the word-level processor of the demo model into ``folder``."""
    folder = Path(folder)
    if (folder / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a model config; pass --overwrite to replace it")
    processor = save_tiny_processor(folder, spec.image_size, spec.patch_size)
    fields = {**asdict(spec), **tiny_spec_overrides(processor)}
    config = tiny_llava_config(TinyLlavaSpec(**fields))
    tok = processor.tokenizer
    config.text_config.bos_token_id = tok.bos_token_id
    config.text_config.eos_token_id = tok.eos_token_id
    config.save_pretrained(str(folder))
    (folder / "demo_spec.json").write_text(json.dumps(fields, indent=2))
    return folder


if __name__ == "__main__":  # the old spelling ``python -m lightning_lvp.demo init FOLDER``
    import sys

    from lightning_lvp.commands.demo import main

    raise SystemExit(main(sys.argv[1:]))
