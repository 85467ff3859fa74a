"""LLaVA-format loading: filtering counts and every kind of bad input (raise with id + file, or counted skip)."""
# ruff: noqa: F811  (pytest fixtures imported from data_fixtures are redefined as arguments)

from __future__ import annotations

import logging

import pytest
import torch
from data_fixtures import entry, processor, processor_dir, turns, write_image, write_json  # noqa: F401
from PIL import Image

from lightning_lvp.data.collate import LlavaCollator, SkipCountingLoader
from lightning_lvp.data.llava_dataset import (
    BadSampleError,
    LlavaDataset,
    entry_problem,
    expand_to_square,
    filter_entries,
    load_entries,
)


def test_filtering_keeps_image_entries_and_counts_the_rest():
    entries = [entry(f"i{k}") for k in range(5)] + [entry(f"t{k}", image=None) for k in range(3)]
    entries.append(entry("bad", conversations=turns("<image>\nQ?", "")))
    kept, report = filter_entries(entries, "mix.json", policy="skip")
    assert [e["id"] for e in kept] == [f"i{k}" for k in range(5)]
    assert (report.total, report.kept, dict(report.dropped)) == (9, 5, {"text_only": 3, "empty_reply": 1})
    assert report.summary() == "mix.json: kept 5 of 9; dropped 4 (empty_reply=1, text_only=3)"
    kept, report = filter_entries(entries[:8], "mix.json", policy="raise")  # text-only entries never raise
    assert report.dropped == {"text_only": 3}


BAD_ENTRIES = {
    "no_conversations": entry("e1", conversations=[]),
    "bad_turn_order": entry(
        "e2", conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "Q"}]
    ),
    "no_image_token": entry("e3", conversations=turns("What digit?", "7")),
    "multiple_image_tokens": entry("e4", conversations=turns("<image> and <image>", "7")),
    "empty_reply": entry("e5", conversations=turns("<image>\nQ?", "  ")),
}


@pytest.mark.parametrize("reason", sorted(BAD_ENTRIES))
def test_bad_entries_raise_naming_id_and_file_or_are_counted(reason):
    bad = BAD_ENTRIES[reason]
    assert entry_problem(bad) == reason
    with pytest.raises(BadSampleError, match=rf"mix\.json: entry 1 \(id '{bad['id']}'\): {reason}"):
        filter_entries([entry("ok"), bad], "mix.json", policy="raise")
    kept, report = filter_entries([entry("ok"), bad], "mix.json", policy="skip")
    assert len(kept) == 1 and report.dropped == {reason: 1}


def test_other_turn_problems():
    assert (
        entry_problem(entry("a", conversations=turns("<image>\nQ?", "A", "Q2?"))) == "bad_turn_order"
    )  # ends with human
    gpt_first = [{"from": "gpt", "value": "<image>\nA"}, {"from": "human", "value": "Q"}]
    assert entry_problem(entry("b", conversations=gpt_first)) == "bad_turn_order"
    assert entry_problem(entry("c", conversations=turns("Q?", "<image>"))) == "no_image_token"  # image in a reply
    assert entry_problem("not a dict") == "not_an_object"
    assert entry_problem({"image": "a.png"}) == "missing_id"


