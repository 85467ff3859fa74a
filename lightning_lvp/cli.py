"""Command line: ``python -m lightning_lvp {fit,validate,test,predict} -c CONFIG`` (LightningCLI) plus
``flops``, ``sweep``, ``export``, ``compare``, ``evaluate`` and ``probe``.

LightningCLI runs with the omegaconf parser mode so ``${...}`` interpolation works in the YAML.
``model.model_path`` is linked to ``data.processor_path`` (one value, never repeated in YAML).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

EXTRA_COMMANDS = {
    "flops": ("lightning_lvp.flops", "flops_command", "count FLOPs per inference schedule (meta device)"),
    "sweep": ("lightning_lvp.sweep", "sweep_command", "evaluate a list/range of inference schedules"),
    "export": ("lightning_lvp.export", "export_command", "write pruner weights from a checkpoint"),
    "compare": ("lightning_lvp.compare", "compare_command", "LVPruning vs training-free baselines on one data set"),
    "evaluate": ("lightning_lvp.eval.runner", "evaluate_command", "answer and score a benchmark (LLaVA formats)"),
    "probe": ("lightning_lvp.probes", "probe_command", "capacity probes of a base: relevance (top-k recall), position"),
}


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
    from lightning_lvp.data.datamodule import LlavaDataModule
    from lightning_lvp.training.module import LVPModule

    class ParseOnly(_cli_class()):
        def instantiate_classes(self) -> None:
            pass

    cli = ParseOnly(
        LVPModule,
        LlavaDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=False,
    )
    return cli.config


def run_lightning_cli(args: list[str] | None = None):
    """LightningCLI over :class:`LVPModule` and :class:`LlavaDataModule` (subclasses allowed)."""
    from lightning_lvp.data.datamodule import LlavaDataModule
    from lightning_lvp.training.module import LVPModule

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _cli_class()(
        LVPModule,
        LlavaDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": False},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, fn, _ = EXTRA_COMMANDS[argv[0]]
        return int(getattr(importlib.import_module(module), fn)(argv[1:]) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<9} {desc}" for name, (_, _, desc) in EXTRA_COMMANDS.items())
        print(f"Also available (each has --help):\n{extra}\n")
    run_lightning_cli(None if from_sys else argv)
    return 0
