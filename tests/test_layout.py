"""The package layout of docs/DESIGN.md: ``commands -> training -> eval / core``, evaluation without Lightning,
and the old module paths (shims) that saved configs, checkpoints and user code still name (#12 item 3)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_lvp

PKG = Path(lightning_lvp.__file__).parent
# the layers above eval and the core: nothing below them may import these
UPPER = ("lightning_lvp.training", "lightning_lvp.commands", "lightning_lvp.cli")
# old module path -> new one (the shim re-exports it)
MOVED = {
    "lightning_lvp.lit_module": "lightning_lvp.training.module",
    "lightning_lvp.callbacks": "lightning_lvp.training.callbacks",
    "lightning_lvp.curriculum": "lightning_lvp.training.curriculum",
    "lightning_lvp.progress": "lightning_lvp.training.progress",
    "lightning_lvp.evaluate": "lightning_lvp.eval.teacher_forced",
    "lightning_lvp.plots": "lightning_lvp.eval.plots",
}
CORE = [
    "adapter",
    "attention",
    "checkpoint",
    "decision",
    "generation",
    "io",
    "model",
    "sampling",
    "schedules",
    "state",
    "teacher",
    "tiny",
]


def eval_modules() -> list[str]:
    eval_dir = PKG / "eval"
    return ["lightning_lvp.eval"] + [f"lightning_lvp.eval.{m.name}" for m in pkgutil.iter_modules([str(eval_dir)])]


def imported_names(path: Path) -> set[str]:
    """Every module named by an import statement of ``path`` (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_eval_and_core_import_without_lightning_and_without_pyplot():
    """Every eval module (and the core) imports with Lightning made unimportable, imports no pyplot and
    never calls ``matplotlib.use`` (the lmms-eval plugin runs inside another program)."""
    modules = eval_modules() + [f"lightning_lvp.{m}" for m in CORE] + ["lightning_lvp.evaluate", "lightning_lvp.plots"]
    code = (
        "import sys, importlib\n"
        "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "import matplotlib\n"
        "def use(*a, **k): raise AssertionError('matplotlib.use called at import')\n"
        "matplotlib.use = use\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'matplotlib.pyplot imported'\n"
        "print(len(" + repr(modules) + "))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == len(modules) >= 10


def test_lightning_blocking_is_real():
    """The blocking of the test above does stop a Lightning import (else it would prove nothing)."""
    code = "import sys; sys.modules['lightning'] = None\nimport lightning_lvp.training.module\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr and "lightning" in out.stderr.splitlines()[-1]


def test_import_rule_eval_and_core_never_import_training_or_commands():
    """docs/DESIGN.md: commands -> training -> eval / core. Checked on the import statements (also the ones
    inside functions), so a lazy import cannot hide a cycle."""
    lower = [PKG / "eval"] + [PKG / f"{m}.py" for m in CORE] + [PKG / "methods", PKG / "data"]
    offenders = []
    for root in lower:
        for path in [root] if root.is_file() else sorted(root.rglob("*.py")):
            bad = [n for n in imported_names(path) if n.startswith(UPPER) or n in MOVED and "training" in MOVED[n]]
            offenders += [f"{path.relative_to(PKG)}: {n}" for n in bad]
    # the one lazy exception: the old path lightning_lvp.checkpoint.AtomicCheckpointIO (module __getattr__)
    offenders.remove("checkpoint.py: lightning_lvp.training.checkpoint_io")
    assert offenders == []


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_re_export_the_new_objects(old):
    """Shims: every public name of the new module that the old one had is the SAME object there."""
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(MOVED[old])
    assert old_mod.__all__, old
    for name in old_mod.__all__:
        obj, new_obj = getattr(old_mod, name), getattr(new_mod, name, getattr(old_mod, name))
        # the old LVPModule also takes the arguments that moved to DemoBaseModule, to fail naming it
        if (old, name) == ("lightning_lvp.lit_module", "LVPModule"):
            assert issubclass(obj, new_obj) and obj.__mro__[1] is new_obj
        else:
            assert obj is new_obj, (old, name)
    public = {n for n, v in vars(new_mod).items() if getattr(v, "__module__", None) == MOVED[old] and n[0] != "_"}
    assert public <= set(old_mod.__all__), (old, sorted(public - set(old_mod.__all__)))


def test_old_checkpoint_io_path():
    from lightning_lvp.checkpoint import AtomicCheckpointIO as old
    from lightning_lvp.training.checkpoint_io import AtomicCheckpointIO

    assert old is AtomicCheckpointIO
