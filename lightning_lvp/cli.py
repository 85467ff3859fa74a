"""Command line: ``python -m lightning_lvp COMMAND ...``.

``fit`` / ``validate`` / ``test`` / ``predict`` are LightningCLI (omegaconf parser mode, so ``${...}``
interpolation works; ``model.init_args.model_path`` is linked to ``data.init_args.processor_path``).
Every other command is a typed function in :mod:`lightning_lvp.commands`, parsed by jsonargparse from
the same experiment YAML (``-c``); ``python -m lightning_lvp --help`` lists them all.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from lightning_lvp.commands import COMMANDS

LIGHTNING_COMMANDS = {
    "fit": "train the pruners (LightningCLI: -c experiments/X.yaml, --print_config, --trainer.*, --model.*)",
    "validate": "run the validation loop of a config (LightningCLI)",
    "test": "run the test loop of a config (LightningCLI)",
    "predict": "run the prediction loop of a config (LightningCLI)",
}


def fit_classes():
    """The model and data base classes of ``fit`` (subclass mode); every command parses its ``model`` /
    ``data`` sections against the same two. The model base is
    :class:`~lightning_lvp.training.common.TrainingModule`: ``LVPModule`` (pruners) or ``DemoBaseModule``
    (the demo base from scratch)."""
    from lightning_lvp.data.datamodule import LlavaDataModule
    from lightning_lvp.training.common import TrainingModule

    return TrainingModule, LlavaDataModule


def usage() -> str:
    """The top-level help: every command of ``python -m lightning_lvp``."""
    rows = {**LIGHTNING_COMMANDS, **{name: desc for name, (_, desc) in COMMANDS.items()}}
    lines = "\n".join(f"  {name:<9} {desc}" for name, desc in rows.items())
    return (
        "usage: python -m lightning_lvp COMMAND [-c CONFIG] [ARGS]\n\n"
        "Every command reads the experiment YAML that fit takes (-c) and documents its arguments in\n"
        f"`python -m lightning_lvp COMMAND --help`.\n\ncommands:\n{lines}\n"
    )


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class LVPCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.init_args.model_path", "data.init_args.processor_path")

        def _parse_ckpt_path(self) -> None:
            """``--ckpt_path last`` -> the last checkpoint of the run being resumed (or a loud error), and an
            unreadable checkpoint -> an error naming it, before LightningCLI reads its hyperparameters."""
            from lightning_lvp.checkpoint import load_checkpoint_file

            sub = self.config.get("subcommand")
            if sub and self.config[sub].get("ckpt_path") == "last":
                self.config[sub].ckpt_path = str(resolve_last_checkpoint(self.config[sub]))
                print(f"--ckpt_path last: resuming from {self.config[sub].ckpt_path}")
            if sub and self.config[sub].get("ckpt_path"):
                load_checkpoint_file(self.config[sub].ckpt_path, weights_only=True)  # raises naming the file
            super()._parse_ckpt_path()

    return LVPCLI


def resolve_last_checkpoint(config) -> Path:
    """The ``last.ckpt`` that ``--ckpt_path last`` means for a parsed ``fit`` config: in the
    ModelCheckpoint ``dirpath`` if the config sets one, else in the newest ``version_N`` of the logger's
    ``save_dir/name`` (the default root's ``lightning_logs`` without a logger) that has one.

    Raises:
        FileNotFoundError: no such checkpoint (Lightning would silently start from scratch).
    """
    from lightning_lvp.checkpoint import find_last_checkpoint

    trainer = config.trainer
    for callback in trainer.get("callbacks") or []:
        args = callback.get("init_args") if hasattr(callback, "get") else None
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and args and args.get("dirpath"):
            folder = Path(args.dirpath)
            return find_last_checkpoint([folder], f"ModelCheckpoint dirpath {folder}")
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    logger = trainer.get("logger")
    if logger is False:  # no logger: ModelCheckpoint writes into <default_root_dir>/checkpoints
        return find_last_checkpoint([root], f"trainer.default_root_dir {root}")
    if logger is None or logger is True:
        base = root / "lightning_logs"
    else:
        loggers = logger if isinstance(logger, list) else [logger]
        args = loggers[0].get("init_args") or {}
        base = Path(args.get("save_dir") or root) / str(args.get("name") or "lightning_logs")
        if args.get("version") is not None:
            version = args.version if str(args.version).startswith("version_") else f"version_{args.version}"
            return find_last_checkpoint([base / str(version)], f"the logger's version folder {base / str(version)}")
    return find_last_checkpoint(sorted(base.glob("version_*")), f"{base}")


def parse_config(args: list[str]):
    """Parses and validates a command line / config exactly as ``fit`` would, without instantiating."""
    model_class, data_class = fit_classes()

    class ParseOnly(_cli_class()):
        def instantiate_classes(self) -> None:
            pass

    cli = ParseOnly(
        model_class,
        data_class,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=False,
    )
    return cli.config


def run_lightning_cli(args: list[str] | None = None):
    """LightningCLI over :func:`fit_classes` (subclasses allowed)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _cli_class()(
        *fit_classes(),
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": False},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    """Dispatches ``argv`` (default ``sys.argv[1:]``) to LightningCLI or a command; returns the exit code."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in COMMANDS:
        module, _ = COMMANDS[argv[0]]
        return int(importlib.import_module(module).main(argv[1:]) or 0)
    if argv[0] not in LIGHTNING_COMMANDS:
        print(f"{usage()}\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    run_lightning_cli(None if from_sys else argv)
    return 0
