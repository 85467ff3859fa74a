"""lmms-eval model plugin: ``lmms-eval --model lightning_lvp --model_args pretrained=...,pruners=...,rho=0.5 --tasks pope``.

Registered through the ``lmms_eval.models`` entry point (pyproject.toml) and run end to end with the
real lmms-eval 0.7.3 CLI in the second environment (``scripts/eval_env.sh``, ``scripts/eval_e2e.sh``,
docs/EVAL.md). lmms-eval's "simple model" interface (``lmms_eval.api.model.lmms``):

* ``generate_until``: each request's ``args`` is ``(context, gen_kwargs, doc_to_visual, doc_id, task,
  split)``; the task's ``gen_kwargs`` (``until``, ``max_new_tokens``, ``temperature``, ``do_sample``,
  ``top_p``, ``num_beams``, ...) go to transformers' ``generate()`` on the pruned model
  (:mod:`lightning_lvp.generation`); ``until`` also stops decoding early (``DecodedStopStrings``).
* ``loglikelihood``: ``(context, continuation, doc_to_visual, doc_id, task, split)`` -> (sum of the
  continuation's log-probabilities, whether greedy decoding gives it), teacher-forced through the
  token-removing forward (the pruner's text keys are the context, never the continuation), so
  multiple-choice tasks work.
* Data parallel (``accelerate launch -m lmms_eval ...``): lmms-eval shards the documents itself
  (``build_all_requests(rank=RANK, world_size=WORLD_SIZE)``); the plugin reports the same rank and
  world size (:func:`process_rank`), puts each process on its own device and gathers nothing itself.

Without lmms-eval installed the module still imports (a stand-in base class) so that the main
environment can test it (``tests/test_lmms_plugin.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteriaList

try:  # the real base class when lmms-eval is installed
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # documented interface stand-in

    class _LmmsBase:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.task_dict = {}


from lightning_lvp.data.collate import LlavaCollator
from lightning_lvp.data.conversation import VICUNA_V1, RenderedConversation, render_conversation, tokenize_conversation
from lightning_lvp.data.llava_dataset import (
    anyres_image_tokens,
    expand_to_square,
    is_anyres,
    num_image_tokens,
    processor_input_side,
    resize_then_pad,
)
from lightning_lvp.data.qwen_chat import IMAGE_PAD, is_qwen_processor, qwen_image_tokens, render_chatml, tokenize_chatml
from lightning_lvp.eval.teacher_forced import model_inputs
from lightning_lvp.generation import DecodedStopStrings
from lightning_lvp.schedules import paper_schedule, parse_schedule

log = logging.getLogger(__name__)
IMAGE_TOKEN = "<image>"
AUTO_BATCH_SIZE = 8  # what ``--batch_size auto`` means (the evaluate command's default batch)
# Keys some lmms-eval tasks put in generation_kwargs that are not decoding options (logged, not used).
NON_GENERATION_KEYS = ("image_aspect_ratio",)
# lmms-eval's generation_kwargs -> transformers generate() options handled specially.
_RENAMED = {"max_gen_toks": "max_new_tokens"}


def manifest():
    """Entry point payload for lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lightning_lvp", simple_class_path="lightning_lvp.eval.lmms_plugin.LVPLmms")


def _pixels(processor, image) -> torch.Tensor:
    """LLaVA-1.5's pad-to-square + processor, resizing first (bounded memory for any aspect ratio, #16)."""
    ip = processor.image_processor
    background = tuple(int(round(255 * m)) for m in ip.image_mean)
    side = processor_input_side(ip)
    image = image.convert("RGB")
    if side:
        image = resize_then_pad(image, side, background, int(getattr(ip, "resample", 3)))
    else:
        image = expand_to_square(image, background)
    return ip(image, return_tensors="pt")["pixel_values"][0]


