"""The hand-written decoding loop that ``PrunedLlava.generate`` was before issue #13 (reference only).

Kept verbatim in behaviour (greedy / temperature / top-k / top-p with ``lightning_lvp.sampling``,
one cached decode step per token over each layer's pruned cache) so tests can check that the
transformers-``generate()`` path gives the same tokens.
"""

from __future__ import annotations

import torch

from lightning_lvp import adapter
from lightning_lvp.sampling import sample_next
from lightning_lvp.state import causal_mask


def _decode_step(model, tokens, positions, out):
    hidden = adapter.embed_tokens(model.llava, tokens[:, None])
    pos = positions[:, None]
    ones = torch.ones_like(tokens, dtype=torch.bool)[:, None]
    out.stage_valid = [torch.cat([v, ones], 1) for v in out.stage_valid]
    masks = [causal_mask(v, 1) for v in out.stage_valid]
    pos_emb = adapter.rotary(model.llava, hidden, pos)
    for i in range(model.dims.num_layers):
        hidden = adapter.run_layer(model.llava, i, hidden, masks[out.layer_stage[i]], pos, pos_emb, out.cache)
    return model.logits(hidden)[:, -1]


@torch.no_grad()
def loop_generate(
    model,
    input_ids,
    pixel_values,
    attention_mask=None,
    prompt_mask=None,
    ratios=None,
    max_new_tokens=32,
    do_sample=False,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    eos_token_id=None,
    pad_token_id=None,
    generator=None,
):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = adapter.eos_token_id(model.llava) if eos_token_id is None else eos_token_id
    pad = adapter.pad_token_id(model.llava) if pad_token_id is None else pad_token_id
    out = model.forward_infer(input_ids, pixel_values, attention_mask, prompt_mask, ratios, use_cache=True)
    logits = model.logits(out.hidden[:, -1:])[:, -1]
    positions = attention_mask.long().sum(1)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        tok = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        new_tokens.append(tok)
        if eos is not None:
            finished |= tok == eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = _decode_step(model, tok, positions, out)
        positions = positions + 1
    if not new_tokens:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.stack(new_tokens, 1)
