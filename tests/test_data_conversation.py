"""vicuna_v1 rendering, tokenization and label masking against hand-built expectations."""
# ruff: noqa: F811  (pytest fixtures imported from data_fixtures are redefined as arguments)

from __future__ import annotations

import torch
from data_fixtures import processor, processor_dir, turns  # noqa: F401
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lightning_lvp.data.conversation import (
    IGNORE_INDEX,
    VICUNA_V1,
    move_image_token_to_front,
    render_conversation,
    tokenize_conversation,
)
from lightning_lvp.data.tokenizer import build_tiny_tokenizer, tiny_vocabulary

SYSTEM_TOKENS = (
    "A chat between a curious user and an artificial intelligence assistant . The assistant gives helpful , "
    "detailed , and polite answers to the user ' s questions ."
).split()
TWO_TURNS = turns("What digit is in r3c5? <image>", "7", "How many 7s are in row 2?", "1")


def test_vicuna_v1_prompt_string():
    rendered = render_conversation([{**t, "value": move_image_token_to_front(t["value"])} for t in TWO_TURNS])
    assert rendered.text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat digit is in r3c5? "
        "ASSISTANT: 7</s>USER: How many 7s are in row 2? ASSISTANT: 1</s>"
    )
    assert [rendered.text[s:e] for s, e in rendered.target_spans] == [" 7</s>", " 1</s>"]
    assert rendered.answer == "1"


def test_prompt_only_ends_at_assistant():
    rendered = render_conversation(TWO_TURNS, prompt_only=True)
    assert rendered.text.endswith("</s>USER: How many 7s are in row 2? ASSISTANT:")
    assert rendered.target_spans == [(rendered.text.index(" 7</s>"), rendered.text.index(" 7</s>") + 6)]
    assert rendered.answer == "1"


def test_image_token_moves_to_front():
    assert move_image_token_to_front("What is this? <image>") == "<image>\nWhat is this?"
    assert move_image_token_to_front("<image>\nWhat?") == "<image>\nWhat?"
    assert move_image_token_to_front("no image") == "no image"


def test_two_turn_token_ids_and_labels_exact():
    """Every id and label of a 2-turn sample with 4 image tokens, built by hand from the vocabulary."""
    tok = build_tiny_tokenizer()
    vocab = {w: i for i, w in enumerate(tiny_vocabulary())}
    assert (vocab["<pad>"], vocab["<s>"], vocab["</s>"], vocab["<image>"]) == (0, 2, 3, len(vocab) - 1)
    image = vocab["<image>"]
    rendered = render_conversation([{**t, "value": move_image_token_to_front(t["value"])} for t in TWO_TURNS])
    input_ids, labels, vision = tokenize_conversation(rendered, tok, num_image_tokens=4, image_token_id=image)

    words = ["<s>", *SYSTEM_TOKENS, "USER", ":", *["<image>"] * 4]
    words += ["What", "digit", "is", "in", "r3c5", "?", "ASSISTANT", ":", "7", "</s>"]
    words += ["USER", ":", "How", "many", "7s", "are", "in", "row", "2", "?", "ASSISTANT", ":", "1", "</s>"]
    expected_ids = [vocab[w] for w in words]
    answer_at = {len(words) - 16, len(words) - 15, len(words) - 2, len(words) - 1}  # "7", "</s>", "1", "</s>"
    expected_labels = [i if k in answer_at else IGNORE_INDEX for k, i in enumerate(expected_ids)]

    assert input_ids.tolist() == expected_ids
    assert labels.tolist() == expected_labels
    assert [words[k] for k in sorted(answer_at)] == ["7", "</s>", "1", "</s>"]
    assert vision.tolist() == [w == "<image>" for w in words]
    assert input_ids.dtype == labels.dtype == torch.long and vision.dtype == torch.bool


def _sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer with Llama's Metaspace pre-tokenizer ("▁" marks a preceding space), trained in-process."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [VICUNA_V1.system, "USER: What digit is in r3c5? ASSISTANT: 7 How many 7s are in row 2? 1 yes no"]
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.add_special_tokens(["<image>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def test_labels_with_sentencepiece_style_tokens():
    """As LLaVA's preprocess_v1: the reply's first token carries the space ("▁7"), and "</s>" is labelled."""
    tok = _sentencepiece_like_tokenizer()
    conversation = turns("<image>\nWhat digit is in r3c5?", "7", "How many 7s are in row 2?", "1 yes")
    ids, labels, vision = tokenize_conversation(
        render_conversation(conversation), tok, 3, tok.convert_tokens_to_ids("<image>")
    )
    labelled = tok.convert_ids_to_tokens([i for i in labels.tolist() if i != IGNORE_INDEX])
    assert labelled == ["▁7", "</s>", "▁1", "▁yes", "</s>"]
    assert int(vision.sum()) == 3
    assert tok.convert_ids_to_tokens(ids[labels != IGNORE_INDEX].tolist()) == labelled


def test_processor_counts_the_same_image_tokens(processor):
    """The saved LlavaProcessor (num_additional_image_tokens=1, strategy "default") expands to 4 tokens too."""
    from PIL import Image

    from lightning_lvp.data.llava_dataset import num_image_tokens

    out = processor(images=Image.new("RGB", (16, 16)), text="<image> What", return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"] == image_id).sum()) == num_image_tokens(processor) == 4
    assert out["pixel_values"].shape == (1, 3, 16, 16)
