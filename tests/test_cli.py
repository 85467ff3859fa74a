"""The real CLI entry with shipped configs shrunk by flags (litgpt test_full / template fast_dev_run style)."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from cli_fixtures import small_data_args, tiny_model_folder

from lightning_lvp.cli import main, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny_llava"))


def scalar_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | {f"image:{t}" for t in acc.Tags()["images"]}
    return tags


def fit_args(model_dir: Path, root: Path, steps: int = 2, extra: list[str] = ()) -> list[str]:
    return [
        "fit",
        "-c",
        str(REPO / "experiments" / "demo.yaml"),
        f"--model.init_args.model_path={model_dir}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        *small_data_args(root.parent / "digits_cache"),
        *extra,
    ]


def test_fit_logs_ratios_losses_and_sweep_and_keeps_llava_frozen(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    before = load_file(str(model_dir / "model.safetensors"))
    main(fit_args(model_dir, tmp_path))
    tags = scalar_tags(tmp_path / "runs")
    for tag in (
        "train/loss_causal",
        "train/loss_ratio",
        "train/kept_ratio/input",
        "train/loss_distill",  # the demo's opt-in distillation term
        "train/kept_ratio/layer4",
        "val/kept_ratio/layer2",
        "val/acc",
        "val/acc@base",
        "val/acc@rho0.5",
        "val/tflops@rho0.45",
        "val/relevant_kept/input@rho0.5",  # digits entries carry relevant patches
        "val/kept_overlap/layer4@rho0.6",
        "image:val/pruning",  # kept patches per stage drawn on validation images
        "image:val/acc_vs_tflops",  # the sweep plot
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    out = capsys.readouterr().out
    assert "Ratio sweep" in out and "rho0.6" in out and "TensorBoard logs" in out
    assert "relevant kept" in out and "kept overlap" in out
    ckpt = torch.load(glob.glob(str(tmp_path / "runs" / "**" / "last.ckpt"), recursive=True)[0], weights_only=False)
    assert not any(k.startswith("model.llava.") for k in ckpt["state_dict"]), "checkpoint holds the frozen LLaVA"
    assert any(k.startswith("method.decision.") for k in ckpt["state_dict"])
    after = load_file(str(model_dir / "model.safetensors"))  # base folder untouched: same tensors, same values
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"fit changed the base model's weights on disk: {changed[:5]}"


def test_resume_continues_from_checkpoint(model_dir, tmp_path):
    main(fit_args(model_dir, tmp_path / "a", steps=2))
    last = glob.glob(str(tmp_path / "a" / "runs" / "**" / "last.ckpt"), recursive=True)[0]
    first = torch.load(last, weights_only=False)
    main(fit_args(model_dir, tmp_path / "b", steps=4, extra=[f"--ckpt_path={last}"]))
    resumed = torch.load(
        glob.glob(str(tmp_path / "b" / "runs" / "**" / "last.ckpt"), recursive=True)[0], weights_only=False
    )
    assert first["global_step"] == 2 and resumed["global_step"] == 4
    key = next(k for k in first["state_dict"] if k.startswith("method."))
    assert not torch.equal(first["state_dict"][key], resumed["state_dict"][key])
    # export: pruner-only folder from the checkpoint, loadable on its own, same weights
    from lightning_lvp import adapter
    from lightning_lvp.io import load_pruners

    assert main(["export", f"--ckpt_path={last}", f"--out={tmp_path / 'pruners'}"]) == 0
    method = load_pruners(tmp_path / "pruners", adapter.text_dims(adapter.load_config(str(model_dir))))
    for name, value in method.state_dict().items():
        assert torch.equal(value, first["state_dict"]["method." + name])
    with pytest.raises(FileExistsError, match="already holds pruners"):
        main(["export", f"--ckpt_path={last}", f"--out={tmp_path / 'pruners'}"])


def test_bad_config_values_name_the_field(model_dir, tmp_path):
    with pytest.raises(ValueError, match="keep_ratios must be non-increasing"):
        main(fit_args(model_dir, tmp_path, extra=["--model.init_args.method.init_args.keep_ratios=[0.5,0.6,0.1]"]))
    with pytest.raises(ValueError, match=r"after_layers \[1, 2, 7\] out of range for an LLM with 6 layers"):
        main(fit_args(model_dir, tmp_path, extra=["--model.init_args.method.init_args.after_layers=[1,2,7]"]))
    with pytest.raises(ValueError, match="model.warmup_ratio must be in"):
        main(fit_args(model_dir, tmp_path, extra=["--model.init_args.warmup_ratio=1.5"]))


def test_demo_base_config_reproduces_a_loadable_base(tmp_path):
    """experiments/demo_base.yaml (shrunk) trains a base from scratch and saves it like assets/demo_base."""
    from safetensors.torch import load_file

    from lightning_lvp import adapter

    out = tmp_path / "base"
    main(
        [
            "fit",
            "-c",
            str(REPO / "experiments" / "demo_base.yaml"),
            f"--model.init_args.model_path={REPO / 'assets' / 'demo_init'}",
            f"--model.init_args.save_base_to={out}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            *small_data_args(tmp_path / "cache"),
        ]
    )
    shipped = adapter.load_config(str(REPO / "assets" / "demo_base"))
    assert adapter.text_dims(adapter.load_config(str(out))) == adapter.text_dims(shipped)
    assert (
        load_file(str(out / "model.safetensors")).keys()
        == load_file(str(REPO / "assets" / "demo_base" / "model.safetensors")).keys()
    )
    assert (out / "tokenizer.json").read_text() == (REPO / "assets" / "demo_base" / "tokenizer.json").read_text()
    model = adapter.load_llava(str(out))  # loads with our attention, frozen
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------ commands (jsonargparse)
def command_functions():
    """Every command function of ``python -m lightning_lvp`` and the arguments a parse needs besides ``-c``."""
    from lightning_lvp.commands import compare, demo, evaluate, export, flops, probe, sweep

    return {
        "flops": (flops.flops, []),
        "sweep": (sweep.sweep, ["--pruners", "p"]),
        "compare": (compare.compare, ["--pruners", "p", "--out", "o"]),
        "export": (export.export, ["--ckpt_path", "x.ckpt", "--out", "o"]),
        "evaluate": (
            evaluate.evaluate,
            ["--benchmark", "gqa", "--questions", "q", "--image_folder", "i", "--answers", "a"],
        ),
        "probe relevance": (probe.relevance, []),
        "probe position": (probe.position, []),
        "demo init": (demo.init, ["some/folder"]),
    }


def documented_args(function) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring: name -> first words of its text."""
    import inspect
    import re

    doc = inspect.getdoc(function).split("Args:\n", 1)[1]
    return {m.group(1): m.group(2).split(".")[0][:30] for m in re.finditer(r"^    (\w+): (.+)$", doc, re.M)}


