"""The parser every command shares: fit's experiment YAML (``-c``) plus the command's typed function.

A command is a typed function with a Google-style docstring (litgpt's ``__main__.py`` style); its
parser is jsonargparse's :meth:`add_function_arguments` on top of the SAME pieces LightningCLI builds
``fit`` from: ``model`` and ``data`` in subclass mode over :func:`lightning_lvp.cli.fit_classes`
(validated exactly as ``fit`` validates them, ``model.init_args.model_path`` linked to
``data.init_args.processor_path``), and fit's other sections (``trainer``, ``optimizer``,
``lr_scheduler``, ``seed_everything``, ``ckpt_path``) accepted so the same file parses. Command values
are flags (``--pruners``, ``--schedules``, ...), spelled with underscores as LightningCLI spells them.
"""

from __future__ import annotations

import inspect
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_lvp.schedules import MIN_RATIO, PAPER_STEP, paper_schedules, parse_schedules

# fit's sections a command accepts without using them (so `-c` takes the file fit takes); trainer is read
# for the RatioSweep callback's schedules
FIT_SECTIONS: dict[str, tuple[Any, str]] = {
    "trainer": (dict[str, Any] | None, "fit's trainer section (commands read only its RatioSweep callback)"),
    "optimizer": (dict[str, Any] | str | None, "fit's optimizer section (accepted, not used)"),
    "lr_scheduler": (dict[str, Any] | str | None, "fit's lr_scheduler section (accepted, not used)"),
    "seed_everything": (bool | int | None, "fit's seed_everything (accepted, not used)"),
    "ckpt_path": (str | None, "fit's ckpt_path (accepted, not used)"),
}
SECTION_PREFIXES = ("--model.", "--data.", "--model=", "--data=")


