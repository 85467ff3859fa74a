"""The commands of ``python -m lightning_lvp`` besides LightningCLI's fit / validate / test / predict.

One module per command, each a typed function (arguments and ``--help`` from its signature and
docstring, litgpt style) parsed by :mod:`lightning_lvp.commands.experiment` from the experiment YAML
that ``fit`` takes. The logic they run lives in the library (flops.py, sweep.py, compare.py, ...);
these modules only wire flags to it.
"""

# command -> (module with ``main(argv) -> int``, one-line description for the top-level --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("lightning_lvp.commands.flops", "count FLOPs per inference schedule (weightless 7B build)"),
    "sweep": ("lightning_lvp.commands.sweep", "evaluate a list/range of inference schedules (resumable)"),
    "compare": ("lightning_lvp.commands.compare", "LVPruning vs training-free methods on one data set"),
    "export": ("lightning_lvp.commands.export", "write pruner weights from a checkpoint"),
    "evaluate": ("lightning_lvp.commands.evaluate", "answer and score a benchmark (LLaVA formats)"),
    "probe": ("lightning_lvp.commands.probe", "capacity probes of a base: probe relevance | probe position"),
    "demo": ("lightning_lvp.commands.demo", "demo init FOLDER: write the CPU demo's tiny model folder"),
}
