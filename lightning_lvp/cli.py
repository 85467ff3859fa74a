"""Command line: ``python -m lightning_lvp {fit,validate,test,predict} -c CONFIG`` (LightningCLI) plus
``flops``, ``sweep``, ``export``, ``compare``, ``evaluate`` and ``probe``.

LightningCLI runs with the omegaconf parser mode so ``${...}`` interpolation works in the YAML.
``model.model_path`` is linked to ``data.processor_path`` (one value, never repeated in YAML).
"""

from __future__ import annotations

import importlib
import os
import sys

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

    return LVPCLI


def parse_config(args: list[str]):
    """Parses and validates a command line / config exactly as ``fit`` would, without instantiating."""
    from lightning_lvp.data.datamodule import LlavaDataModule
    from lightning_lvp.lit_module import LVPModule

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
    from lightning_lvp.lit_module import LVPModule

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
