"""PrunedLlava: masking equals removal, identity at rho = 1, padding, caching, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from core_fixtures import (
    IMG,
    N_VIS,
    SPEC,
    assert_cached_equals_recomputed,
    decisions_from,
    inputs,
    make_batch,
    make_method,
    make_model,
)

from lightning_lvp.model import PrunedLlava
from lightning_lvp.tiny import build_tiny_llava


@pytest.mark.parametrize("padding", ["left", "right"])
def test_masking_equals_removal(padding):
    """Same hard decisions: masked training path == token-removing path at every text position."""
    model = make_model()
    batch = make_batch([(3, 6, 3), (5, 2, 2), (1, 4, 4)], padding=padding)
    with torch.no_grad():
        infer = model.forward_infer(**inputs(batch))
        dec = decisions_from(infer, batch)
        train = model.forward_train(**inputs(batch), decisions=[d.float() for d in dec])
        infer = model.forward_infer(**inputs(batch), decisions=dec)
    state = infer.state
    logits_inf = model.logits(infer.hidden)
    # the training path keeps all tokens: recompute its full logits through label_logits on all text
    text_labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    text_labels[:, 0] = -100
    prev_text = torch.nn.functional.pad((batch["input_ids"] != IMG) & batch["attention_mask"].bool(), (1, 0))[:, :-1]
    text_labels = text_labels.masked_fill(~prev_text | (batch["input_ids"] == IMG), -100)
    out_train = model.forward_train(**inputs(batch), labels=text_labels, decisions=[d.float() for d in dec])
    lt, tt, rt = out_train.logits, out_train.targets, out_train.sample_index
    li, ti, ri = model.label_logits(infer.hidden, state, text_labels)
    assert lt.shape[0] > 20 and torch.equal(tt, ti) and torch.equal(rt, ri)
    torch.testing.assert_close(lt, li, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits_inf).all()
    assert torch.allclose(train.kept, torch.stack([d.sum(1) for d in dec], 1).float() / N_VIS)


def test_rho_one_is_the_base_model_and_no_method_is_untouched():
    base = build_tiny_llava(SPEC, seed=0)
    batch = make_batch([(3, 6, 0), (5, 2, 0)], padding="left")
    lengths = batch["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        refs = []
        for i, n in enumerate(lengths):  # each sample alone, unpadded, through HF's own forward
            refs.append(
                base(
                    input_ids=batch["input_ids"][i : i + 1, -n:], pixel_values=batch["pixel_values"][i : i + 1]
                ).logits[0]
            )
        before = base(input_ids=batch["input_ids"][:1, -lengths[0] :], pixel_values=batch["pixel_values"][:1]).logits
        model = PrunedLlava(base, make_method())
        after = base(input_ids=batch["input_ids"][:1, -lengths[0] :], pixel_values=batch["pixel_values"][:1]).logits
        assert torch.equal(before, after), "wrapping must not change the HF model's own forward"
        out = model.forward_infer(**inputs(batch), ratios=[1.0, 1.0, 1.0])
        plain = PrunedLlava(base, None).forward_infer(**inputs(batch))
    for out_ in (out, plain):
        logits = model.logits(out_.hidden)
        for i, n in enumerate(lengths):
            torch.testing.assert_close(logits[i, -n:], refs[i], atol=1e-5, rtol=1e-5)


def test_batch_with_mixed_padding_equals_each_sample_alone():
    model = make_model()
    specs = [(3, 6, 0), (7, 1, 0), (1, 3, 0)]
    for padding in ("left", "right"):
        batch = make_batch(specs, padding=padding)
        with torch.no_grad():
            out = model.forward_infer(**inputs(batch))
            last = model.logits(out.hidden[:, -1])
            for i in range(len(specs)):
                n = int(batch["attention_mask"][i].sum())
                sl = slice(-n, None) if padding == "left" else slice(0, n)
                single = {k: v[i : i + 1, sl] if v.dim() == 2 else v[i : i + 1] for k, v in inputs(batch).items()}
                alone = model.forward_infer(**single)
                torch.testing.assert_close(model.logits(alone.hidden[:, -1]), last[i : i + 1], atol=1e-5, rtol=1e-5)
                for a, b in zip(alone.kept_patches, out.kept_patches):
                    assert torch.equal(a[0], b[i])


def test_kept_counts_and_original_positions():
    model = make_model()
    batch = make_batch([(3, 6, 0), (5, 2, 0)], padding="left")
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model.forward_infer(**inputs(batch), ratios=[0.5, 0.3, 0.1], use_cache=True)
    # k_s = round(rho_s * 16): 8, round(4.8) = 5, round(1.6) = 2
    assert [k.sum(1).tolist() for k in out.kept_patches] == [[8, 8], [5, 5], [2, 2]]
    st = out.state
    assert torch.equal(st.position_ids[st.valid], positions.gather(1, st.orig_index)[st.valid])
    n_text = ((batch["input_ids"] != IMG) & batch["attention_mask"].bool()).sum(1)
    assert torch.equal(st.valid.sum(1), n_text + 2)
    # per-layer KV cache lengths follow the stages: layer 0 sees all, layer 1 after stage 1, ...
    from lightning_lvp.adapter import cache_lengths

    lengths = cache_lengths(out.cache)
    max_len = int(batch["attention_mask"].sum(1).max())
    assert lengths == [max_len, max_len - 8, max_len - 11, max_len - 14]


def test_cached_generation_matches_recomputation():
    model = make_model()
    batch = make_batch([(3, 6, 0), (5, 2, 0)], padding="left")
    assert_cached_equals_recomputed(model, batch, max_new_tokens=6)
    sampled = model.generate(
        **inputs(batch),
        max_new_tokens=4,
        do_sample=True,
        top_k=5,
        top_p=0.9,
        generator=torch.Generator().manual_seed(1),
        eos_token_id=-1,
    )
    assert sampled.shape == (2, 4)


def test_gradients_reach_every_module_and_never_llava():
    model = make_model()
    model.train()
    assert not model.llava.training, "the frozen LLaVA must stay in eval mode"
    batch = make_batch([(3, 6, 3), (5, 2, 2)], padding="right")
    before = {k: v.clone() for k, v in model.llava.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        out = model.forward_train(**inputs(batch), labels=batch["labels"], tau=1.0)
        loss = out.loss_causal + ((out.kept - torch.tensor([0.5, 0.3, 0.1])) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for s, module in enumerate(model.method.decision):
            grads = [p.grad for p in module.parameters()]
            assert all(g is not None for g in grads), f"module {s} has parameters without gradient"
            assert sum(float(g.abs().sum()) for g in grads) > 0, f"module {s} got zero gradients"
        assert all(p.grad is None for p in model.llava.parameters())
        opt.step()
    after = model.llava.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_first_module_gets_gradient_only_through_later_masks():
    """Causal loss alone (no ratio loss): module 1's gradient flows through the eq. 9 masks."""
    model = make_model(make_method(after_layers=[1, 3], keep_ratios=[0.5, 0.2], train_ratios=[0.5, 0.2]))
    batch = make_batch([(3, 6, 3)], padding="right")
    out = model.forward_train(**inputs(batch), labels=batch["labels"])
    out.loss_causal.backward()
    g = sum(float(p.grad.abs().sum()) for p in model.method.decision[0].parameters() if p.grad is not None)
    assert g > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = make_batch([(3, 6, 3)], padding="right")
    grads = []
    for ckpt in (False, True):
        model = make_model()
        model.gradient_checkpointing = ckpt
        torch.manual_seed(5)
        out = model.forward_train(**inputs(batch), labels=batch["labels"])
        (out.loss_causal + out.kept.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.method.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_ratios=[0.5, 0.6, 0.1]), "keep_ratios must be non-increasing"),
        (dict(keep_ratios=[1.5, 0.3, 0.1]), r"keep_ratios must be in \(0, 1\]"),
        (dict(keep_ratios=[0.5, 0.0, 0.1]), r"keep_ratios must be in \(0, 1\]"),
        (dict(train_ratios=[0.5, 0.3]), "train_ratios has 2 entries but after_layers has 3"),
        (dict(keep_ratios=[0.5, 0.3]), "keep_ratios has 2 entries but after_layers has 3"),
        (dict(after_layers=[1, 3, 2]), "after_layers must be strictly increasing"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_method(**kwargs)


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match=r"after_layers \[1, 2, 4\] out of range for an LLM with 4 layers"):
        make_model(make_method(after_layers=[1, 2, 4]))