def test_top_level_help_lists_every_command(capsys):
    from lightning_lvp.commands import COMMANDS

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", *COMMANDS):
        assert f"\n  {name} " in text, name
    assert main(["no_such_command"]) == 2 and "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(command_functions()))
def test_command_help_documents_every_argument(name, capsys):
    """Each typed argument has a docstring entry and appears in --help with that text (jsonargparse)."""
    import inspect
    import textwrap

    function, _ = command_functions()[name]
    params = [p for p in inspect.signature(function).parameters if p != "experiment"]
    docs = documented_args(function)
    assert sorted(docs) == sorted(params), f"{name}: docstring Args != signature"
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    for param in params:
        assert f"--{param}" in text or (name == "demo init" and param == "folder"), f"{name}: --{param}"
        assert " ".join(textwrap.wrap(docs[param])) in text, f"{name}: help of {param}"
    for section in ("-c CONFIG", "--model", "--data", "--trainer"):
        assert section in text


@pytest.mark.parametrize("name", list(command_functions()))
def test_every_command_parses_the_demo_config(name):
    """``-c experiments/demo.yaml``: the file fit takes, with model/data validated as fit validates them."""
    from lightning_lvp.commands.experiment import Experiment, command_parser

    function, required = command_functions()[name]
    parser = command_parser(function, name, positional=name == "demo init")
    cfg = parser.parse_args(["-c", str(REPO / "experiments" / "demo.yaml"), *required])
    experiment = Experiment.from_namespace(cfg, [])
    assert experiment.model_path() == "assets/demo_base"
    assert cfg.data.init_args.processor_path == "assets/demo_base"  # linked as in fit
    assert experiment.method_spec()["init_args"]["after_layers"] == [0, 2, 4]
    assert experiment.schedules(None, 3) == [[0.6, 0.4, 0.2], [0.5, 0.3, 0.1], [0.45, 0.25, 0.05]]  # RatioSweep


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_for_the_commands(path):
    from lightning_lvp.commands.experiment import Experiment

    experiment = Experiment.load(path)
    if path.name != "zero3.yaml":  # an overlay on a paper config
        assert experiment.model_path() and experiment.data is not None