@dataclass
class Experiment:
    """The experiment sections a command reads (parsed and validated as ``fit`` parses them).

    Attributes:
        configs: the ``-c`` files, in order.
        model: the model section (``class_path`` / ``init_args``), or None without one.
        data: the data section, or None.
        trainer: fit's trainer section as a dict, or None.
        argv: the command line the sections were parsed from.
    """

    configs: list[str] = field(default_factory=list)
    model: Any = None
    data: Any = None
    trainer: dict[str, Any] | None = None
    argv: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, *configs: str | Path, overrides: Sequence[str] = ()) -> Experiment:
        """The sections of experiment YAMLs (later files override earlier ones) and ``--model.x=y`` overrides."""
        argv = [a for c in configs for a in ("-c", str(c))] + list(overrides)
        parser = section_parser("experiment")
        return cls.from_namespace(parser.parse_args(argv), argv)

    @classmethod
    def from_namespace(cls, cfg, argv: Sequence[str]) -> Experiment:
        trainer = cfg.get("trainer")
        return cls(
            configs=[str(p) for p in (cfg.get("config") or []) if p is not None],
            model=cfg.get("model"),
            data=cfg.get("data"),
            trainer=_plain(trainer) if trainer else None,
            argv=list(argv),
        )

    # ------------------------------------------------------------------------------- model section
    def model_args(self) -> dict[str, Any]:
        """``model.init_args`` as a plain dict ({} without a model section)."""
        if self.model is None:
            return {}
        return _plain(self.model.get("init_args"))

    def model_path(self, override: str | None = None, command: str = "this command") -> str:
        """``override`` (a ``--model_path`` flag), else ``model.init_args.model_path``.

        Raises:
            ValueError: neither is given.
        """
        path = override or self.model_args().get("model_path")
        if not path:
            raise ValueError(f"{command} needs --model_path or -c CONFIG with model.init_args.model_path")
        return str(path)

    def structure(self, override: str | None = None) -> str:
        """The newline policy (``PrunedVLM(structure=...)``, docs/FAMILIES.md): ``override`` (a
        ``--structure`` flag), else ``model.init_args.structure``, else "keep"."""
        return str(override or self.model_args().get("structure") or "keep")

    def method_spec(self) -> dict[str, Any] | None:
        """``model.init_args.method`` as ``{"class_path", "init_args"}`` (None without one)."""
        method = self.model_args().get("method")
        if method is None:
            return None
        if isinstance(method, str):
            return {"class_path": method, "init_args": {}}
        return {"class_path": method["class_path"], "init_args": method.get("init_args") or {}}

    # ----------------------------------------------------------------------------- trainer section
    def ratio_sweep(self) -> dict[str, Any] | None:
        """init_args of the ``RatioSweep`` callback in ``trainer.callbacks`` (None without one)."""
        callbacks = (self.trainer or {}).get("callbacks") or []
        for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
            if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("RatioSweep"):
                return dict(cb.get("init_args") or {})
        return None

    def schedules(
        self,
        text: str | None,
        stages: int | None,
        default: str | None = None,
        step: float = PAPER_STEP,
        min_ratio: float = MIN_RATIO,
        allow_base: bool = False,
    ) -> list[list[float | None] | None]:
        """``--schedules`` (:mod:`lightning_lvp.schedules` syntax), else the config's RatioSweep callback
        (its ``schedules``, else its ``rhos`` by the paper's rule), else ``default`` (same syntax; None = [])."""
        if text is None:
            sweep = self.ratio_sweep()
            if sweep is not None and stages:
                if sweep.get("schedules"):
                    return [[None if r is None else float(r) for r in s] for s in sweep["schedules"]]
                from lightning_lvp.schedules import PAPER_RHOS

                return paper_schedules(sweep.get("rhos", PAPER_RHOS), stages, step, min_ratio)
            text = default
        if text is None:
            return []
        try:
            return parse_schedules(text, stages, step, min_ratio, allow_base=allow_base)
        except ValueError as err:
            raise ValueError(f"--schedules: {err}") from None

    # -------------------------------------------------------------------------------- data section
    def datamodule(self, processor_path: str, stage: str = "validate", **init_args: Any):
        """The data section's datamodule (instantiated as LightningCLI instantiates it), with
        ``processor_path`` and ``init_args`` overriding the config, prepared and set up for ``stage``.

        Raises:
            ValueError: the config has no data section.
        """
        from lightning.pytorch.cli import LightningArgumentParser

        from lightning_lvp.cli import fit_classes

        if self.data is None:
            raise ValueError("this command needs -c CONFIG with a data section (as fit reads it)")
        spec = _plain(self.data)
        spec["init_args"] = {**(spec.get("init_args") or {}), "processor_path": processor_path, **init_args}
        parser = LightningArgumentParser(exit_on_error=False)
        parser.add_lightning_class_args(fit_classes()[1], "data", subclass_mode=True, required=True)
        dm = parser.instantiate(parser.parse_object({"data": spec})).data
        dm.prepare_data()
        dm.setup(stage)
        return dm

    # --------------------------------------------------------------------------------- provenance
    def config_path(self) -> str | None:
        """The single ``-c`` file (None without one; several joined by ``;``)."""
        return ";".join(self.configs) if self.configs else None

    def overrides(self) -> list[str]:
        """The command line's ``--model.*`` / ``--data.*`` overrides (they change what is measured)."""
        out, argv = [], self.argv
        for i, arg in enumerate(argv):
            if arg.startswith(SECTION_PREFIXES):
                value = "" if "=" in arg or i + 1 >= len(argv) else f"={argv[i + 1]}"
                out.append(arg + value)
        return out


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces (at any depth, also inside dicts and lists) as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------- parsers
def section_parser(prog: str, description: str | None = None, skip: Sequence[str] = ()):
    """``-c`` + fit's sections: ``model`` / ``data`` as LightningCLI adds them, the rest accepted."""
    from jsonargparse import ActionConfigFile
    from lightning.pytorch.cli import LightningArgumentParser

    from lightning_lvp.cli import fit_classes

    model_class, data_class = fit_classes()
    parser = LightningArgumentParser(prog=prog, description=description, parser_mode="omegaconf")
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="experiment YAML, the file fit takes (repeatable)"
    )
    parser.add_lightning_class_args(model_class, "model", subclass_mode=True, required=False)
    parser.add_lightning_class_args(data_class, "data", subclass_mode=True, required=False)
    parser.link_arguments("model.init_args.model_path", "data.init_args.processor_path")
    for name, (kind, text) in FIT_SECTIONS.items():
        if name not in skip:
            parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    return parser


def _summary(function: Callable) -> str:
    doc = inspect.getdoc(function) or ""
    return doc.split("\n\nArgs:")[0].strip()


def command_parser(function: Callable, prog: str, positional: bool = False):
    """The parser of one command: :func:`section_parser` + ``function``'s typed, documented arguments."""
    params = [p for p in inspect.signature(function).parameters if p != "experiment"]
    parser = section_parser(prog, _summary(function), skip=params)
    parser.add_function_arguments(function, as_group=True, as_positional=positional, skip={"experiment"})
    return parser


