"""``python -m lightning_lvp probe {relevance,position} -c experiments/demo.yaml``: capacity probes of a base."""

from __future__ import annotations

import json as json_lib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_lvp.commands.experiment import Experiment, run_group

PROG = "python -m lightning_lvp probe"


def _setup(experiment: Experiment, model_path: str | None, batch_size: int | None, device: str, seed: int):
    """The frozen base (no method), the data module (train + validation) and the config's method (or None)."""
    import torch

    from lightning_lvp import adapter
    from lightning_lvp.io import instantiate
    from lightning_lvp.model import PrunedLlava

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(seed)
    path = experiment.model_path(model_path, "probe")
    model = PrunedLlava(adapter.load_llava(path, device=device), None).eval()
    sizes = {"batch_size": batch_size, "val_batch_size": batch_size} if batch_size else {}
    dm = experiment.datamodule(path, stage="fit", num_workers=0, **sizes)
    spec = experiment.method_spec()
    return model, dm, instantiate(spec) if spec else None


def _write(path: str | None, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json_lib.dumps({**meta, "rows": rows}, indent=2))
        print(f"wrote {out}")


def relevance(
    after_layer: int | list[int] | None = None,
    k: int | None = None,
    steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    pos_weight: float = 1.0,
    dim: int | None = None,
    num_heads: int | None = None,
    num_blocks: int | None = None,
    ffn_mult: int | None = None,
    input_norm: bool | None = None,
    rotary: bool | None = None,
    eval_batches: int = 4,
    eval_every: int = 0,
    oracle_position: bool = False,
    model_path: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    json: str | None = None,
    experiment: Experiment | None = None,
) -> int:
    """A DecisionModule trained on the direct relevant-patch label: top-k recall on held-out questions.

    Binary cross-entropy between the module's keep/drop log-odds and the data's relevant patches, on the
    frozen base's hidden states at one pruning point (lightning_lvp/probes.py): an upper bound of what the
    module can express there, not the paper's objective. Module settings default to the config's method.

    Args:
        after_layer: pruning point(s), one or a list [0,2]: 0 = LLM input, l = after LLM layer l (default:
            the method's first).
        k: top-k of the recall (default: the method's last-stage count).
        steps: optimizer steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        pos_weight: BCE weight of the relevant class.
        dim: module width (default: the method's, else the LLM width).
        num_heads: heads per block (default: the method's, else 4).
        num_blocks: cross-attention blocks (default: the method's, else 2).
        ffn_mult: FFN expansion (default: the method's, else 2).
        input_norm: LayerNorm on the LLM hidden states before the module (default: the method's, else false).
        rotary: RoPE at the original positions in the module's attention (default: the method's, else false).
        eval_batches: validation batches scored.
        eval_every: also score every N steps (0: only at the end).
        oracle_position: add a fixed random code per patch index to the module's vision input (tests the module).
        model_path: base model folder (default: the config's model.init_args.model_path).
        batch_size: batch size of the training and validation batches.
        seed: seed.
        device: torch device.
        json: also write the results to this JSON file.
    """
    import torch

    from lightning_lvp.probes import RelevanceProbeArgs, default_k, format_relevance, relevance_probe

    experiment = experiment or Experiment()
    model, dm, method = _setup(experiment, model_path, batch_size, device, seed)
    arch = dict(getattr(method, "arch", {}) or {})
    depths = [after_layer] if isinstance(after_layer, int) else after_layer
    depths = depths or [method.after_layers[0] if method is not None else 0]
    rows = []
    for depth in depths:
        settings = RelevanceProbeArgs(
            depth=depth,
            k=k or default_k(method, int(dm.num_image_tokens)),
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            pos_weight=pos_weight,
            dim=dim if dim is not None else arch.get("dim"),
            num_heads=num_heads or arch.get("num_heads", 4),
            num_blocks=num_blocks or arch.get("num_blocks", 2),
            ffn_mult=ffn_mult or arch.get("ffn_mult", 2),
            input_norm=input_norm if input_norm is not None else arch.get("input_norm", False),
            rotary=rotary if rotary is not None else arch.get("rotary", False),
            eval_batches=eval_batches,
            eval_every=eval_every,
            oracle_position=oracle_position,
            seed=seed,
        )
        torch.manual_seed(seed)  # training-batch order
        rows.append(relevance_probe(model, dm.train_dataloader(), dm.val_dataloader(), settings))
    print(format_relevance(rows))
    _write(json, {"probe": "relevance", "config": experiment.config_path(), "model_path": model_path,
                  "overrides": experiment.overrides()}, rows)  # fmt: skip
    return 0


def position(
    layers: int | list[int] = [0, 1],  # noqa: B006 (jsonargparse shows it; never mutated)
    train_batches: int = 6,
    val_batches: int = 2,
    steps: int = 300,
    lr: float = 1e-2,
    model_path: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    json: str | None = None,
    experiment: Experiment | None = None,
) -> int:
    """A linear classifier of the patch index from the vision tokens' hidden states, scored on held-out images.

    Real CLIP features carry absolute position; a content-only decision module needs it to tell which
    patch a question names (lightning_lvp/probes.py).

    Args:
        layers: depths, one or a list [0,1]: 0 = LLM input, l = after LLM layer l.
        train_batches: training batches of features.
        val_batches: held-out (validation split) batches.
        steps: full-batch Adam steps.
        lr: Adam learning rate.
        model_path: base model folder (default: the config's model.init_args.model_path).
        batch_size: batch size of the training and validation batches.
        seed: seed.
        device: torch device.
        json: also write the results to this JSON file.
    """
    from lightning_lvp.probes import format_position, position_probe

    experiment = experiment or Experiment()
    model, dm, _ = _setup(experiment, model_path, batch_size, device, seed)
    depths = [layers] if isinstance(layers, int) else list(layers)
    rows = position_probe(
        model, dm.train_dataloader(), dm.val_dataloader(), depths, train_batches, val_batches, steps, lr, seed
    )
    print(format_position(rows))
    _write(json, {"probe": "position", "config": experiment.config_path(), "model_path": model_path,
                  "overrides": experiment.overrides()}, rows)  # fmt: skip
    return 0


RENAMED = {
    "--data_set": "--data.init_args.KEY=VALUE (e.g. --data.init_args.digits.question_types=[cell,row_count])",
    "--no-rotary": "--rotary false",
    "--no-input_norm": "--input_norm false",
    "--no-input-norm": "--input_norm false",
    "--no_rotary": "--rotary false",
}
LISTS = {"--after_layer": ",", "--layers": ","}


def main(argv: Sequence[str]) -> int:
    return run_group(PROG, {"relevance": relevance, "position": position}, argv, renamed=RENAMED, lists=LISTS)
