"""The vicuna_v1 conversation template of LLaVA-1.5, tokenization and label masking.

Follows LLaVA's ``preprocess_multimodal`` + ``preprocess_v1`` (haotian-liu/LLaVA, ``llava/train/train.py``
and ``llava/conversation.py``): the prompt is

    "{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"

and the labels are -100 everywhere except the tokens of every assistant reply and its closing
``</s>``. LLaVA finds those tokens by re-tokenizing pieces of the prompt and counting (with
tokenizer-specific off-by-one corrections); here each token is labelled when its character offset
starts inside a reply span (the space after "ASSISTANT:" up to and including "</s>"), which gives the
same tokens for any fast tokenizer without the corrections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class ConversationTemplate:
    """A two-separator chat template (LLaVA's ``SeparatorStyle.TWO``).

    Args:
        system: system prompt, followed by ``sep``.
        roles: names of the user and assistant roles.
        sep: separator after a user message.
        sep2: separator after an assistant message (the end-of-sequence token).
    """

    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str


VICUNA_V1 = ConversationTemplate(
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation as one prompt string.

    Args:
        text: the full prompt.
        target_spans: ``[start, end)`` character spans of the supervised text (assistant replies + sep2).
        answer: the last assistant reply (the reference answer for evaluation).
    """

    text: str
    target_spans: list[tuple[int, int]]
    answer: str


def move_image_token_to_front(value: str) -> str:
    """``"What is it? <image>"`` -> ``"<image>\\nWhat is it?"`` (LLaVA's ``preprocess_multimodal``)."""
    if IMAGE_TOKEN not in value:
        return value
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


def render_conversation(
    turns: list[dict], template: ConversationTemplate = VICUNA_V1, prompt_only: bool = False
) -> RenderedConversation:
    """Renders alternating human/gpt turns into the template's prompt string.

    Args:
        turns: ``[{"from": "human"|"gpt", "value": str}, ...]``, validated to alternate and start with human.
        template: the conversation template.
        prompt_only: end the prompt with the assistant role and ":" instead of the last reply (for generation).

    Returns:
        The prompt, the spans of the supervised replies (none of them in prompt-only mode) and the last reply.
    """
    user, assistant = template.roles
    text = template.system + template.sep
    spans: list[tuple[int, int]] = []
    answer = ""
    for i, turn in enumerate(turns):
        last = i == len(turns) - 1
        if turn["from"] == HUMAN:
            text += f"{user}: {turn['value']}{template.sep}"
            continue
        answer = turn["value"]
        if prompt_only and last:
            text += f"{assistant}:"
            break
        text += f"{assistant}:"
        start = len(text)  # the space before the reply belongs to the reply's first token in sentencepiece
        text += f" {turn['value']}{template.sep2}"
        spans.append((start, len(text)))
    return RenderedConversation(text=text, target_spans=spans, answer=answer)


def label_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens are supervised: those whose first character lies inside a target span.

    Args:
        offsets: per-token ``(start, end)`` character offsets; special tokens added by the tokenizer have
            ``(0, 0)``.
        spans: target ``[start, end)`` spans.
    """
    out = []
    for start, end in offsets:
        inside = end > start and any(s <= start < e for s, e in spans)
        out.append(inside)
    return out


def tokenize_conversation(
    rendered: RenderedConversation, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int, image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenizes a rendered prompt, masks the labels and expands ``<image>`` to one token per patch.

    Args:
        rendered: the output of :func:`render_conversation`.
        tokenizer: a fast tokenizer that knows ``<image>`` as a single special token and adds BOS itself.
        num_image_tokens: vision tokens per image (576 for LLaVA-1.5 at 336 px).
        image_token_id: id of ``<image>``.

    Returns:
        input_ids: (T,) Long; labels: (T,) Long, -100 outside the replies; vision_mask: (T,) Bool.
        T counts every image token. Text with no ``<image>`` gets no vision tokens.
    """
    enc = tokenizer(rendered.text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    supervised = label_tokens(list(enc["offset_mapping"]), rendered.target_spans)
    labels = [i if s else IGNORE_INDEX for i, s in zip(ids, supervised, strict=True)]
    expanded_ids, expanded_labels, vision = [], [], []
    for token, label in zip(ids, labels, strict=True):
        if token == image_token_id:
            expanded_ids += [image_token_id] * num_image_tokens
            expanded_labels += [IGNORE_INDEX] * num_image_tokens
            vision += [True] * num_image_tokens
        else:
            expanded_ids.append(token)
            expanded_labels.append(label)
            vision.append(False)
    return torch.tensor(expanded_ids), torch.tensor(expanded_labels), torch.tensor(vision)
