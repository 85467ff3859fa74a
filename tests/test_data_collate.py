"""Batches per the contract of docs/DESIGN.md: padding sides, vision/prompt/relevant masks, prompt-only mode."""
# ruff: noqa: F811  (pytest fixtures imported from data_fixtures are redefined as arguments)

from __future__ import annotations

import pytest
import torch
from data_fixtures import entry, processor, processor_dir, turns, write_image  # noqa: F401

from lightning_lvp.data.collate import LlavaCollator, answer_accuracy
from lightning_lvp.data.llava_dataset import LlavaDataset

ENTRIES = [
    entry("short", question_type="cell", relevant_patches=[2]),
    entry("long", conversations=turns("<image>\nHow many 7s are in row 2?", "1", "What digit is in r1c1?", "7")),
]


@pytest.fixture()
def samples(processor, tmp_path):
    write_image(tmp_path / "a.png")
    return lambda prompt_only=False: [
        LlavaDataset(ENTRIES, [str(tmp_path)], processor, prompt_only=prompt_only)[i] for i in range(2)
    ]


def _words(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids.tolist())


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_and_masks(processor, samples, side):
    batch = LlavaCollator(pad_token_id=0, padding_side=side)(samples())
    short, long = (len(s["input_ids"]) for s in samples())
    B, T = 2, long
    assert set(batch) == {
        "input_ids", "attention_mask", "labels", "pixel_values", "vision_mask", "prompt_mask", "relevant_mask",
        "ids", "answers", "question_types", "images",
    }  # fmt: skip
    assert batch["images"] == [s["image"] for s in samples()]  # image identity (RelevanceStats pairs questions by it)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["vision_mask"].shape == (B, T)
    assert batch["pixel_values"].shape == (B, 3, 16, 16)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
    assert batch["vision_mask"].dtype == batch["prompt_mask"].dtype == batch["relevant_mask"].dtype == torch.bool
    pad = slice(short, T) if side == "right" else slice(0, T - short)
    assert batch["attention_mask"][0].sum() == short and not batch["attention_mask"][0, pad].any()
    assert (batch["input_ids"][0, pad] == 0).all() and (batch["labels"][0, pad] == -100).all()
    assert not batch["vision_mask"][0, pad].any() and not batch["prompt_mask"][0, pad].any()
    assert batch["vision_mask"].sum(-1).tolist() == [4, 4]
    assert batch["ids"] == ["short", "long"]
    assert batch["answers"] == ["7", "7"]
    assert batch["question_types"] == ["cell", ""]
    relevant = batch["relevant_mask"]
    assert relevant.sum().item() == 1 and batch["vision_mask"][relevant].all()
    assert relevant[0].nonzero().item() == batch["vision_mask"][0].nonzero()[2].item()  # patch 2 of sample 0


def test_prompt_mask_is_the_text_before_the_first_answer(processor, samples):
    batch = LlavaCollator(0)(samples())
    row, labels, vision = batch["prompt_mask"][1], batch["labels"][1], batch["vision_mask"][1]
    first_answer = int((labels != -100).nonzero()[0])
    words = _words(processor, batch["input_ids"][1])
    assert words[first_answer - 2 : first_answer + 1] == ["ASSISTANT", ":", "1"]
    assert torch.equal(row[:first_answer], ~vision[:first_answer])
    assert not row[first_answer:].any()  # the second round's question is after the first answer


def test_prompt_only_mode_for_generation(processor, samples):
    batch = LlavaCollator(0, padding_side="left")(samples(prompt_only=True))
    assert "labels" not in batch
    for i in range(2):
        assert _words(processor, batch["input_ids"][i, -2:]) == ["ASSISTANT", ":"]  # left padding: the ends align
    assert torch.equal(batch["prompt_mask"], batch["attention_mask"].bool() & ~batch["vision_mask"])
    assert batch["answers"] == ["7", "7"]
    words = _words(processor, batch["input_ids"][1][batch["attention_mask"][1].bool()])
    assert "1" in words and words.count("</s>") == 1  # the earlier round stays in the history


def test_collator_rejects_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        LlavaCollator(0, padding_side="middle")


def test_answer_accuracy_teacher_forced_and_shifted():
    labels = torch.tensor([[-100, -100, 5, 2], [-100, -100, 5, 2], [-100, 7, 2, -100], [-100, -100, -100, -100]])
    logits = torch.zeros(4, 4, 10)
    # position t predicts token t+1: sample 0 right everywhere, sample 1 wrong on the last token
    for b, targets in enumerate([(5, 2), (5, 3)]):
        logits[b, 1, targets[0]] = logits[b, 2, targets[1]] = 1.0
    logits[2, 0, 7] = logits[2, 1, 2] = 1.0
    logits[2, 2, 9] = 1.0  # a prediction after the answer does not count
    assert answer_accuracy(logits, labels).tolist() == [True, False, True, False]
