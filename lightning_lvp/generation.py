"""transformers' own ``generate()`` on the pruned model (issue #13).

:class:`PrunedForGeneration` is a thin ``GenerationMixin`` model around a :class:`PrunedVLM`: its
prefill is the token-removing :meth:`PrunedVLM.forward_infer` and its cache a
:class:`PrunedCache`, a ``DynamicCache`` whose layers hold the PRUNED keys/values (layers after a
pruning point hold fewer) plus the valid-key mask of every stage. Everything else -- greedy,
sampling, beam search (``Cache.reorder_cache``), logits processors (repetition penalty, ...),
stopping criteria and stop strings, streamers, several eos ids, ``num_return_sequences``,
``GenerationConfig`` -- is transformers' unchanged ``GenerationMixin.generate``.

This module is the transformers-generation glue (tested on 5.23-5.24, see ``families.base.TESTED_TRANSFORMERS``):
it relies on ``generate`` (1) calling ``forward(input_ids, cache=, position_ids=, attention_mask=,
use_cache=, **model_kwargs)`` once for the prefill with the whole prompt and then with the last
token, (2) reading ``outputs.logits[:, -1]`` and ``outputs.cache``, (3) calling
``cache.reorder_cache(beam_idx)`` for beam search. Decoder layers are still only reached through
the model's family (:mod:`lightning_lvp.families`).

Options the pruned cache cannot honour raise :class:`UnsupportedGenerationOption` naming them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria
from transformers.generation.utils import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from lightning_lvp.families.base import cache_lengths
from lightning_lvp.state import causal_mask


class UnsupportedGenerationOption(ValueError):
    """A ``generate()`` option that the pruned model cannot honour (never silently ignored)."""


# generate() kwargs -> why the pruned model refuses them. Checked on the kwargs and on the GenerationConfig.
_UNSUPPORTED: dict[str, str] = {
    "assistant_model": "assisted decoding re-scores draft tokens and crops the cache; the pruned cache cannot be cropped",
    "prompt_lookup_num_tokens": "prompt-lookup (assisted) decoding needs a croppable cache",
    "assistant_early_exit": "self-speculative (assisted) decoding needs a croppable cache",
    "cache_implementation": "only the pruned dynamic cache (PrunedCache) holds per-stage pruned keys/values",
    "prefill_chunk_size": "the token-removing prefill sees the whole prompt at once (pruning is global)",
    "inputs_embeds": "pruning needs input_ids (image-token positions) and pixel_values",
    "custom_generate": "a custom decoding loop bypasses the pruned cache's contract",
    "penalty_alpha": "contrastive search is not supported",
    "dola_layers": "DoLa decoding reads intermediate logits the pruned forward does not return",
    "num_beam_groups": "group (diverse) beam search is not supported",
    "constraints": "constrained beam search is not supported",
    "force_words_ids": "constrained beam search is not supported",
    "output_attentions": "the pruned forward does not return attention maps (layers hold different key counts)",
    "output_hidden_states": "the pruned forward does not return per-layer hidden states",
    "token_healing": "token healing re-tokenises the prompt, which would move the image tokens",
}
_DEFAULTS_OK = {"num_beam_groups": 1, "token_healing": False, "output_attentions": False, "output_hidden_states": False}


def check_generation_options(generation_config: GenerationConfig | None, kwargs: dict) -> None:
    """Raises :class:`UnsupportedGenerationOption` for the first option in ``_UNSUPPORTED`` that is set.

    Args:
        generation_config: the config given to ``generate`` (or the model's), may be None.
        kwargs: the keyword arguments given to ``generate``.
    """
    for name, why in _UNSUPPORTED.items():
        for where, value in (
            ("argument", kwargs.get(name)),
            ("generation_config", getattr(generation_config, name, None)),
        ):
            if value is not None and value != _DEFAULTS_OK.get(name, None):
                raise UnsupportedGenerationOption(
                    f"generate({name}=...) ({where}) is not supported on the pruned model: {why}"
                )


class PrunedCache(DynamicCache):
    """A ``DynamicCache`` of pruned keys/values plus the layout that makes them attendable.

    Layer ``i`` holds the keys of the slots that were alive when layer ``i`` ran, so layers after a
    pruning point hold fewer keys. ``stage_valid[s]`` (B, L_s) marks the real keys of stage ``s``
    (False = padding / filler slot of a shorter sample), ``layer_stage[i]`` the stage layer ``i``
    ran on. Each decode step appends one always-valid key to every stage.

    ``get_seq_length()`` counts INPUT columns seen (prompt columns incl. padding, then one per
    decoded token), which is what ``generate`` uses it for (slicing ``input_ids``); the per-layer
    key counts are :meth:`layer_lengths`.
    """

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.stage_valid: list[torch.Tensor] = []
        self.layer_stage: list[int] = []
        self.seen_tokens = 0
        self.decode_state: dict = {}  # the family's position state for decoding (e.g. Qwen's rope deltas)

    def set_layout(self, stage_valid: Sequence[torch.Tensor], layer_stage: Sequence[int], seen_tokens: int) -> None:
        """Records the prefill's layout (``InferOutput.stage_valid`` / ``layer_stage``)."""
        self.stage_valid, self.layer_stage, self.seen_tokens = list(stage_valid), list(layer_stage), int(seen_tokens)

    def append_tokens(self, n: int = 1) -> None:
        """Adds ``n`` valid key slots to every stage (the decoded tokens are never pruned)."""
        self.stage_valid = [torch.cat([v, v.new_ones(v.shape[0], n)], 1) for v in self.stage_valid]
        self.seen_tokens += n

    def decode_masks(self) -> list[torch.Tensor | None]:
        """Per-stage (B, 1, 1, L_s) bool masks for a one-token query; None where every key is valid.

        None lets SDPA skip the mask (a single query may attend to every past key), as HF's own
        mask creation does for an unpadded batch.
        """
        return [None if bool(v.all()) else causal_mask(v, 1) for v in self.stage_valid]

    def layer_lengths(self) -> list[int]:
        return cache_lengths(self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def _index_layout(self, fn) -> None:
        self.stage_valid = [fn(v) for v in self.stage_valid]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the keys AND the valid masks follow the surviving beams."""
        super().reorder_cache(beam_idx)
        self._index_layout(lambda v: v.index_select(0, beam_idx.to(v.device)))
        self._index_decode_state(lambda v: v.index_select(0, beam_idx.to(v.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._index_layout(lambda v: v.repeat_interleave(repeats, dim=0))
        self._index_decode_state(lambda v: v.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._index_layout(lambda v: v[indices])
        self._index_decode_state(lambda v: v[indices])

    def _index_decode_state(self, fn) -> None:
        """Per-row tensors of ``decode_state`` (batch first) follow the rows of the cache."""
        self.decode_state = {k: fn(v) if torch.is_tensor(v) else v for k, v in self.decode_state.items()}

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedGenerationOption(
            "PrunedCache cannot be cropped (the option that needs it, e.g. assisted decoding, is not supported)"
        )


class PrunedForGeneration(PreTrainedModel, GenerationMixin):
    """``GenerationMixin`` model over a :class:`~lightning_lvp.model.PrunedVLM` (no weights of its own).

    Args:
        pruned: the pruned model; its LLaVA's ``generation_config`` is the default here.
        ratios: default inference schedule (None = the method's ``keep_ratios``); ``generate(ratios=...)``
            overrides it per call.

    ``generate`` takes ``input_ids``, ``pixel_values``, ``attention_mask`` (LEFT padding) and
    optionally ``prompt_mask`` (text tokens the pruner may use as keys; default: every text token
    of the prompt) and ``ratios``, the family's extra image inputs (LLaVA-NeXT: ``image_sizes``),
    plus every standard generation option.
    """

    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, pruned, ratios: Sequence[float | None] | None = None) -> None:
        config = copy.deepcopy(pruned.llava.config)  # PreTrainedModel.__init__ writes to its config
        super().__init__(config)
        self.pruned = pruned
        self.ratios = None if ratios is None else list(ratios)
        self.generation_config = copy.deepcopy(pruned.llava.generation_config)

    # ------------------------------------------------------------------------------ generate glue
    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
        """``GenerationMixin.generate`` after refusing the options the pruned cache cannot honour."""
        check_generation_options(generation_config or self.generation_config, kwargs)
        if kwargs.get("prompt_mask") is None:  # explicit, so use_cache=False recomputation keeps the same keys
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            mask = kwargs.get("attention_mask")
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            kwargs["prompt_mask"] = valid & (ids != self.pruned.family.image_token_id(self.pruned.llava))
        return super().generate(inputs, generation_config, **kwargs)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder=False, input_ids=None, **kw):
        """Beams / ``num_return_sequences``: the image inputs are expanded by the family (Qwen's flat patches
        are not batch-first: HF's row-wise ``repeat_interleave`` would scramble them)."""
        names = ("pixel_values", *self.pruned.family.image_input_names)
        images = {k: kw.pop(k) for k in names if kw.get(k) is not None}
        if expand_size > 1 and images:
            images = self.pruned.family.expand_image_inputs(self.pruned.llava, input_ids, images, expand_size)
        input_ids, kw = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **kw)
        return input_ids, {**kw, **images}

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """HF's typo check, minus the family's extra image inputs (they reach :meth:`forward` via ``**kwargs``)."""
        names = self.pruned.family.image_input_names
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in names})

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        """A :class:`PrunedCache` instead of transformers' default ``DynamicCache``."""
        given = model_kwargs.get("cache")
        if given is not None and not isinstance(given, PrunedCache):
            raise UnsupportedGenerationOption(
                f"generate(cache=...) must be a lightning_lvp PrunedCache, got {type(given).__name__}"
            )
        if given is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = PrunedCache(self.pruned.llava.config)
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        ratios: Sequence[float | None] | None = None,
        cache: PrunedCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 1,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Prefill (empty or no cache: token-removing forward) or one cached decode step.

        Args:
            input_ids: (B, T) whole prompt at prefill (or the whole sequence without a cache), (B, 1) when decoding.
            pixel_values: (B, C, H, W), prefill only.
            attention_mask: (B, T_total) 1 = real token (left padding); None = no padding.
            position_ids: (B, T) ORIGINAL positions of ``input_ids`` (generate: cumsum(mask) - 1).
            prompt_mask: (B, T_prompt) text keys of the pruner; padded with False to longer inputs.
            ratios: inference schedule for this call (None = the wrapper's default).
            cache: the :class:`PrunedCache` (filled at prefill), or None (recompute every step).

        Returns:
            ``logits`` (B, 1, V) for the last token and the ``cache``.
        """
        if cache is not None and cache.seen_tokens > 0:
            if input_ids.shape[1] != 1:
                raise UnsupportedGenerationOption("a PrunedCache decodes one token per step (got several new tokens)")
            return CausalLMOutputWithPast(logits=self._decode_step(input_ids, position_ids, cache), cache=cache)
        if pixel_values is None:
            raise ValueError("the prefill needs pixel_values (one image per sample)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask[:, -input_ids.shape[1] :]
        if prompt_mask is not None and prompt_mask.shape[1] < input_ids.shape[1]:  # recomputation: later tokens
            prompt_mask = torch.nn.functional.pad(prompt_mask.bool(), (0, input_ids.shape[1] - prompt_mask.shape[1]))
        ratios = self.ratios if ratios is None else ratios
        image_inputs = {k: kwargs[k] for k in self.pruned.family.image_input_names if k in kwargs}
        out = self.pruned.forward_infer(
            input_ids,
            pixel_values,
            attention_mask,
            prompt_mask,
            ratios,
            use_cache=cache is not None,
            cache=cache,
            **image_inputs,
        )
        if cache is not None:
            cache.set_layout(out.stage_valid, out.layer_stage, input_ids.shape[1])
        return CausalLMOutputWithPast(logits=self.pruned.logits(out.hidden[:, -1:]), cache=cache)

    def _decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache: PrunedCache):
        """(B, 1) tokens at their original positions through every layer's pruned cache -> (B, 1, V) logits."""
        llava, family = self.pruned.llava, self.pruned.family
        if position_ids is None:
            raise ValueError("decoding needs position_ids (generate builds them from the attention mask)")
        pos = family.decode_position_ids(llava, position_ids[:, -1:], cache.decode_state)
        cache.append_tokens(1)
        masks = cache.decode_masks()
        hidden = family.embed_tokens(llava, input_ids)
        pos_emb = family.rotary(llava, hidden, pos)
        for i, stage in enumerate(cache.layer_stage):
            hidden = family.run_layer(llava, i, hidden, masks[stage], pos, pos_emb, cache)
        return self.pruned.logits(hidden)


def generation_config_for(
    base: GenerationConfig,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
) -> GenerationConfig:
    """The ``GenerationConfig`` equivalent to :meth:`PrunedVLM.generate`'s arguments.

    A negative ``eos_token_id`` (the old loop's "never stop") disables eos.
    """
    cfg = copy.deepcopy(base)
    cfg.max_new_tokens, cfg.max_length, cfg.min_new_tokens, cfg.min_length = max_new_tokens, None, None, None
    cfg.do_sample, cfg.num_beams, cfg.num_return_sequences = do_sample, 1, 1
    cfg.temperature, cfg.top_k, cfg.top_p = (temperature, top_k or None, top_p) if do_sample else (None, None, None)
    no_eos = eos_token_id is None or (isinstance(eos_token_id, int) and eos_token_id < 0)
    cfg.eos_token_id = None if no_eos else eos_token_id
    cfg.pad_token_id = pad_token_id
    return cfg


class _GeneratorAsGlobalRng:
    """Runs a block with the global RNG swapped for ``generator``'s state (HF samples with the global RNG).

    ``torch.multinomial(p, 1, generator=g)`` and ``torch.multinomial(p, 1)`` with the global state set to
    ``g``'s draw the same numbers, so seeded sampling keeps giving the tokens of the old loop.
    """

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def _get(self):
        dev = self.generator.device
        return torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state()

    def _set(self, state):
        dev = self.generator.device
        return torch.cuda.set_rng_state(state, dev) if dev.type == "cuda" else torch.set_rng_state(state)

    def __enter__(self):
        if self.generator is not None:
            self.saved = self._get()
            self._set(self.generator.get_state())
        return self

    def __exit__(self, *exc):
        if self.generator is not None:
            self.generator.set_state(self._get())
            self._set(self.saved)
        return False


class DecodedStopStrings(StoppingCriteria):
    """Stops a row once its decoded continuation contains one of ``stops`` (any tokenizer).

    transformers' ``stop_strings`` pre-computes token/string overlaps from the vocabulary, which
    fails for word-level tokenizers such as the demo's; decoding the new tokens works for all.

    Args:
        tokenizer: decodes the generated ids.
        stops: stop strings (lmms-eval's ``until``).
        prompt_length: columns of the prompt in ``input_ids`` (only the continuation is searched).
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, [s for s in stops if s], prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)