def _is_bool(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return annotation is bool or (bool in args and all(a in (bool, type(None)) for a in args))


def bare_bool_flags(function: Callable, argv: list[str]) -> list[str]:
    """``--overwrite`` alone means ``--overwrite=true`` (jsonargparse's bool flags otherwise need a value)."""
    hints = typing.get_type_hints(function)
    flags = {f"--{name}" for name, kind in hints.items() if _is_bool(kind)}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        nxt = argv[i + 1].lower() if i + 1 < len(argv) else None
        if arg in flags and nxt not in ("true", "false", "yes", "no", "1", "0", "null"):
            out.append("true")
    return out


def check_spellings(parser, argv: Sequence[str], renamed: dict[str, Any], lists: dict[str, str]) -> None:
    """Fails (``parser.error``: usage + message, exit 2) on a flag of the old spellings, naming the new one.

    Args:
        renamed: old flag -> the new spelling to tell (``"--rhos": "--schedules paper:START:STOP:STEP"``), or a
            function of the old flag's value returning it (None: the value is fine under the new meaning).
        lists: flags that used to take several values (or repeats) -> the separator of their one value now
            (``","``: a list ``[A,B]``; ``";"``: a schedules text ``'A;B'``).
    """
    known = set(parser._option_string_actions)
    seen: dict[str, list[list[str]]] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        flag, has_value, value = arg.partition("=")
        if not has_value:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        hint = renamed.get(flag)
        if callable(hint):
            hint = hint(value)
        if hint:
            parser.error(f"{flag} was renamed: use {hint}")
        under = "--" + flag[2:].replace("-", "_")
        if "-" in flag[2:] and under in known:
            parser.error(f"{flag} is spelled {under} (flags use underscores, as in LightningCLI)")
        if flag in lists:
            seen.setdefault(flag, []).append([value] if has_value else _values_after(argv, i))
    for flag, given in seen.items():
        if len(given) > 1 or len(given[0]) > 1:
            values, sep = [v for vs in given for v in vs], lists[flag]
            shown = f"[{sep.join(values)}]" if sep == "," else repr(sep.join(values))
            parser.error(f"{flag} takes ONE value now (not several, not repeated): {flag} {shown}")


def _values_after(argv: Sequence[str], i: int) -> list[str]:
    out = []
    for arg in argv[i + 1 :]:
        if arg.startswith("-"):
            break
        out.append(arg)
    return out


def run(
    function: Callable,
    argv: Sequence[str],
    prog: str,
    renamed: dict[str, Any] | None = None,
    lists: dict[str, str] | None = None,
    positional: bool = False,
) -> int:
    """Parses ``argv`` for ``function`` (:func:`command_parser`) and calls it; returns its exit code.

    Args:
        renamed: old flag -> new spelling (or a function of the old flag's value giving it), see
            :func:`check_spellings`.
        lists: flags that took several values or repeats before -> the separator of their one value now.
        positional: required arguments are positional (``demo init FOLDER``).
    """
    argv = list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = command_parser(function, prog, positional)
    check_spellings(parser, argv, renamed or {}, lists or {})
    cfg = parser.parse_args(bare_bool_flags(function, argv))
    names = [p for p in inspect.signature(function).parameters if p != "experiment"]
    kwargs = {name: cfg.get(name) for name in names}
    experiment = Experiment.from_namespace(cfg, argv)
    return int(function(**kwargs, experiment=experiment) or 0)


def run_group(prog: str, subcommands: dict[str, Callable], argv: Sequence[str], **kwargs: Any) -> int:
    """``PROG SUB [ARGS]`` for a command with subcommands (``probe relevance``, ``demo init``)."""
    argv = list(argv)
    if argv and argv[0] in subcommands:
        return run(subcommands[argv[0]], argv[1:], f"{prog} {argv[0]}", **kwargs)
    rows = "\n".join(f"  {name:<10} {_summary(fn).splitlines()[0]}" for name, fn in subcommands.items())
    text = f"usage: {prog} {{{','.join(subcommands)}}} [-h] [ARGS]\n\nsubcommands (each has --help):\n{rows}\n"
    wants_help = bool(argv) and argv[0] in ("-h", "--help")
    print(text if wants_help else f"{text}\nerror: expected one of {', '.join(subcommands)}",
          file=sys.stdout if wants_help else sys.stderr)  # fmt: skip
    return 0 if wants_help else 2