def test_flops_on_a_shipped_7b_config(capsys):
    """The paper config names the hub id: its shipped architecture config is used (no download)."""
    import json

    assert main(["flops", "-c", str(REPO / "experiments" / "rho05.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == [None, [0.6, 0.4, 0.2], [0.5, 0.3, 0.1], [0.45, 0.25, 0.05]]
    assert [r["paper_tflops"] for r in rows] == [8.38, 3.97, 3.18, 2.79]


@pytest.mark.parametrize(
    "argv, new",
    [
        (["compare", "--model", "assets/demo_base", "--pruners", "p", "--out", "o"], "--model_path assets/demo_base"),
        (["compare", "--data", "experiments/demo.yaml", "--pruners", "p", "--out", "o"], "-c experiments/demo.yaml"),
        (["compare", "--match-rho", "0.5"], "--match_rho"),
        (["compare", "--rhos", "0.6", "0.5"], "--schedules"),
        (["compare", "--cache-dir", "c"], "--cache_dir"),
        (["compare", "--knee-keep-ratio", "0.5"], "--knee_keep_ratio"),
        (["evaluate", "--ratios", "paper:0.5"], "--schedules"),
        (["evaluate", "--no_prompt_suffix"], "--prompt_suffix false"),
        (["evaluate", "--image_folder", "a", "--image_folder", "b"], "--image_folder [a,b]"),
        (["probe", "relevance", "--data_set", "digits.question_types=[cell]"], "--data.init_args.KEY=VALUE"),
        (["probe", "relevance", "--no-rotary"], "--rotary false"),
        (["probe", "relevance", "--after_layer", "0", "2"], "--after_layer [0,2]"),
        (["sweep", "--rhos", "0.3:0.8:0.05"], "--schedules paper:"),
        (["flops", "--model-config", "x"], "--model_config"),
    ],
)
def test_old_spellings_fail_naming_the_new_one(argv, new, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and new in err, err


def test_pseudo_keys_and_bad_values_fail_naming_the_field(tmp_path, capsys):
    """A key fit rejects fails every command the same way; a bad value names its field (jsonargparse)."""
    text = (REPO / "experiments" / "demo.yaml").read_text()
    for key, where in (("sweep_schedules", "    lambda_causal: 1.0\n"), ("model_config", "    lambda_causal: 1.0\n")):
        bad = tmp_path / f"{key}.yaml"
        bad.write_text(text.replace(where, f"    {key}: x\n{where}"))
        for argv in (["sweep", "--pruners", "p"], ["flops"], ["compare", "--pruners", "p", "--out", "o"]):
            with pytest.raises(SystemExit):
                main([*argv, "-c", str(bad)])
            assert key in capsys.readouterr().err, (key, argv)
        with pytest.raises(SystemExit):  # fit itself rejects it too
            parse_config(["-c", str(bad)])
        assert key in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "-c", str(REPO / "experiments" / "demo.yaml"), "--pruners", "p", "--batch_size", "many"])
    assert "batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "-c", str(REPO / "experiments" / "demo.yaml"), "--pruners", "p", "--data.init_args.dataset=x"])
    assert "dataset" in capsys.readouterr().err