def test_malformed_json_reports_line_and_offset(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text('[\n  {"id": "a", "image": "a.png"},\n  {"id": "b" "image": "b.png"}\n]')
    with pytest.raises(ValueError, match=r"mix\.json: malformed JSON at line 3, column 14 \(char offset 48\)"):
        load_entries(path)
    lines = tmp_path / "mix.jsonl"
    lines.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(ValueError, match=r"mix\.jsonl: malformed JSON at line 2"):
        load_entries(lines)
    path.write_text('{"id": "a"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_entries(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_entries(tmp_path / "nope.json")


def _dataset(processor, folder, entries, **kwargs) -> LlavaDataset:
    return LlavaDataset(entries, [str(folder)], processor, **kwargs)


def test_missing_and_unreadable_images_raise_naming_id_and_file(processor, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    write_image(tmp_path / "ok.png")
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    ds = _dataset(processor, tmp_path, [entry("m", "gone.png"), entry("j", "junk.png"), entry("c", "cut.png")])
    with pytest.raises(BadSampleError, match=r"entry 'm' \(image .*gone\.png\): missing_image"):
        ds[0]
    with pytest.raises(BadSampleError, match=r"entry 'j' \(image .*junk\.png\): unreadable_image"):
        ds[1]
    with pytest.raises(BadSampleError, match=r"entry 'c' \(image .*cut\.png\): unreadable_image"):
        ds[2]


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA"])
def test_other_colour_modes_are_converted(processor, tmp_path, mode):
    name = "img.jpg" if mode == "CMYK" else "img.png"
    write_image(tmp_path / name, mode)
    sample = _dataset(processor, tmp_path, [entry("x", name)])[0]
    assert sample["pixel_values"].shape == (3, 16, 16)
    if mode == "RGBA":  # fully transparent -> white after compositing: (1 - 0.5) / 0.5
        assert torch.allclose(sample["pixel_values"], torch.ones(3, 16, 16))


def test_pad_to_square_uses_the_processor_mean_colour(processor):
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    square = expand_to_square(image, (128, 128, 128))
    assert square.size == (4, 4)
    assert square.getpixel((0, 0)) == (128, 128, 128) and square.getpixel((0, 1)) == (255, 0, 0)
    ds = _dataset(processor, ".", [])
    assert ds.background == (128, 128, 128)  # the demo processor's mean is 0.5


def test_truncation_never_cuts_image_tokens(processor, tmp_path):
    write_image(tmp_path / "a.png")
    long_first = entry("long", conversations=turns("word " * 30, "ok", "<image>\nQ?", "7"))  # image in round 2
    ds = _dataset(processor, tmp_path, [long_first], max_length=40)
    with pytest.raises(BadSampleError, match=r"entry 'long'.*image_truncated.* > max_length 40"):
        ds[0]
    assert _dataset(processor, tmp_path, [long_first], max_length=40, policy="skip")[0].reason == "image_truncated"
    two_rounds = entry("two", conversations=turns("<image>\nQ?", "7", "Q2 " * 40, "8"))
    sample = _dataset(processor, tmp_path, [two_rounds], max_length=60)[0]
    assert len(sample["input_ids"]) == 60  # cut at the end, the first answer is still there
    assert (sample["labels"] != -100).sum() == 2
    no_answer = entry("na", conversations=turns("<image>\n" + "Q " * 80, "7"))
    with pytest.raises(BadSampleError, match="answer_truncated"):
        _dataset(processor, tmp_path, [no_answer], max_length=60)[0]


def test_skip_policy_counts_per_reason_and_reports_at_epoch_end(processor, tmp_path, caplog):
    write_image(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    entries = [entry("a", "ok.png"), entry("b", "gone.png"), entry("c", "junk.png"), entry("d", "gone.png")]
    ds = _dataset(processor, tmp_path, entries, policy="skip")
    loader = SkipCountingLoader(ds, batch_size=2, collate_fn=LlavaCollator(0), split="train")
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert [b["ids"] for b in batches] == [["a"]]  # the all-skipped second batch is not yielded
    assert "skipped" not in batches[0]
    assert loader.epoch_skips == {"missing_image": 2, "unreadable_image": 1}
    assert "train: skipped 3 bad samples this epoch (missing_image=2, unreadable_image=1)" in caplog.text
    list(loader)
    assert loader.skip_counter == {"missing_image": 4, "unreadable_image": 2}


def test_worker_errors_name_the_entry_and_file(processor, tmp_path):
    """Under "raise", a bad image in a DataLoader worker surfaces with the entry id and the path."""
    ds = _dataset(processor, tmp_path, [entry("w1", "gone.png")])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=LlavaCollator(0))
    with pytest.raises(BadSampleError, match=r"entry 'w1' \(image .*gone\.png\): missing_image"):
        next(iter(loader))


def test_image_folders_are_searched_in_order(processor, tmp_path):
    write_image(tmp_path / "second" / "b.png")
    ds = LlavaDataset([entry("b", "b.png")], [str(tmp_path / "first"), str(tmp_path / "second")], processor)
    assert ds[0]["id"] == "b"


def test_packed_entries_round_trip():
    from lightning_lvp.data.llava_dataset import PackedEntries

    entries = [entry("a"), entry("b", relevant_patches=[1, 2]), {"id": "ü", "image": "x.png", "conversations": []}]
    packed = PackedEntries(entries)
    assert len(packed) == 3 and list(packed) == entries and packed[-1] == entries[-1]
    with pytest.raises(IndexError):
        packed[3]
    assert len(PackedEntries([])) == 0


def test_image_field_must_be_one_path():
    assert entry_problem(entry("m", image=["a.png", "b.png"])) == "bad_image_field"


def test_loader_copies_keep_split_and_counter():
    """Lightning re-creates loaders (e.g. to insert a DistributedSampler): the copy shares the skip counter."""
    from collections import Counter

    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    counter = Counter()
    data = list(range(8))
    loader = SkipCountingLoader(
        data, batch_size=2, collate_fn=lambda x: {"input_ids": torch.tensor(x)}, skip_counter=counter, split="val"
    )
    copy = _update_dataloader(loader, DistributedSampler(data, num_replicas=2, rank=0))
    assert isinstance(copy, SkipCountingLoader) and copy.split == "val" and copy.skip_counter is counter
    assert len(copy) == 2
