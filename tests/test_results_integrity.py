"""No silent wrong results (issue #16): pruner folders without weights or with cut files are errors naming
the file; sweep and compare folders record what their rows were measured with and refuse to mix; reused
rows are said at WARNING; tables show n; a killed compare keeps its finished rows; missing config values
(pad / eos / image token ids) are errors naming the field; step-based progress bars count steps."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from cli_fixtures import sweep_folder

from lightning_lvp import adapter, compare, sweep
from lightning_lvp.cli import main
from lightning_lvp.io import load_pruners, save_pruners
from lightning_lvp.methods import LVPruning, UniformPruning
from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
SPEC = TinyLlavaSpec()  # 4 LLM layers, 16 patches


class Killed(Exception):
    """Stands for a kill in the middle of a sweep or comparison."""


def bound_lvp(dims, seed: int = 0) -> LVPruning:
    torch.manual_seed(seed)
    method = LVPruning([1, 2, 3], [0.5, 0.3, 0.1], [0.5, 0.3, 0.1], num_blocks=1, num_heads=2, dim=16)
    method.bind(dims)
    return method


# ------------------------------------------------------------------------------------------ pruners
def test_pruner_folder_without_weights_or_with_cut_files_is_an_error_naming_the_file(tmp_path):
    dims = adapter.text_dims(build_tiny_llava(SPEC).config)
    save_pruners(bound_lvp(dims), tmp_path / "p")
    assert torch.equal(load_pruners(tmp_path / "p", dims).state_dict()["decision.0.head.weight"],
                       bound_lvp(dims).state_dict()["decision.0.head.weight"])  # fmt: skip
    weights = (tmp_path / "p" / "pruners.safetensors").read_bytes()
    (tmp_path / "p" / "pruners.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"p/pruners\.safetensors not found: LVPruning has \d+ weight"):
        load_pruners(tmp_path / "p", dims)  # was: random modules, evaluated by sweep as if trained
    (tmp_path / "p" / "pruners.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"p/pruners\.safetensors is truncated or not a safetensors file"):
        load_pruners(tmp_path / "p", dims)
    (tmp_path / "p" / "pruners.safetensors").write_bytes(weights)
    meta = (tmp_path / "p" / "pruners.json").read_text()
    (tmp_path / "p" / "pruners.json").write_text(meta[: len(meta) // 2])
    with pytest.raises(ValueError, match=r"p/pruners\.json is truncated"):
        load_pruners(tmp_path / "p", dims)
    # a training-free method has no weights file, and needs none
    free = UniformPruning([1, 2], [0.5, 0.3])
    free.bind(dims)
    save_pruners(free, tmp_path / "free")
    assert not (tmp_path / "free" / "pruners.safetensors").exists()
    assert isinstance(load_pruners(tmp_path / "free", dims), UniformPruning)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["pruners.json", "pruners.safetensors"]  # no temp


# -------------------------------------------------------------------------------------------- sweep
@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model_dir, dims = sweep_folder(root, images=4)
    return root, model_dir, dims


def run_sweep(root, model_dir, out, rhos, batch_size=8, extra=()):
    return main(
        ["sweep", "-c", str(root / "cfg.yaml"), "--pruners", str(root / "pruners"), "--model_path", str(model_dir),
         "--schedules", f"paper:{rhos}", "--out", str(out), "--batch_size", str(batch_size), "--include_base",
         "false", *extra]
    )  # fmt: skip


def tb_steps(folder: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in folder.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("sweep/accuracy")] if "sweep/accuracy" in acc.Tags()["scalars"] else []
    return sorted(steps)


def test_sweep_records_its_settings_refuses_to_mix_and_says_what_it_reuses(sweep_setup, tmp_path, caplog, capsys,
                                                                           monkeypatch):  # fmt: skip
    root, model_dir, dims = sweep_setup
    out = tmp_path / "out"
    assert run_sweep(root, model_dir, out, "0.6") == 0
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert (
        settings["batch_size"] == 8 and len(settings["pruners_sha256"]) == 64 and len(settings["config_sha256"]) == 64
    )
    assert settings["model_fingerprint"].startswith("sha256:")
    printed = capsys.readouterr().out
    assert " n " in printed.splitlines()[0] and "[0.6, 0.4, 0.2]" in printed  # the table shows n
    # another batch size: refused, naming the setting (it appended rows on other samples before)
    with pytest.raises(FileExistsError, match=r"batch_size: 8 -> 4"):
        run_sweep(root, model_dir, out, "0.6,0.5", batch_size=4)
    # same settings: the finished row is reused, said at WARNING; a kill during the next schedule keeps it
    real = sweep.evaluate_one
    calls = []

    def dies_on_second(*a):
        calls.append(a[3])
        if len(calls) == 2:
            raise Killed("killed")
        return real(*a)

    monkeypatch.setattr(sweep, "evaluate_one", dies_on_second)
    with caplog.at_level(logging.WARNING, logger="lightning_lvp"), pytest.raises(Killed):
        run_sweep(root, model_dir, out, "0.6,0.5,0.45")
    assert any("reusing 1 rows" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert calls == [[0.5, 0.3, 0.1], [0.45, 0.25, 0.05]]
    rows = json.loads((out / "results.json").read_text())["rows"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [r["name"] for r in table] == ["[0.6, 0.4, 0.2]", "[0.5, 0.3, 0.1]"]
    assert tb_steps(out / "tensorboard") == [0, 1]
    for old in (out / "tensorboard").glob("events.*"):  # a point lost (kill between results.json and TensorBoard)
        old.unlink()
    monkeypatch.setattr(sweep, "evaluate_one", real)
    assert run_sweep(root, model_dir, out, "0.6,0.5,0.45") == 0
    assert tb_steps(out / "tensorboard") == [0, 1, 2]  # rebuilt from results.json
    # replaced pruners in the same folder: refused (it kept the old numbers before)
    other = LVPruning(after_layers=[1, 2, 4], keep_ratios=[0.5, 0.3, 0.1], train_ratios=[0.5, 0.3, 0.1], num_heads=4)
    other.bind(dims)
    pruners = root / "pruners"
    backup = {p.name: p.read_bytes() for p in pruners.iterdir()}
    save_pruners(other, pruners, overwrite=True)
    try:
        with pytest.raises(FileExistsError, match="pruners_sha256"):
            run_sweep(root, model_dir, out, "0.6")
    finally:
        for name, data in backup.items():
            (pruners / name).write_bytes(data)
    (out / "results.json").write_text('{"settings": {"conf')  # cut by hand: an error naming it
    with pytest.raises(ValueError, match=r"results\.json is truncated"):
        run_sweep(root, model_dir, out, "0.6")


# ------------------------------------------------------------------------------------------ compare
def labelled_batches(n_batches=1, batch_size=3, seed=0):
    from test_compare import labelled_batches as batches

    return batches(n_batches, batch_size, seed)


@pytest.fixture(scope="module")
def tiny():
    llava = build_tiny_llava(SPEC, seed=0)
    torch.manual_seed(0)
    lvp = LVPruning([1, 2, 3], [0.5, 0.3, 0.1], [0.5, 0.3, 0.1], num_blocks=1, num_heads=2, dim=16)
    PrunedLlava(llava, lvp)
    return llava, lvp


def test_killed_compare_keeps_its_rows_and_resumes_them(tiny, tmp_path, monkeypatch):
    llava, lvp = tiny
    batches = labelled_batches()
    kwargs = dict(fastv_k=1, knee_args={"llm_layer": 1}, flops_samples=0, peers=())
    whole = compare.run_comparison(llava, lvp, batches, **kwargs)
    out = tmp_path / "out"
    meta = {"settings": {"batch_size": 3}}
    real = compare.evaluate_entry
    calls = []

    def dies_on_fourth(*a):
        calls.append(a[1].name)
        if len(calls) == 4 and not resuming:
            raise Killed("killed")
        return real(*a)

    resuming = False

    monkeypatch.setattr(compare, "evaluate_entry", dies_on_fourth)
    on_row = lambda rows: compare.write_results(rows, out, {**meta, "complete": False}, overwrite=True)  # noqa: E731
    with pytest.raises(Killed):
        compare.run_comparison(llava, lvp, batches, on_row=on_row, **kwargs)
    saved = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["base", "lvp_rho0.6", "lvp_rho0.5"] and not saved["complete"]
    assert "| lvp_rho0.5 |" in (out / "comparison.md").read_text()
    # a rerun with the same settings resumes; other settings or a finished comparison are refused
    done, refusal = compare.previous_rows(out, meta["settings"], overwrite=False)
    assert refusal is None and [r["name"] for r in done] == ["base", "lvp_rho0.6", "lvp_rho0.5"]
    _, refusal = compare.previous_rows(out, {"batch_size": 4}, overwrite=False)
    assert "batch_size: 3 -> 4" in refusal
    calls.clear()
    resuming = True
    resumed = compare.run_comparison(llava, lvp, batches, done=done, on_row=on_row, **kwargs)
    assert "base" not in calls and calls[0] == "lvp_rho0.45"
    assert [r["name"] for r in resumed] == [r["name"] for r in whole]
    for a, b in zip(whole, resumed, strict=True):
        assert a["accuracy"] == b["accuracy"] and a["n"] == b["n"] and a["kept_per_stage"] == b["kept_per_stage"]
    compare.write_results(resumed, out, {**meta, "complete": True}, overwrite=True)
    _, refusal = compare.previous_rows(out, meta["settings"], overwrite=False)
    assert "a finished comparison" in refusal
    assert "| n |" in compare.markdown_table(resumed) and f"| {whole[0]['n']} |" in compare.markdown_table(resumed)


# ------------------------------------------------------------------------------ config errors, bars
def test_missing_config_ids_are_errors_naming_the_field():
    llava = build_tiny_llava(SPEC)
    assert adapter.pad_token_id(llava) == SPEC.pad_token_id and adapter.eos_token_id(llava) is not None
    llava.config.text_config.pad_token_id = None
    if hasattr(llava.config, "pad_token_id"):
        llava.config.pad_token_id = None
    with pytest.raises(ValueError, match=r'no pad token id: set "pad_token_id" in its "text_config"'):
        adapter.pad_token_id(llava)
    llava.config.text_config.eos_token_id = None
    with pytest.raises(ValueError, match=r'no end-of-sequence id: set "eos_token_id"'):
        adapter.eos_token_id(llava)
    llava.config.image_token_id = None
    with pytest.raises(ValueError, match=r'no image token id: set "image_token_id"'):
        adapter.image_token_id(llava)


def test_tokenizer_without_pad_or_image_token_is_an_error_naming_the_folder(tmp_path):
    from transformers import AutoProcessor

    from lightning_lvp.data.datamodule import LlavaDataModule
    from lightning_lvp.data.llava_dataset import LlavaDataset
    from lightning_lvp.data.tokenizer import save_tiny_processor

    save_tiny_processor(tmp_path, 16, 8)
    dm = LlavaDataModule(str(tmp_path))
    processor = dm.load_processor()
    processor.tokenizer.pad_token = None
    with pytest.raises(
        ValueError, match=rf'tokenizer in data.processor_path={tmp_path} has no pad token: set "pad_token"'
    ):
        dm.pad_token_id()
    other = AutoProcessor.from_pretrained(tmp_path)
    unknown = other.tokenizer.unk_token_id  # what a tokenizer without <image> answers
    other.tokenizer.convert_tokens_to_ids = lambda token: unknown
    with pytest.raises(ValueError, match="has no <image> token"):
        LlavaDataset([], [str(tmp_path)], other)


def test_step_based_progress_bar_counts_steps():
    import lightning as L

    from lightning_lvp.training.progress import StepProgressBar

    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, callbacks=[bar])
    bar._trainer = trainer  # what Lightning sets in setup()
    assert bar._get_train_description(0).startswith("Step (epoch 0)")  # was "Epoch 0/-2"
    assert bar.total_train_batches == 300
    by_epochs = StepProgressBar()
    by_epochs._trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, callbacks=[by_epochs])
    assert by_epochs._get_train_description(1).startswith("Epoch 1/2")
    assert trainer.progress_bar_callback is bar
