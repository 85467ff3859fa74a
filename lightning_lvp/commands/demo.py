"""``python -m lightning_lvp demo init FOLDER``: the CPU demo's tiny model folder (config + processor)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_lvp.commands.experiment import Experiment, run_group

PROG = "python -m lightning_lvp demo"


def init(folder: str, overwrite: bool = False, experiment: Experiment | None = None) -> int:
    """Writes the demo model folder (config.json + word-level processor + demo_spec.json) that
    experiments/demo_base.yaml trains from scratch.

    Args:
        folder: output folder, e.g. assets/demo_init.
        overwrite: replace an existing config in folder.
    """
    from lightning_lvp.demo import init_demo_folder

    print(f"wrote {init_demo_folder(folder, overwrite=overwrite)}")
    return 0


def main(argv: Sequence[str]) -> int:
    return run_group(PROG, {"init": init}, argv, positional=True)
