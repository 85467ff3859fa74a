"""lmms-eval model plugin: ``lmms-eval --model lightning_lvp --model_args pretrained=...,pruners=...,rho=0.5 --tasks pope``.

Registered through the ``lmms_eval.models`` entry point (pyproject.toml). lmms-eval itself cannot
be installed on this project's CPU machines (it requires torchvision, which has no CPU build for
torch 2.13 here), so this adapter follows its documented "simple model" interface (lmms-eval
0.7.3: ``lmms_eval.api.model.lmms`` with ``generate_until(requests)``, each request's ``args`` being
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``) and is tested against that interface
with stand-in requests (``tests/test_lmms_plugin.py``).

Only generation tasks are supported (POPE, GQA, VQAv2, ...); ``loglikelihood`` raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:  # the real base class when lmms-eval is installed
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # documented interface stand-in

    class _LmmsBase:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1


from lightning_lvp.data.collate import LlavaCollator
from lightning_lvp.data.conversation import render_conversation, tokenize_conversation
from lightning_lvp.data.llava_dataset import expand_to_square, num_image_tokens
from lightning_lvp.evaluate import model_inputs
from lightning_lvp.schedules import paper_schedule, parse_schedule

IMAGE_TOKEN = "<image>"


def manifest():
    """Entry point payload for lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lightning_lvp", simple_class_path="lightning_lvp.eval.lmms_plugin.LVPLmms")


def encode_sample(processor, prompt: str, image) -> dict[str, Any]:
    """One prompt-only sample (vicuna_v1 template, LLaVA image preprocessing) for :class:`LlavaCollator`."""
    tok = processor.tokenizer
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": ""}]
    rendered = render_conversation(turns, prompt_only=True)
    ids, _, vision = tokenize_conversation(rendered, tok, num_image_tokens(processor), tok.convert_tokens_to_ids(IMAGE_TOKEN))
    background = tuple(int(round(255 * m)) for m in processor.image_processor.image_mean)
    image = expand_to_square(image.convert("RGB"), background)
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    return {"input_ids": ids, "vision_mask": vision, "prompt_mask": ~vision, "pixel_values": pixels,
            "id": "", "answer": "", "question_type": ""}


def plugin_schedule(rho: float | str | None, ratios: str | None, stages: int) -> list[float | None] | None:
    """The schedule of ``--model_args``: ``ratios`` or ``rho`` (paper rule), else None (the method's default).

    ``ratios`` is one schedule in the common syntax (:mod:`lightning_lvp.schedules`), except that
    its stages are separated by ``;`` (``ratios=0.5;0.3;0.1``): lmms-eval splits ``--model_args`` at
    every ``,``. ``ratios=paper:0.5`` works as well.
    """
    if ratios:
        return parse_schedule(str(ratios).replace(";", ","), stages or None)
    if rho is not None and stages:
        return paper_schedule(float(rho), stages)
    return None


def cut_at(text: str, until: Sequence[str]) -> str:
    """Truncates ``text`` at the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


class LVPLmms(_LmmsBase):
    """A pruned LLaVA for lmms-eval.

    Args (``--model_args``): ``pretrained`` (llava-hf folder or hub id), ``pruners`` (pruner folder or
    checkpoint; omit for the unpruned model), ``rho`` (schedule [rho, rho-0.2, rho-0.4]) or
    ``ratios`` ("a;b;c"), ``batch_size``, ``max_new_tokens``, ``device``, ``dtype``.
    """

    def __init__(
        self,
        pretrained: str,
        pruners: str | None = None,
        rho: float | None = None,
        ratios: str | None = None,
        batch_size: int = 1,
        max_new_tokens: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
        model=None,
        processor=None,
        **kwargs,
    ) -> None:
        super().__init__()
        from transformers import AutoProcessor

        from lightning_lvp.model import PrunedLlava

        if model is None:
            model = PrunedLlava.from_pretrained(pretrained, pruners, dtype=dtype, device=device)
        self.model = model
        self.processor = processor or AutoProcessor.from_pretrained(pretrained)
        stages = model.method.num_stages if model.method is not None else 0
        self.ratios = plugin_schedule(rho, ratios, stages)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.collate = LlavaCollator(self.processor.tokenizer.pad_token_id, padding_side="left")
        self.task_dict: dict = getattr(self, "task_dict", {})

    @torch.no_grad()
    def _generate(self, samples: list[dict], max_new_tokens: int) -> list[str]:
        batch = self.collate(samples)
        device = next(self.model.parameters()).device
        out = self.model.generate(**model_inputs(batch, device), ratios=self.ratios, max_new_tokens=max_new_tokens)
        return [self.processor.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out]

    def generate_until(self, requests) -> list[str]:
        """Answers lmms-eval ``generate_until`` requests in batches of ``batch_size``."""
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start : start + self.batch_size_per_gpu]
            samples, untils, budget = [], [], self.max_new_tokens
            for req in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                if not visuals:
                    raise ValueError(f"request {task}/{split}/{doc_id} has no image; LLaVA tasks need one")
                context = context.replace(IMAGE_TOKEN, "").strip()
                samples.append(encode_sample(self.processor, context, visuals[0]))
                until = gen_kwargs.get("until", [])
                untils.append([until] if isinstance(until, str) else list(until))
                budget = int(gen_kwargs.get("max_new_tokens", budget))
            texts = self._generate(samples, budget)
            answers += [cut_at(t, u).strip() for t, u in zip(texts, untils)]
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("lightning_lvp's lmms-eval plugin supports generation tasks only (generate_until)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multi-round generation is not supported by lightning_lvp's lmms-eval plugin")
