"""What was written before the #12 layout still loads: configs naming the old class paths, pruner folders
and training checkpoints in the old format (built here by hand), and the pruner weights registered once.

No pruning-method class moved (``lightning_lvp.methods.*`` stayed), so a ``pruners.json`` of before #12
names the same class paths; what moved is the LightningModule and its callbacks (shims at the old paths)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_fixtures import tiny_model_folder
from safetensors.torch import save

from lightning_lvp import adapter
from lightning_lvp.checkpoint import load_checkpoint_file
from lightning_lvp.cli import parse_config, run_lightning_cli
from lightning_lvp.io import instantiate, load_method
from lightning_lvp.methods import LVPruning
from lightning_lvp.model import PrunedLlava

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [p for p in sorted((REPO / "experiments").glob("*.yaml")) if p.name != "zero3.yaml"]
OLD_PATHS = {  # new class path -> the one the shipped configs (and saved config.yaml files) named before #12
    "lightning_lvp.training.module.LVPModule": "lightning_lvp.lit_module.LVPModule",
    "lightning_lvp.training.callbacks.": "lightning_lvp.callbacks.",
}
# the LVPModule arguments that moved to DemoBaseModule, at the defaults every pre-#12 checkpoint of a pruner run holds
REMOVED_HPARAMS = {
    "from_scratch": False,
    "train_base": False,
    "curriculum": False,
    "curriculum_start": 4,
    "curriculum_window": 256,
    "save_base_to": None,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny_llava"))


def old_spelling(text: str) -> str:
    for new, old in OLD_PATHS.items():
        text = text.replace(new, old)
    return text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_name_the_new_paths_and_parse_with_the_old_ones(path, tmp_path):
    text = path.read_text()
    assert "lightning_lvp.lit_module" not in text and "lightning_lvp.callbacks." not in text
    new = parse_config(["-c", str(path)])
    if old_spelling(text) == text:  # demo_base.yaml: DemoBaseModule never had an old path
        assert new.model.class_path == "lightning_lvp.training.demo_base.DemoBaseModule"
        return
    (tmp_path / path.name).write_text(old_spelling(text))
    old = parse_config(["-c", str(tmp_path / path.name)])
    assert old.model.class_path == "lightning_lvp.lit_module.LVPModule"
    # the same arguments, plus the moved ones at their defaults (accepted at the old path only, to fail naming
    # DemoBaseModule when set)
    assert old.model.init_args.as_dict() == {**new.model.init_args.as_dict(), **REMOVED_HPARAMS}
    callbacks = [c for c in old.trainer.callbacks or [] if c.class_path.startswith("lightning_lvp.callbacks.")]
    for old_cb, new_cb in zip(
        callbacks, [c for c in new.trainer.callbacks if c.class_path.startswith("lightning_lvp.")]
    ):
        assert type(instantiate(old_cb.as_dict())) is type(instantiate(new_cb.as_dict()))


def _method(dims) -> LVPruning:
    method = LVPruning(after_layers=[1, 2], keep_ratios=[0.5, 0.3], train_ratios=[0.5, 0.3], num_heads=4)
    method.bind(dims)
    with torch.no_grad():
        for p in method.parameters():
            p.normal_()  # not the initial values: a fresh build must not pass for a loaded one
    return method


@pytest.mark.parametrize("class_path", ["lightning_lvp.methods.lvp.LVPruning", "lightning_lvp.methods.LVPruning"])
def test_pruner_folder_in_the_old_format_loads(model_dir, tmp_path, class_path):
    """pruners.json as format 1 wrote it before #12 and #14 (no ``family``), written here by hand."""
    dims = adapter.text_dims(adapter.load_config(str(model_dir)))
    method = _method(dims)
    folder = tmp_path / "pruners"
    folder.mkdir()
    tensors = {k: v.detach().contiguous() for k, v in method.state_dict().items()}
    (folder / "pruners.safetensors").write_bytes(save(tensors))
    meta = {
        "format_version": 1,
        "method": {"class_path": class_path, "init_args": dict(method.init_args)},
        "dims": vars(dims),
        "after_layers": [1, 2],
        "keep_ratios": [0.5, 0.3],
        "num_parameters": sum(t.numel() for t in tensors.values()),
    }
    (folder / "pruners.json").write_text(json.dumps(meta, indent=2))
    loaded = load_method(folder, dims)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tensors.items())
    model = PrunedLlava.from_pretrained(str(model_dir), str(folder))
    assert all(torch.equal(model.method.state_dict()[k], v) for k, v in tensors.items())