def _image_inputs(processor, image) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(pixel_values, image_size or None, image tokens) of one image, as the training data prepares it
    (:class:`~lightning_lvp.data.llava_dataset.LlavaDataset`): LLaVA-1.5 pads to square (:func:`_pixels`);
    LLaVA-NeXT's processor makes the base view + crops ((V, 3, H, W), original (height, width)) and the
    ``<image>`` count depends on the image's size."""
    if is_anyres(processor):
        out = processor.image_processor(image.convert("RGB"), return_tensors="pt")
        size = torch.as_tensor(out["image_sizes"][0]).long()
        return out["pixel_values"][0], size, anyres_image_tokens(processor, tuple(size.tolist()))
    return _pixels(processor, image), None, num_image_tokens(processor)


def encode_sample(processor, prompt: str, image, continuation: str | None = None) -> dict[str, Any]:
    """One sample (vicuna_v1 template, LLaVA image preprocessing) for :class:`LlavaCollator`.

    Args:
        processor: the model's ``LlavaProcessor`` (or ``LlavaNextProcessor``: anyres views, see
            :func:`_image_inputs`).
        prompt: the user text (without ``<image>``).
        image: a PIL image.
        continuation: None for a prompt-only sample (generation); else the assistant reply whose
            tokens get ``labels`` (teacher-forced scoring; the closing ``</s>`` is not scored).
    """
    tok = processor.tokenizer
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": continuation or ""}]
    if is_qwen_processor(processor):
        return _encode_qwen(processor, turns, image, continuation)
    rendered = render_conversation(turns, prompt_only=continuation is None)
    if continuation is not None:  # score the reply only, not the template's end-of-turn separator
        (start, end), sep2 = rendered.target_spans[-1], len(VICUNA_V1.sep2)
        rendered = RenderedConversation(rendered.text, [(start, end - sep2)], rendered.answer)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    pixel_values, image_size, count = _image_inputs(processor, image)
    ids, labels, vision = tokenize_conversation(rendered, tok, count, image_id)
    extra = {} if image_size is None else {"image_size": image_size}
    return _sample(ids, labels, vision, continuation is not None, pixel_values=pixel_values, **extra)


def _encode_qwen(processor, turns: list[dict], image, continuation: str | None) -> dict[str, Any]:
    """:func:`encode_sample` for Qwen2.5-VL, as its training data is prepared (``data/qwen_chat.py``): ChatML,
    dynamic-resolution flat patches + ``image_grid_thw``, ``<|image_pad|>`` expanded to the image's count."""
    tok = processor.tokenizer
    rendered = render_chatml(turns, prompt_only=continuation is None)
    if continuation is not None:  # score the reply only, not the template's <|im_end|>\n
        (start, end), close = rendered.target_spans[-1], len("<|im_end|>\n")
        rendered = RenderedConversation(rendered.text, [(start, end - close)], rendered.answer)
    out = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
    grid = torch.as_tensor(out["image_grid_thw"]).long()
    counts = qwen_image_tokens(processor.image_processor, grid)
    ids, labels, vision = tokenize_chatml(rendered, tok, counts, tok.convert_tokens_to_ids(IMAGE_PAD))
    return _sample(ids, labels, vision, continuation is not None, pixel_values=out["pixel_values"], image_grid_thw=grid)


def _sample(ids, labels, vision, scored: bool, **images) -> dict[str, Any]:
    """A dataset-shaped sample; with ``scored`` its labels, and the pruner's keys are the context only."""
    sample = {"input_ids": ids, "vision_mask": vision, "prompt_mask": ~vision, **images}
    sample.update(id="", answer="", question_type="")
    if scored:
        sample["labels"] = labels
        sample["prompt_mask"] = ~vision & (labels == -100)
    return sample


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


def resolve_batch_size(batch_size: int | str | None, max_batch_size: int | str | None = None) -> int:
    """lmms-eval's ``--batch_size``: ``N``, or ``auto`` / ``auto:N`` = :data:`AUTO_BATCH_SIZE` (capped by ``--max_batch_size``).

    Raises:
        ValueError: anything else, naming the flag and the accepted values.
    """
    text = "1" if batch_size is None else str(batch_size).strip()
    if text == "auto" or text.startswith("auto:"):
        size = AUTO_BATCH_SIZE if max_batch_size is None else min(AUTO_BATCH_SIZE, int(max_batch_size))
        log.info("--batch_size %s: using %d per process (no memory probe; pass an integer to choose)", text, size)
        return size
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"--batch_size must be a positive integer, 'auto' or 'auto:N', got {batch_size!r}")
    return size


