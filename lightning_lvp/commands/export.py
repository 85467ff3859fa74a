"""``python -m lightning_lvp export --ckpt_path CKPT --out DIR``: pruner weights from any checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_lvp.commands.experiment import Experiment, run


def export(ckpt_path: str, out: str, overwrite: bool = False, experiment: Experiment | None = None) -> int:
    """Writes the pruner weights of a training checkpoint (Lightning .ckpt or DeepSpeed folder) into a
    folder that loads on a single device (pruners.safetensors + pruners.json).

    Args:
        ckpt_path: Lightning .ckpt file or DeepSpeed checkpoint folder (fit's ckpt_path key in a YAML).
        out: output folder for pruners.safetensors + pruners.json.
        overwrite: replace pruners already in out.
    """
    from lightning_lvp.export import export_pruners

    folder = export_pruners(ckpt_path, out, overwrite)
    print(f"wrote {folder / 'pruners.safetensors'} and {folder / 'pruners.json'}")
    return 0


def main(argv: Sequence[str]) -> int:
    return run(export, argv, "python -m lightning_lvp export", renamed={"--ckpt": "--ckpt_path"})