def _fit_args(model_dir: Path, root: Path, extra: list[str] = ()) -> list[str]:
    """experiments/demo.yaml shrunk in the file: 3 steps, last.ckpt at step 3."""
    cfg = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    cfg["trainer"].update(max_steps=3, val_check_interval=3, limit_val_batches=1, default_root_dir=str(root))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "runs")
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" in c["class_path"]]
    cfg["model"]["init_args"]["model_path"] = str(model_dir)
    data = cfg["data"]["init_args"]
    data.update(cache_dir=str(root.parent / "cache"), batch_size=4, val_batch_size=8, num_workers=0)
    data["digits"].update(train_images=8, val_images=8)
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return ["-c", str(root / "run.yaml"), *extra]


def test_checkpoint_in_the_old_format_loads_and_validates(model_dir, tmp_path):
    """A pruner-training checkpoint as written before #12: hyperparameters with the arguments that moved to
    DemoBaseModule and the old class path, the pruners under ``method.*``. It loads as pruners, and
    ``fit --ckpt_path`` with today's config restores exactly its weights (max_steps reached: no step runs)."""
    cli = run_lightning_cli(["fit", *_fit_args(model_dir, tmp_path / "fit")])
    module = cli.model
    # the method is registered once (model.method), its checkpoint keys stay method.*
    assert [name for name, m in module.named_modules() if m is module.method] == ["model.method"]
    trainable = [p for p in module.parameters() if p.requires_grad]  # the frozen base has none
    assert {id(p) for p in trainable} == {id(p) for p in module.method.parameters()} and trainable
    ckpt_path = glob.glob(str(tmp_path / "fit" / "runs" / "**" / "last.ckpt"), recursive=True)[0]
    ckpt = load_checkpoint_file(ckpt_path)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("method.") for k in keys), keys[:5]
    # rewrite it in the pre-#12 format
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], **REMOVED_HPARAMS}
    ckpt["hyper_parameters"]["_class_path"] = "lightning_lvp.lit_module.LVPModule"
    ckpt["lvp_method"].pop("family", None)
    trained = {k.removeprefix("method."): v for k, v in ckpt["state_dict"].items()}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    model = PrunedLlava.from_pretrained(str(model_dir), str(old))
    assert all(torch.equal(model.method.state_dict()[k], v) for k, v in trained.items())
    # Lightning's own reader (fit --ckpt_path): the hyperparameters re-parse through the old class path
    resumed = run_lightning_cli(["fit", *_fit_args(model_dir, tmp_path / "resumed", [f"--ckpt_path={old}"])])
    assert type(resumed.model).__module__ == "lightning_lvp.lit_module" and resumed.trainer.global_step == 3
    state = resumed.model.method.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_state_dict_of_a_module_that_registered_the_method_twice_loads(model_dir):
    """Before #12 ``LVPModule.state_dict()`` held the pruners twice (``method.*`` and ``model.method.*``)."""
    from lightning_lvp.training.module import LVPModule

    dims = adapter.text_dims(adapter.load_config(str(model_dir)))
    source = _method(dims)
    weights = {f"method.{k}": v for k, v in source.state_dict().items()}
    doubled = {**weights, **{f"model.{k}": v for k, v in weights.items()}}
    module = LVPModule(str(model_dir), method=_method(dims))
    module.configure_model()
    result = module.load_state_dict(doubled, strict=False)
    assert result.unexpected_keys == [] and not [k for k in result.missing_keys if "method" in k]
    assert all(torch.equal(module.method.state_dict()[k], v) for k, v in source.state_dict().items())
    assert set(module.state_dict()) == set(weights) | {k for k in module.state_dict() if k.startswith("model.llava.")}
