"""PrunedVLM: a frozen vision-language model plus a token-pruning method. Pure PyTorch (no Lightning).

Family-agnostic: every access to the HF model goes through its family object
(:func:`lightning_lvp.families.family_for`, chosen from the model's config; docs/FAMILIES.md).
``PrunedLlava`` is the old name of the same class. Two forwards share one decoder loop:

* :meth:`PrunedVLM.forward_train` keeps every token and applies the decisions as the eq. 7-9
  attention mask in every layer after a module (fixed shapes, differentiable, METHOD §3).
* :meth:`PrunedVLM.forward_infer` physically removes tokens at each pruning point (one gather per
  stage) from the hidden states, the mask, the rotary positions and hence the KV cache of all
  later layers; kept tokens keep their original positions (METHOD §4).

:meth:`PrunedVLM.generate` decodes with the pruned per-layer KV cache through transformers' own
``generate()`` (:mod:`lightning_lvp.generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lvp.families import family_for, load_model
from lightning_lvp.methods.base import PruningMethod, StageContext
from lightning_lvp.state import SeqState, causal_mask


@dataclass
class TrainOutput:
    """Result of the masked training forward.

    Attributes:
        loss_causal: mean cross-entropy over label tokens (None without labels).
        logits: (N, V) logits at the positions that predict a label token.
        targets: (N,) those label tokens.
        sample_index: (N,) batch row of each.
        kept: (B, S) kept fraction of the vision tokens after each module (cumulative, eq. 10).
        decisions: S tensors (B, T), the cumulative hard decisions (1 = keep) at vision positions.
        scores: S tensors (B, T), the method's keep scores (inference ranking) per stage, only with
            ``return_scores`` (the opt-in attention-distillation term reads them).
    """

    loss_causal: torch.Tensor | None
    logits: torch.Tensor
    targets: torch.Tensor
    sample_index: torch.Tensor
    kept: torch.Tensor
    decisions: list[torch.Tensor]
    scores: list[torch.Tensor] = field(default_factory=list)


@dataclass
class InferOutput:
    """Result of the token-removing inference forward.

    Attributes:
        hidden: (B, L', D) final hidden states (before the final norm) of the surviving slots.
        state: layout of those slots (``state.orig_index`` maps back to the input).
        kept_patches: S tensors (B, N) bool, which image patches are alive after each stage.
        cache: per-layer KV cache (when ``use_cache``), layers may hold different lengths.
        stage_valid: valid-key mask of the cache of each stage (stage 0 = before any pruning).
        layer_stage: stage whose layout each layer ran on.
    """

    hidden: torch.Tensor
    state: SeqState
    kept_patches: list[torch.Tensor]
    cache: object | None = None
    stage_valid: list[torch.Tensor] = field(default_factory=list)
    layer_stage: list[int] = field(default_factory=list)


def check_structure(structure: str, family) -> str:
    """``structure`` if ``family`` (a :class:`~lightning_lvp.families.base.VLMFamily`) allows it.

    Raises:
        ValueError: naming the family's allowed policies.
    """
    if structure not in family.structure_policies:
        raise ValueError(
            f"structure must be one of {list(family.structure_policies)} for a {family.name} model "
            f"(the policy for image tokens that are not patches), got {structure!r}"
        )
    return structure


class PrunedVLM(nn.Module):
    """A frozen HF vision-language model of any supported family with a :class:`PruningMethod`.

    Args:
        llava: the base model (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ...); all its parameters are frozen and it stays in eval mode. Its family is read from its config.
        method: pruning method (None = the unmodified model).
        gradient_checkpointing: recompute decoder layers in backward (training path).
        structure: policy for image-placeholder tokens that are not image patches (LLaVA-NeXT's
            ``image_newline`` row ends): "keep" = kept as structure (never pruned, not counted in
            the vision tokens the ratios refer to, not pruner keys), "prune" = vision tokens like the
            patches. Families without such tokens accept only "keep" (``VLMFamily.structure_policies``).
    """

    def __init__(
        self,
        llava: nn.Module,
        method: PruningMethod | None = None,
        gradient_checkpointing: bool = False,
        structure: str = "keep",
    ):
        super().__init__()
        self.family = family_for(llava)
        self.structure = check_structure(structure, self.family)
        self.llava = self.family.prepare_frozen(llava)
        self.dims = self.family.text_dims(llava.config)
        self.method = method
        if method is not None:
            from lightning_lvp.io import check_family

            check_family(f"the {type(method).__name__} given", getattr(method, "family", None), self.family.name)
            method.bind(self.dims)
            method.family = self.family.name
        self.gradient_checkpointing = gradient_checkpointing
        from lightning_lvp.families.base import set_gradient_checkpointing_fn

        self._checkpoint = set_gradient_checkpointing_fn()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        pruners: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
        structure: str = "keep",
    ) -> PrunedVLM:
        """The one loader of every command and plugin: a model of any supported family plus optional pruners.

        Args:
            model_path: model folder (``save_pretrained``) or hub id; the family is read from its config.
            pruners: exported pruner folder or a training checkpoint (``.ckpt`` / DeepSpeed folder);
                None = the unpruned model.
            dtype: parameter dtype of the base model (``torch.bfloat16`` or ``"bfloat16"``).
            device: device of the base model and the pruners (None = CPU).
            structure: policy for non-patch image tokens (see the class docstring).
        """
        from lightning_lvp.io import load_method

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        llava = load_model(model_path, dtype=dtype, device=device)
        method = None
        if pruners:
            try:
                family = family_for(llava)
                method = load_method(
                    pruners, family.text_dims(llava.config), device=device or "cpu", family=family.name
                )
            except ValueError as e:  # name both sides: the base folder and the pruner folder (#11)
                raise ValueError(f"pruners {pruners} do not fit the base model {model_path}: {e}") from e
        return cls(llava, method, structure=structure).eval()

    def train(self, mode: bool = True) -> PrunedVLM:
        super().train(mode)
        self.llava.eval()  # frozen base: no dropout, ever (the demo base trains without this class, #12)
        return self

    @property
    def points(self) -> dict[int, int]:
        """after_layer -> stage index."""
        return {layer: s for s, layer in enumerate(self.method.after_layers)} if self.method else {}

    # ----------------------------------------------------------------------------------- shared
    def initial_state(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **image_inputs,
    ) -> tuple[SeqState, torch.Tensor]:
        """Embeds the inputs and builds the input layout; returns it and the vision hidden states.

        ``position_ids`` defaults to the family's positions (``cumsum(attention_mask) - 1`` for 1-D
        RoPE); pass the original positions when the mask hides tokens inside the sequence (token-drop
        curriculum). ``image_inputs``: the family's extra image inputs (LLaVA-NeXT: ``image_sizes``).
        """
        state, merged = self._initial_state(
            input_ids, pixel_values, attention_mask, prompt_mask, position_ids, image_inputs
        )
        return state, merged.features.vision_hidden

    def _initial_state(self, input_ids, pixel_values, attention_mask, prompt_mask, position_ids, image_inputs):
        """:meth:`initial_state` with the family's whole :class:`~lightning_lvp.families.base.MergedInputs`."""
        merged = self.family.merge(self.llava, input_ids, pixel_values, structure=self.structure, **image_inputs)
        embeds, vision = merged.embeds, merged.vision
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        valid = attention_mask.bool()
        vision = vision & valid
        text = valid & ~vision
        key_text = text & ~merged.structure  # structure tokens (NeXT's newlines) are never pruner keys
        key_text = key_text if prompt_mask is None else (prompt_mask.bool() & key_text)
        if position_ids is None:
            position_ids = self.family.position_ids(self.llava, input_ids, attention_mask, merged)
        b, t = input_ids.shape
        state = SeqState(
            hidden=embeds,
            position_ids=position_ids,
            valid=valid,
            vision=vision,
            key_text=key_text,
            orig_index=torch.arange(t, device=input_ids.device).expand(b, t),
            patch_index=torch.where(vision, vision.long().cumsum(1) - 1, -1),
            n_vision=vision.sum(1),
        )
        return state, merged

    def _layer(self, i: int, hidden, mask, position_ids, pos_emb, cache=None, keep=None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
            fn = lambda h, k: self.family.run_layer(self.llava, i, h, mask, position_ids, pos_emb, None, k)  # noqa: E731
            return self._checkpoint(fn, hidden, keep)
        return self.family.run_layer(self.llava, i, hidden, mask, position_ids, pos_emb, cache, keep)

    def label_logits(self, hidden: torch.Tensor, state: SeqState, labels: torch.Tensor):
        """Logits only where the next token is a label (saves the (B, T, V) tensor).

        Works for pruned layouts: a slot with original index o predicts label o + 1 (answer tokens
        are text and follow text, so they are never pruned).

        Returns:
            logits (N, V), targets (N,), sample_index (N,).
        """
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # label of the NEXT original position
        targets = shifted.gather(1, state.orig_index).masked_fill(~state.valid, -100)
        sel = targets != -100
        h = self.family.final_norm(self.llava, hidden[sel])
        logits = self.family.lm_head(self.llava)(h)
        return logits, targets[sel], sel.nonzero()[:, 0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits of final hidden states."""
        return self.family.lm_head(self.llava)(self.family.final_norm(self.llava, hidden))

    # ----------------------------------------------------------------------------- training path
    def forward_train(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        tau: float = 1.0,
        decisions: Sequence[torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        return_scores: bool = False,
        **image_inputs,
    ) -> TrainOutput:
        """Masked forward of METHOD §3: no token is removed, decisions mask attention (eqs. 7-10).

        Args:
            input_ids, attention_mask, prompt_mask: (B, T); see docs/DESIGN.md.
            pixel_values: (B, C, H, W).
            labels: (B, T) with -100 outside the answers, or None.
            tau: Gumbel-Softmax temperature.
            decisions: optional fixed decisions per stage, (B, T) in input coordinates (1 = keep);
                replaces the Gumbel samples (used to compare with the inference path).
            position_ids: optional original positions (see :meth:`initial_state`).
            return_scores: also return the method's keep scores per stage (``TrainOutput.scores``).
            **image_inputs: the family's extra image inputs (LLaVA-NeXT: ``image_sizes`` (B, 2)).
        """
        state, merged = self._initial_state(
            input_ids, pixel_values, attention_mask, prompt_mask, position_ids, image_inputs
        )
        feats = merged.features
        scores = []
        hidden = state.hidden
        mask = causal_mask(state.valid, hidden.shape[1])
        pos_emb = self.family.rotary(self.llava, hidden, state.position_ids)
        vision_f = state.vision.to(hidden.dtype)
        keep, cumulative, kept, all_decisions = None, None, [], []
        for i in range(-1, self.dims.num_layers):  # i = -1: a pruning point on the LLM input (after_layer 0)
            if i >= 0:
                hidden = self._layer(i, hidden, mask, state.position_ids, pos_emb, keep=keep)
            s = self.points.get(i + 1)
            if s is None:
                continue
            state.hidden = hidden
            if decisions is not None:
                d = decisions[s].to(hidden.dtype) * vision_f
            else:
                layer = i if i >= 0 else None
                ctx = StageContext(s, layer, feats.vision_hidden)
                ctx.cls_similarity = lambda: self.family.patch_cls_similarity(feats)
                d = self.method.decide(state, ctx, tau).to(hidden.dtype)
                if return_scores:
                    scores.append(self.method.scores(state, ctx))
            cumulative = d if cumulative is None else d * cumulative  # eq. 10: dropped stays dropped
            keep = torch.where(state.vision, cumulative, torch.ones_like(cumulative))  # eq. 7 columns
            kept.append(cumulative.sum(1) / state.n_vision.clamp(min=1))
            all_decisions.append(cumulative)
        state.hidden = hidden
        b = input_ids.shape[0]
        kept_t = torch.stack(kept, 1) if kept else hidden.new_zeros(b, 0)
        if labels is None:
            empty = hidden.new_zeros(0, self.dims.vocab_size)
            return TrainOutput(None, empty, labels, labels, kept_t, all_decisions, scores)
        logits, targets, rows = self.label_logits(hidden, state, labels)
        loss = F.cross_entropy(logits.float(), targets) if targets.numel() else logits.sum() * 0.0
        return TrainOutput(loss, logits, targets, rows, kept_t, all_decisions, scores)

    # ---------------------------------------------------------------------------- inference path
    def forward_infer(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        ratios: Sequence[float | None] | None = None,
        decisions: Sequence[torch.Tensor] | None = None,
        use_cache: bool = False,
        cache: object | None = None,
        **image_inputs,
    ) -> InferOutput:
        """Token-removing forward (METHOD §4).

        Args:
            ratios: kept fraction of the ORIGINAL vision tokens per stage; None = the method's
                default schedule. Set at call time, independent of training.
            decisions: optional fixed keep masks per stage, (B, T) bool in input coordinates,
                instead of the method's choice (counts may differ per sample).
            use_cache: build the per-layer KV cache for :meth:`generate`.
            cache: an empty cache to fill (``generation.PrunedCache``) instead of a new one.
            **image_inputs: the family's extra image inputs (LLaVA-NeXT: ``image_sizes`` (B, 2)).
        """
        state, merged = self._initial_state(input_ids, pixel_values, attention_mask, prompt_mask, None, image_inputs)
        feats = merged.features
        vision_hidden = feats.vision_hidden
        family, llava = self.family, self.llava
        state = state.select(state.valid)  # padding out; rows left-packed
        ratios = self.method.resolve_ratios(ratios) if self.method else []
        if cache is None and use_cache:
            cache = family.new_cache(llava)
        if cache is not None and hasattr(cache, "decode_state"):
            cache.decode_state = merged.decode_state  # how decoding continues the positions
        stage_valid, layer_stage, kept_patches = [state.valid], [], []
        n_patches = int(state.n_vision.max())

        def layout(st: SeqState):
            """Mask (a function: the (B, 1, L, L) mask is built on first use only; a dense layout's layers
            never need it), rotary embeddings, and whether every slot is real (then the layers pass no mask)."""
            valid, built = st.valid, []

            def mask() -> torch.Tensor:
                if not built:
                    built.append(causal_mask(valid, valid.shape[1]))
                return built[0]

            return mask, family.rotary(llava, st.hidden, st.position_ids), bool(valid.all())

        mask, pos_emb, dense = layout(state)

        def context(st: SeqState, s: int, i: int | None, layer_input, mask, pos_emb) -> StageContext:
            """What a method may read at stage s (each tensor recomputed lazily, only if asked for)."""
            ctx = StageContext(s, i, vision_hidden, final_norm=lambda h: family.final_norm(llava, h))
            ctx.vision_attention = lambda: family.vision_cls_attention(llava, feats)
            ctx.cls_similarity = lambda: family.patch_cls_similarity(feats)
            ctx.project = lambda v: family.project_vision(llava, v)
            if i is not None:
                ctx.attention_row = lambda q: family.attention_probs(llava, i, layer_input, pos_emb, q, mask())
                ctx.layer_keys = lambda: family.layer_keys(llava, i, layer_input, pos_emb)
                if i + 1 < self.dims.num_layers:
                    ctx.next_attention_row = lambda q: family.attention_probs(
                        llava, i + 1, st.hidden, pos_emb, q, mask()
                    )
            return ctx

        def prune(st: SeqState, s: int, i: int | None, layer_input, mask, pos_emb) -> SeqState:
            if decisions is not None:
                chosen = decisions[s].bool().gather(1, st.orig_index)
                st = st.select((st.valid & ~st.vision) | (chosen & st.alive_vision))
            else:
                st = self.method.apply(st, context(st, s, i, layer_input, mask, pos_emb), ratios[s])
            alive = torch.zeros(st.valid.shape[0], n_patches + 1, dtype=torch.bool, device=st.valid.device)
            patch = torch.where(st.alive_vision & (st.patch_index >= 0), st.patch_index, n_patches)  # -1: CLS slot
            alive.scatter_(1, patch, True)
            kept_patches.append(alive[:, :n_patches])
            stage_valid.append(st.valid)
            return st

        if 0 in self.points:
            state = prune(state, self.points[0], None, None, None, None)
            mask, pos_emb, dense = layout(state)
        for i in range(self.dims.num_layers):
            layer_stage.append(len(stage_valid) - 1)
            layer_input = state.hidden
            # No padding / filler slot: SDPA's own causal path (no materialised mask), as HF's prefill does.
            layer_mask = None if dense else mask()
            state.hidden = self._layer(i, layer_input, layer_mask, state.position_ids, pos_emb, cache)
            s = self.points.get(i + 1)
            if s is not None:
                state = prune(state, s, i, layer_input, mask, pos_emb)
                mask, pos_emb, dense = layout(state)
        return InferOutput(state.hidden, state, kept_patches, cache, stage_valid, layer_stage)

    # -------------------------------------------------------------------------------- generation
    def for_generation(self, ratios: Sequence[float | None] | None = None):
        """This model as a transformers ``GenerationMixin`` model (:mod:`lightning_lvp.generation`).

        ``self.for_generation(ratios).generate(input_ids=..., pixel_values=..., attention_mask=...,
        num_beams=4, repetition_penalty=1.2, stop_strings=[...], tokenizer=tok, streamer=...)``:
        every option of transformers' ``generate`` over the pruned KV cache.
        """
        from lightning_lvp.generation import PrunedForGeneration

        return PrunedForGeneration(self, ratios)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        ratios: Sequence[float | None] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with the pruned KV cache, through transformers' ``generate()``.

        Args:
            input_ids, attention_mask, prompt_mask: (B, T), LEFT padded; see docs/DESIGN.md.
            pixel_values: (B, C, H, W).
            ratios: inference schedule (None = the method's keep_ratios).
            max_new_tokens, do_sample, temperature, top_k (0 = off), top_p: decoding options.
            eos_token_id: stop token (None = the model's; a negative id never stops).
            pad_token_id: filler after a sample's eos (None = the model's).
            generator: RNG of the sampling draws (None = the global RNG).
            **generate_kwargs: any further option of transformers' ``generate`` (num_beams,
                repetition_penalty, stopping_criteria, streamer, ...), and the family's extra image
                inputs (LLaVA-NeXT: ``image_sizes``).

        Returns:
            (B * num_return_sequences, n) new token ids, ``pad_token_id`` after a sample's eos.
        """
        from lightning_lvp.generation import _GeneratorAsGlobalRng, generation_config_for

        wrapper = self.for_generation(ratios)
        eos = self.family.eos_token_id(self.llava) if eos_token_id is None else eos_token_id
        pad = self.family.pad_token_id(self.llava) if pad_token_id is None else pad_token_id
        cfg = generation_config_for(
            wrapper.generation_config, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad
        )
        generate_kwargs = cfg.update(**generate_kwargs)  # GenerationConfig fields go into the config
        wrapper.generation_config = cfg  # also the defaults generate() fills unset fields from (eos may be off)
        if max_new_tokens <= 0:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with _GeneratorAsGlobalRng(generator if do_sample else None):
            out = wrapper.generate(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                prompt_mask=prompt_mask,
                generation_config=cfg,
                **generate_kwargs,
            )
        return out[:, input_ids.shape[1] :]


PrunedLlava = PrunedVLM  # the pre-#14 name (LLaVA-1.5 only then); same class