def process_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process: accelerate's state if it is initialised, else
    the launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (what lmms-eval shards the documents by)."""
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:  # initialised (accelerate launch or an Accelerator())
            st = PartialState()
            return st.process_index, st.num_processes, st.local_process_index
    except ImportError:
        pass
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of process ``rank``: every ``world_size``-th from ``rank`` (lmms-eval's ``create_iterator``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return list(items[rank::world_size])


def resolve_device(device: str | None, local_rank: int = 0, world_size: int = 1) -> str:
    """The device of this process: ``device`` (a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under
    data parallelism); None = ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and (world_size > 1 or local_rank > 0):
        device = f"cuda:{local_rank}"
    return device


def generation_options(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """lmms-eval ``gen_kwargs`` -> (:meth:`PrunedLlava.generate` keyword arguments, stop strings).

    ``temperature: 0`` (lmms-eval's "greedy") turns sampling off; other keys are passed to
    transformers' ``generate()``, which rejects the ones it does not know, and the pruned model
    refuses the ones it cannot honour (:mod:`lightning_lvp.generation`).
    """
    opts = {_RENAMED.get(k, k): v for k, v in gen_kwargs.items() if k not in NON_GENERATION_KEYS}
    for k in set(gen_kwargs) & set(NON_GENERATION_KEYS):
        log.info("gen_kwargs %s=%r is not a decoding option; not used", k, gen_kwargs[k])
    until = opts.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    out: dict[str, Any] = {"max_new_tokens": int(opts.pop("max_new_tokens", default_max_new_tokens))}
    temperature = opts.pop("temperature", None)
    do_sample = bool(opts.pop("do_sample", False))
    if temperature is not None and float(temperature) <= 0:
        do_sample = False
    out["do_sample"] = do_sample
    if do_sample:
        out["temperature"] = 1.0 if temperature is None else float(temperature)
        out["top_k"] = int(opts.pop("top_k", 0) or 0)
        out["top_p"] = float(opts.pop("top_p", 1.0) if opts.get("top_p") is not None else 1.0)
    else:  # greedy: the sampling knobs do not apply (transformers would warn)
        for k in ("top_k", "top_p"):
            opts.pop(k, None)
    if opts.get("num_beams") is not None:
        opts["num_beams"] = int(opts["num_beams"])
    out.update({k: v for k, v in opts.items() if v is not None})
    return out, [s for s in until if s]


class LVPLmms(_LmmsBase):
    """A pruned LLaVA for lmms-eval.

    Args (``--model_args``): ``pretrained`` (llava-hf folder or hub id), ``pruners`` (pruner folder or
    checkpoint; omit for the unpruned model), ``rho`` (schedule [rho, rho-0.2, rho-0.4]) or
    ``ratios`` ("a;b;c"), ``batch_size`` (N or auto), ``max_new_tokens`` (default budget when the task
    sets none), ``device`` (or lmms-eval's ``--device``), ``dtype``, ``structure`` (LLaVA-NeXT's newline
    policy, ``keep`` or ``prune``: docs/FAMILIES.md). The model family comes from the model's config
    (LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL prompts and images are prepared as in training).
    """

    def __init__(
        self,
        pretrained: str,
        pruners: str | None = None,
        rho: float | None = None,
        ratios: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 32,
        device: str | None = None,
        dtype: str = "float32",
        structure: str = "keep",
        model=None,
        processor=None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown --model_args for lightning_lvp: {sorted(unknown)}; accepted: pretrained, pruners, rho, "
                "ratios, batch_size, max_new_tokens, device, dtype, structure"
            )
        from lightning_lvp.data.processors import load_processor
        from lightning_lvp.model import PrunedLlava

        self._rank, self._world_size, local_rank = process_rank()
        self._device = torch.device(resolve_device(device, local_rank, self._world_size))
        if model is None:
            model = PrunedLlava.from_pretrained(
                pretrained, pruners, dtype=dtype, device=self._device, structure=structure
            )
        self.model = model
        self.processor = processor or load_processor(pretrained)  # the family's own (Qwen: QwenProcessor)
        stages = model.method.num_stages if model.method is not None else 0
        self.ratios = plugin_schedule(rho, ratios, stages)
        self.batch_size_per_gpu = resolve_batch_size(batch_size, max_batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.collate = LlavaCollator(self.processor.tokenizer.pad_token_id, padding_side="left")
        self.task_dict: dict = getattr(self, "task_dict", {})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's constructor path: ``device`` may come from ``--model_args`` or ``--device`` (not a
        TypeError); when both are given they must agree."""
        try:
            from lmms_eval.utils import simple_parse_args_string as parse
        except ImportError:  # without lmms-eval (tests): "k=v,k=v", values as strings
            parse = lambda s: dict(kv.split("=", 1) for kv in s.split(",") if kv.strip())  # noqa: E731
        args = parse(arg_string or "")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "device" in args and "device" in extra:
            if str(args["device"]) != str(extra["device"]):
                raise ValueError(
                    f"device given twice with different values: --model_args device={args['device']} and "
                    f"--device {extra['device']}; give one"
                )
            del extra["device"]
        return cls(**args, **extra)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ------------------------------------------------------------------------------- requests
    def _doc_image(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if not visuals:
            raise ValueError(f"request {task}/{split}/{doc_id} has no image; LLaVA tasks need one")
        return visuals[0]

    @torch.no_grad()
    def _generate(self, samples: list[dict], options: dict, until: list[str]) -> list[str]:
        batch = self.collate(samples)
        tok = self.processor.tokenizer
        inputs = model_inputs(batch, self._device)
        extra = {}
        if until:  # stop early; the text is cut at the stop string below as well
            stop = DecodedStopStrings(tok, until, inputs["input_ids"].shape[1])
            extra["stopping_criteria"] = StoppingCriteriaList([stop])
        out = self.model.generate(**inputs, ratios=self.ratios, **options, **extra)
        return [tok.decode(row.tolist(), skip_special_tokens=True) for row in out]

    def generate_until(self, requests) -> list[str]:
        """Answers ``generate_until`` requests in batches of ``batch_size`` with the same ``gen_kwargs``."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        for indices in groups.values():
            options, until = generation_options(requests[indices[0]].args[1], self.max_new_tokens)
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start : start + self.batch_size_per_gpu]
                samples = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    image = self._doc_image(doc_to_visual, doc_id, task, split)
                    samples.append(encode_sample(self.processor, context.replace(IMAGE_TOKEN, "").strip(), image))
                for i, text in zip(chunk, self._generate(samples, options, until)):
                    answers[i] = cut_at(text, until).strip()
        return answers

    @torch.no_grad()
    def _score(self, samples: list[dict]) -> list[tuple[float, bool]]:
        batch = self.collate(samples)
        out = self.model.forward_infer(**model_inputs(batch, self._device), ratios=self.ratios)
        logits, targets, rows = self.model.label_logits(out.hidden, out.state, batch["labels"].to(self._device))
        logp = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]
        greedy = logits.argmax(-1) == targets
        n = len(samples)
        total = torch.zeros(n, device=logp.device).index_add_(0, rows, logp)
        wrong = torch.zeros(n, device=logp.device).index_add_(0, rows, (~greedy).float())
        return [(float(total[i]), bool(wrong[i] == 0)) for i in range(n)]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | image, context), is-greedy) per request, teacher-forced with the pruned model."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            samples = []
            for req in requests[start : start + self.batch_size_per_gpu]:
                context, continuation, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                text = continuation if isinstance(continuation, str) else continuation(doc)
                image = self._doc_image(doc_to_visual, doc_id, task, split)
                prompt = context.replace(IMAGE_TOKEN, "").strip()
                samples.append(encode_sample(self.processor, prompt, image, continuation=text.strip()))
            results += self._score(samples)
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multi-round generation is not supported by lightning_lvp's lmms-eval plugin")