def test_bad_inputs_raise_clear_errors():
    model = make_model()
    batch = make_batch([(3, 6, 0), (5, 2, 0)])
    no_image = batch["input_ids"].clone()
    no_image[1][no_image[1] == IMG] = 5
    with pytest.raises(ValueError, match="sample 1 has no image token"):
        model.forward_infer(no_image, batch["pixel_values"], batch["attention_mask"])
    extra = batch["input_ids"].clone()
    extra[0, -1] = IMG
    with pytest.raises(ValueError, match="sample 0 has 17 image tokens but its image gives 16 features"):
        model.forward_infer(extra, batch["pixel_values"], batch["attention_mask"])
    with pytest.raises(ValueError, match="input_ids must be"):
        model.forward_infer(batch["input_ids"][0], batch["pixel_values"])
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.forward_infer(batch["input_ids"], batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="leaves zero vision tokens"):
        model.forward_infer(**inputs(batch), ratios=[0.5, 0.3, 0.01])
    with pytest.raises(ValueError, match="ratios must be non-increasing"):
        model.forward_infer(**inputs(batch), ratios=[0.5, 0.6, 0.1])


def test_bf16_autocast_training_step():
    """bf16-mixed (autocast) works through the eq. 9 attention in forward and backward."""
    model = make_model()
    batch = make_batch([(3, 6, 3), (5, 2, 2)], padding="right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_train(**inputs(batch), labels=batch["labels"])
        loss = out.loss_causal + out.kept.float().sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.method.parameters())


def test_masking_equals_removal_with_a_module_on_the_llm_input():
    """after_layer 0: the first module reads the input embeddings; both paths still agree."""
    model = make_model(make_method(after_layers=[0, 2, 3]))
    batch = make_batch([(3, 6, 3), (5, 2, 2)], padding="left")
    with torch.no_grad():
        dec = decisions_from(model.forward_infer(**inputs(batch)), batch)
        train = model.forward_train(**inputs(batch), labels=batch["labels"], decisions=[d.float() for d in dec])
        infer = model.forward_infer(**inputs(batch), decisions=dec)
    li, ti, _ = model.label_logits(infer.hidden, infer.state, batch["labels"])
    assert torch.equal(train.targets, ti)
    torch.testing.assert_close(train.logits, li, atol=1e-5, rtol=1e-5)
    out = model.forward_train(**inputs(batch), labels=batch["labels"])
    (out.loss_causal + out.kept.sum()).backward()
    assert all(p.grad is not None for p in model.method.decision[0].parameters())
