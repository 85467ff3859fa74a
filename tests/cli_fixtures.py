"""A tiny LLaVA model folder (config + word-level processor + random weights) for CLI tests."""

from __future__ import annotations

from pathlib import Path

from lightning_lvp import adapter
from lightning_lvp.demo import init_demo_folder
from lightning_lvp.tiny import TinyLlavaSpec

# same processor as the demo (48 px, 8 px patches = 36 vision tokens), much smaller networks
SMALL = TinyLlavaSpec(
    hidden_size=32,
    intermediate_size=64,
    num_layers=6,
    num_heads=4,
    num_kv_heads=4,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=1,
    vision_heads=4,
    image_size=48,
    patch_size=8,
    vision_feature_layer=-1,
)


def tiny_model_folder(path: Path, weights: bool = True) -> Path:
    init_demo_folder(path, SMALL)
    if weights:
        model = adapter.build_from_config(adapter.load_config(str(path)))
        adapter.save_llava(model, str(path), processor_from=str(path))
    return path


def small_data_args(cache: Path) -> list[str]:
    """CLI overrides that shrink the digits data set to a few dozen images."""
    return [
        f"--data.init_args.cache_dir={cache}",
        "--data.init_args.digits.train_images=48",
        "--data.init_args.digits.val_images=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_batch_size=8",
        "--data.init_args.num_workers=0",
    ]


def tiny_pruned_model(model_dir: Path):
    """The tiny model folder loaded as a PrunedLlava with random LVPruning modules after layers 1, 2, 4."""
    from lightning_lvp.methods import LVPruning
    from lightning_lvp.model import PrunedLlava

    method = LVPruning(after_layers=[1, 2, 4], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=4)
    return PrunedLlava(adapter.load_llava(str(model_dir)), method).eval()


def sweep_folder(root: Path, images: int) -> tuple[Path, Path]:
    """A tiny model folder, LVPruning pruners (after layers 1/2/4) and experiments/demo.yaml shrunk to
    ``images`` train/val images with its cache under ``root``: what the sweep tests run on.

    Returns:
        the model folder and the LLM dims it was built with (``root / "pruners"``, ``root / "cfg.yaml"`` written).
    """
    from lightning_lvp.io import save_pruners
    from lightning_lvp.methods import LVPruning

    model_dir = tiny_model_folder(root / "model")
    dims = adapter.text_dims(adapter.load_config(str(model_dir)))
    method = LVPruning(after_layers=[1, 2, 4], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=4)
    method.bind(dims)
    save_pruners(method, root / "pruners")
    cfg = (Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml").read_text()
    cfg = cfg.replace("    cache_dir: .cache", f"    cache_dir: {root / 'cache'}")
    shrunk = f"      question_types: [cell]\n      train_images: {images}\n      val_images: {images}"
    (root / "cfg.yaml").write_text(cfg.replace("      question_types: [cell]", shrunk))
    return model_dir, dims
