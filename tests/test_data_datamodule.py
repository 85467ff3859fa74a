"""LlavaDataModule: digits end to end, LLaVA JSON with a held-out split, argument checks, --help text."""
# ruff: noqa: F811  (pytest fixtures imported from data_fixtures are redefined as arguments)

from __future__ import annotations

import logging

import pytest
import torch
from data_fixtures import entry, processor, processor_dir, write_image, write_json  # noqa: F401

from lightning_lvp.data.datamodule import LengthGroupedSampler, LlavaDataModule
from lightning_lvp.data.digits import DigitsConfig

SMALL_DIGITS = DigitsConfig(
    grid_size=2,
    cell_px=8,
    patch_size=8,
    train_images=10,
    val_images=4,
    questions_per_type=1,
    question_types=["cell", "row_count"],
)


@pytest.fixture(scope="module")
def digits_dm(processor_dir, tmp_path_factory):
    dm = LlavaDataModule(
        str(processor_dir),
        digits=SMALL_DIGITS,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        batch_size=4,
        num_workers=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_digits_batches_follow_the_contract(digits_dm):
    assert (len(digits_dm.train_set), len(digits_dm.val_set)) == (20, 8)
    for loader in (digits_dm.train_dataloader(), digits_dm.val_dataloader()):
        batch = next(iter(loader))
        assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape == (4, 3, 16, 16)
        assert (batch["vision_mask"].sum(-1) == digits_dm.num_image_tokens).all()
        assert (batch["labels"] != -100).any(-1).all()  # validation is teacher-forced: labels included
        assert set(batch["question_types"]) <= {"cell", "row_count"}
        assert batch["relevant_mask"].any(-1).all()
    batch = next(iter(digits_dm.predict_dataloader()))
    assert "labels" not in batch and (batch["attention_mask"][:, -1] == 1).all()  # left padded


def test_digits_batch_runs_through_a_tiny_llava(digits_dm, processor):
    from lightning_lvp.data.collate import answer_accuracy
    from lightning_lvp.data.tokenizer import tiny_spec_overrides
    from lightning_lvp.tiny import build_tiny_llava

    model = build_tiny_llava(**tiny_spec_overrides(processor))
    batch = next(iter(digits_dm.val_dataloader()))
    keys = ("input_ids", "attention_mask", "pixel_values", "labels")
    out = model(**{k: batch[k] for k in keys})
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    assert answer_accuracy(out.logits, batch["labels"]).shape == (4,)


def test_digits_size_must_match_the_processor(processor_dir, tmp_path):
    dm = LlavaDataModule(str(processor_dir), digits=DigitsConfig(grid_size=3), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.digits.grid_size \* data.digits.cell_px = 24 must equal .* 16"):
        dm.setup()


def _mix(tmp_path):
    write_image(tmp_path / "img" / "a.png")
    entries = [entry(f"e{i}", "a.png") for i in range(40)] + [entry("t", image=None)]
    return write_json(tmp_path / "mix.json", entries)


def test_llava_json_with_held_out_split(processor_dir, tmp_path, caplog):
    kwargs = dict(dataset="llava", train_json=str(_mix(tmp_path)), image_folder=str(tmp_path / "img"), num_workers=0)
    with caplog.at_level(logging.INFO):
        dm = LlavaDataModule(str(processor_dir), val_fraction=0.25, **kwargs)
        dm.setup()
    assert "kept 40 of 41; dropped 1 (text_only=1)" in caplog.text
    train, val = [e["id"] for e in dm.train_set.entries], [e["id"] for e in dm.val_set.entries]
    assert (len(train), len(val)) == (30, 10) and not set(train) & set(val)
    again = LlavaDataModule(str(processor_dir), val_fraction=0.25, **kwargs)
    again.setup()
    assert [e["id"] for e in again.val_set.entries] == val  # deterministic for the seed
    separate = LlavaDataModule(str(processor_dir), val_json=kwargs["train_json"], **kwargs)
    separate.setup()
    assert len(separate.train_set) == len(separate.val_set) == 40
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 30 and "relevant_mask" not in batch


def test_skip_policy_counts_in_the_datamodule(processor_dir, tmp_path):
    path = write_json(tmp_path / "mix.json", [entry("ok", "a.png"), entry("gone", "gone.png")])
    write_image(tmp_path / "a.png")
    dm = LlavaDataModule(
        str(processor_dir), dataset="llava", train_json=str(path), val_json=str(path), image_folder=str(tmp_path),
        bad_samples="skip", num_workers=0,
    )  # fmt: skip
    dm.setup()
    assert [b["ids"] for b in dm.val_dataloader()] == [["ok"]]
    assert dm.skip_counts("val") == {"missing_image": 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset="coco"), "data.dataset"),
        (dict(dataset="llava"), "data.train_json and data.image_folder"),
        (dict(val_fraction=1.0), "data.val_fraction"),
        (dict(batch_size=0), "data.batch_size"),
        (dict(num_workers=-1), "data.num_workers"),
        (dict(padding_side="top"), "data.padding_side"),
        (dict(bad_samples="ignore"), "data.bad_samples"),
    ],
)
def test_arguments_are_checked_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlavaDataModule("model", **kwargs)


def test_missing_files_name_the_argument(tmp_path):
    dm = LlavaDataModule(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="data.processor_path"):
        dm.setup()


def test_length_grouped_sampler():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    sampler = LengthGroupedSampler(lengths, batch_size=2, megabatch_mult=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(8))
    for start in (0, 4):
        mega = [lengths[i] for i in order[start : start + 4]]
        assert mega == sorted(mega, reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != order or len(set(lengths)) == 1


def test_help_shows_every_argument_docstring():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LlavaDataModule, "data")
    text = parser.format_help()
    assert "folder with the model's saved LlavaProcessor" in text
    assert '"raise" a clear error naming the entry id and file' in text
    assert "--data.digits.help" in text
    parser.exit_on_error = False
    cfg = parser.parse_args(["--data.processor_path=model", "--data.digits.grid_size=4"])
    assert cfg.data.digits.grid_size == 4
