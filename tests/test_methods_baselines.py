"""DivPrune, DART, PyramidDrop and VisionZip: exact selections on hand-built inputs, references written
from the papers' equations (loops, no shared code), and the real tiny model.

Generation (cached == recomputed) and batch == single for these methods: tests/test_methods_generation.py.
The authors' VisionZip outputs: tests/test_peers_golden.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_lvp import adapter, attention
from lightning_lvp.families import base as family_base
from lightning_lvp.families import family_for
from lightning_lvp.methods import DART, DivPrune, PyramidDrop, StageContext, VisionZip
from lightning_lvp.methods.dart import dart_keep, pivot_order
from lightning_lvp.methods.divprune import max_min_diverse
from lightning_lvp.methods.visionzip import split_counts, visionzip_tokens
from lightning_lvp.model import PrunedLlava
from lightning_lvp.state import SeqState
from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

SPEC = TinyLlavaSpec()
N = SPEC.num_image_tokens


def make_state(n_vision, pre=2, post=3, fillers=(0,), dim=8, seed=0):
    """Rows: ``fillers[b]`` filler slots, ``pre`` text, ``n_vision`` vision, ``post`` text (all prompt)."""
    rows_v, rows_ok = [], []
    for f in fillers:
        rows_v.append([False] * (f + pre) + [True] * n_vision + [False] * post)
        rows_ok.append([False] * f + [True] * (pre + n_vision + post))
    length = max(map(len, rows_v))
    vision = torch.tensor([[False] * (length - len(r)) + r for r in rows_v])
    valid = torch.tensor([[False] * (length - len(r)) + r for r in rows_ok])
    b = len(fillers)
    return SeqState(
        hidden=torch.randn(b, length, dim, generator=torch.Generator().manual_seed(seed)),
        position_ids=(valid.long().cumsum(1) - 1).clamp(min=0),
        valid=valid,
        vision=vision,
        key_text=valid & ~vision,
        orig_index=torch.arange(length).expand(b, length),
        patch_index=torch.where(vision, vision.long().cumsum(1) - 1, -1),
        n_vision=vision.sum(1),
    )


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(SPEC, seed=0)


def prompt(n_pre=2, n_post=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 90, (n_pre + n_post,), generator=g).tolist()
    ids = torch.tensor([[1] + text[:n_pre] + [SPEC.image_token_id] * N + text[n_pre:]])
    return ids, torch.randn(1, 3, SPEC.image_size, SPEC.image_size, generator=g)


# --------------------------------------------------------------------------------------------- DivPrune
def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """Paper Alg. 1 on one row: first the token whose nearest neighbour is farthest, then max-min."""
    unit = x / x.norm(dim=-1, keepdim=True)
    d = 1.0 - unit @ unit.T
    n = x.shape[0]
    nearest_other = [min(float(d[i, j]) for i in range(n) if i != j) for j in range(n)]
    chosen = [max(range(n), key=lambda j: (nearest_other[j], -j))]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(float(d[i, j]) for i in chosen), -j)))
    return sorted(chosen)


def test_divprune_keeps_a_planted_far_point():
    torch.manual_seed(0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.01 * torch.randn(9, 4)  # one tight cluster
    x[5] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # the far point
    keep = max_min_diverse(x[None], torch.ones(1, 9, dtype=torch.bool), torch.tensor([1]))
    assert keep[0].nonzero().squeeze(1).tolist() == [5]
    keep = max_min_diverse(x[None], torch.ones(1, 9, dtype=torch.bool), torch.tensor([3]))
    assert 5 in keep[0].nonzero().squeeze(1).tolist() and int(keep.sum()) == 3


def test_divprune_matches_the_reference_with_padding_and_per_row_counts():
    state = make_state(12, fillers=(0, 3, 1), dim=6, seed=1)
    counts = torch.tensor([4, 2, 7])
    keep = max_min_diverse(state.hidden, state.alive_vision, counts)
    for b in range(3):
        slots = state.alive_vision[b].nonzero().squeeze(1)
        expected = divprune_reference(state.hidden[b, slots], int(counts[b]))
        assert state.patch_index[b][keep[b]].tolist() == expected


def test_divprune_select_keeps_text_and_the_count():
    state = make_state(16, fillers=(0, 2))
    method = DivPrune(keep_ratio=0.25)
    keep = method.select(state, StageContext(0, None), 0.25)
    assert (keep & state.vision).sum(1).tolist() == [4, 4]
    assert bool(keep[state.valid & ~state.vision].all()) and not bool(keep[~state.valid].any())
    assert method.after_layers == [0]


def test_divprune_duplicates_are_never_picked_twice():
    x = torch.ones(1, 6, 3)  # every token identical: all distances 0
    keep = max_min_diverse(x, torch.ones(1, 6, dtype=torch.bool), torch.tensor([4]))
    assert int(keep.sum()) == 4


# ------------------------------------------------------------------------------------------------- DART
def dart_reference(keys, normed, img_slots, txt_slots, k, p_img, p_txt):
    """The algorithm as the authors write it, one unpadded row (sequence index = position)."""
    l1 = keys.abs().sum(-1)
    img = [img_slots[i] for i in l1[img_slots].topk(p_img).indices.tolist()]
    txt = [txt_slots[i] for i in l1[txt_slots].topk(p_txt).indices.tolist()]
    per = k // (p_img + p_txt)
    kept = set(img)
    valid = [s for s in img_slots if s not in img]
    for pivot in list(set(img + txt)):  # the authors' loop order
        sim = F.cosine_similarity(normed[pivot][None], normed[valid], dim=-1)
        take = [valid[i] for i in (-sim).topk(min(per, len(valid))).indices.tolist()]
        kept.update(take)
        valid = [s for s in valid if s not in take]
    return sorted(kept)


def test_dart_drops_a_planted_duplicate_and_keeps_the_odd_token():
    # 8 vision tokens (slots 1..8), text slots 9..11; one image pivot, one text pivot, 2 tokens per pivot.
    length, dim = 12, 4
    keys = torch.zeros(1, length, 3)
    keys[0, 3] = 10.0  # vision pivot: largest L1 key norm among vision tokens
    keys[0, 10] = 10.0  # text pivot
    normed = torch.zeros(1, length, dim)
    normed[0, :, 0] = 1.0  # every token along e0 ...
    normed[0, 10] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # ... except the text pivot
    normed[0, 6] = normed[0, 3]  # planted duplicate of the vision pivot (and of most tokens)
    normed[0, 5] = torch.tensor([-1.0, 0.0, 0.0, 0.0])  # the most dissimilar token to the vision pivot
    normed[0, 2] = torch.tensor([0.0, -1.0, 0.0, 0.0])  # the most dissimilar token to the text pivot
    normed[0, 1:9] += 0.01 * torch.randn(8, dim, generator=torch.Generator().manual_seed(0))
    normed[0, 6] = normed[0, 3]
    vision = torch.zeros(1, length, dtype=torch.bool)
    vision[0, 1:9] = True
    text = torch.zeros(1, length, dtype=torch.bool)
    text[0, 9:] = True
    pos = torch.arange(length)[None]
    keep = dart_keep(keys, normed, vision, text, pos, torch.tensor([4]), 1, 1)
    kept = keep[0].nonzero().squeeze(1).tolist()
    assert 6 not in kept  # the duplicate of the pivot goes
    assert {3, 5, 2} <= set(kept) and len(kept) == 1 + 2 * 2


def test_dart_matches_the_reference():
    torch.manual_seed(3)
    length, n_img = 30, 20  # slots 2..21 vision, 22.. text
    keys, normed = torch.randn(1, length, 16), torch.randn(1, length, 8)
    vision = torch.zeros(1, length, dtype=torch.bool)
    vision[0, 2:22] = True
    text = torch.zeros(1, length, dtype=torch.bool)
    text[0, 22:] = True
    keep = dart_keep(keys, normed, vision, text, torch.arange(length)[None], torch.tensor([10]), 4, 4)
    img_slots, txt_slots = list(range(2, 22)), list(range(22, length))
    assert keep[0].nonzero().squeeze(1).tolist() == dart_reference(keys[0], normed[0], img_slots, txt_slots, 10, 4, 4)
    assert int(keep.sum()) == 4 + 8 * (10 // 8)
    assert n_img == int(vision.sum())


def test_pivot_order_is_the_set_order_of_the_positions():
    positions = [577, 40, 300, 41, 615, 620, 612, 600]
    assert [positions[i] for i in pivot_order(positions)] == list(set(positions))


def test_dart_runs_on_plain_sdpa_without_any_attention_map(llava, monkeypatch):
    """DART reads keys and hidden states only: no attention probabilities, no eager/masked attention."""

    def forbidden(*args, **kwargs):
        raise AssertionError("DART must not compute an attention map")

    monkeypatch.setattr(family_for(llava), "attention_probs", forbidden)  # the instance the pruned model calls
    monkeypatch.setattr(attention, "masked_softmax_attention", forbidden)
    monkeypatch.setattr(family_base, "masked_softmax_attention", forbidden)
    ids, pixels = prompt()
    model = PrunedLlava(llava, DART(k=2, keep_ratio=0.5, pivot_image=2, pivot_text=2))
    assert llava.config.text_config._attn_implementation == adapter.ATTN_IMPLEMENTATION  # SDPA without lvp_keep
    out = model.forward_infer(ids, pixels)
    assert out.kept_patches[0].sum().item() == 2 + 4 * (8 // 4)
    model.generate(ids, pixels, max_new_tokens=2, eos_token_id=-1)


def test_dart_reads_the_keys_of_layer_k_and_final_norm(llava):
    """The model-level choice equals dart_keep on keys/outputs recomputed by hand from HF hidden states."""
    ids, pixels = prompt(seed=2)
    k = 2
    model = PrunedLlava(llava, DART(k=k, keep_ratio=0.5, pivot_image=2, pivot_text=2))
    out = model.forward_infer(ids, pixels)
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        h_in, h_out = ref.hidden_states[k - 1], ref.hidden_states[k]  # input and output of layer k
        layer = llava.model.language_model.layers[k - 1]
        attn = layer.self_attn
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = llava.model.language_model.rotary_emb(h_in, pos)
        kk = attn.k_proj(layer.input_layernorm(h_in)).view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
        kk = (
            kk * cos[:, None]
            + torch.cat([-kk[..., attn.head_dim // 2 :], kk[..., : attn.head_dim // 2]], -1) * sin[:, None]
        )
        kk = kk.repeat_interleave(attn.num_key_value_groups, 1).transpose(1, 2).reshape(1, ids.shape[1], -1)
        normed = llava.model.language_model.norm(h_out)
    vision = ids == SPEC.image_token_id
    text = torch.zeros_like(vision)
    text[0, 3 + N :] = True
    expected = dart_keep(kk, normed, vision, text, pos, torch.tensor([8]), 2, 2)
    patches = expected[0][vision[0]]
    assert out.kept_patches[0][0].tolist() == patches.tolist()


# ------------------------------------------------------------------------------------------ PyramidDrop
def test_pdrop_ranks_with_the_next_layers_attention():
    state = make_state(8, fillers=(0, 2))
    probs = torch.rand(2, 3, state.valid.shape[1], generator=torch.Generator().manual_seed(0)).softmax(-1)
    probs[:, 0] = torch.linspace(0, 1, state.valid.shape[1])  # head 0 alone would disagree: mean over heads
    asked = []
    ctx = StageContext(0, 3, next_attention_row=lambda q: (asked.append(q.tolist()), probs)[1])
    method = PyramidDrop(layers=[4, 8], lam=0.5)
    keep = method.select(state, ctx, 0.5)
    last = state.valid.shape[1] - 1
    assert asked == [[last, last]]
    mean = probs.mean(1)
    for b in range(2):
        slots = state.alive_vision[b].nonzero().squeeze(1)
        best = slots[mean[b, slots].topk(4).indices].sort().values
        assert (keep[b] & state.vision[b]).nonzero().squeeze(1).tolist() == best.tolist()
    assert method.keep_ratios == [0.5, 0.25]
    with pytest.raises(ValueError, match="next_attention_row"):
        method.select(state, StageContext(0, 3), 0.5)


def test_pdrop_matches_eager_attention_of_the_following_layer(llava):
    """One stage after layer 1: kept = top-k of HF eager attention in layer 2 (last prompt token, head mean)."""
    eager = copy.deepcopy(llava)
    eager.set_attn_implementation("eager")
    ids, pixels = prompt(seed=4)
    out = PrunedLlava(llava, PyramidDrop(layers=[1], lam=0.25)).forward_infer(ids, pixels)
    with torch.no_grad():
        ref = eager(input_ids=ids, pixel_values=pixels, output_attentions=True)
    row = ref.attentions[1][0, :, -1].mean(0)  # layer 2 (0-based 1)
    slots = (ids[0] == SPEC.image_token_id).nonzero().squeeze(1)
    expected = row[slots].topk(4).indices.sort().values
    assert out.kept_patches[0][0].nonzero().squeeze(1).tolist() == expected.tolist()


def test_pdrop_stages_use_the_following_layers(llava, monkeypatch):
    layers = []
    original = family_for(llava).attention_probs
    monkeypatch.setattr(
        family_for(llava), "attention_probs", lambda m, i, *a: (layers.append(i), original(m, i, *a))[1]
    )
    ids, pixels = prompt()
    out = PrunedLlava(llava, PyramidDrop(layers=[1, 2], lam=0.5)).forward_infer(ids, pixels)
    assert layers == [1, 2]  # 0-based: the layer after each boundary
    assert [int(k.sum()) for k in out.kept_patches] == [8, 4]
    with pytest.raises(ValueError, match="layers"):
        PyramidDrop(layers=[0, 8])


# -------------------------------------------------------------------------------------------- VisionZip
def visionzip_reference(cls_attention, keys, hidden, d, c):
    """The paper's steps on one image, with loops: dominant set, targets, assignment, merge."""
    n = hidden.shape[0] - 1
    score = cls_attention[:, 1:].sum(0)
    dominant = sorted(score.topk(d).indices.tolist())
    rest = [p for p in range(n) if p not in dominant]
    step = max(1, len(rest) // c)
    targets = rest[::step][:c]
    others = [p for p in rest if p not in targets]
    unit = keys[1:] / keys[1:].norm(dim=-1, keepdim=True)
    groups = {t: [] for t in targets}
    for p in others:
        sims = torch.stack([unit[p] @ unit[t] for t in targets])
        groups[targets[int(sims.argmax())]].append(p)
    merged = [hidden[1 + t] + (hidden[[1 + p for p in groups[t]]].mean(0) if groups[t] else 0) for t in targets]
    return dominant, targets, torch.stack(merged)


def test_visionzip_tokens_equal_the_hand_computed_merge():
    g = torch.Generator().manual_seed(0)
    b, h, n, dv = 2, 3, 20, 6
    cls_attention = torch.rand(b, h, 1 + n, generator=g).softmax(-1)
    keys, hidden = torch.randn(b, 1 + n, 5, generator=g), torch.randn(b, 1 + n, dv, generator=g)
    dom, targets, merged = visionzip_tokens(cls_attention, keys, hidden, 7, 4)
    for i in range(b):
        d_ref, t_ref, m_ref = visionzip_reference(cls_attention[i], keys[i], hidden[i], 7, 4)
        assert dom[i].tolist() == d_ref and targets[i].tolist() == t_ref
        torch.testing.assert_close(merged[i], m_ref)


def test_visionzip_counts_and_bad_input():
    assert split_counts(64, 5 / 32, True) == (53, 10)  # the authors' dominant=54 (CLS included), contextual=10
    assert split_counts(192, 5 / 32, True) == (161, 30)
    assert split_counts(8, 0.0, False) == (8, 0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="VisionZip.*exceed"):
        visionzip_tokens(torch.rand(1, 2, 9, generator=g), torch.randn(1, 9, 4), torch.randn(1, 9, 4), 6, 3)
    with pytest.raises(ValueError, match="cls_to_llm"):
        VisionZip(cls_to_llm=True, layout="original")


def test_visionzip_in_the_model_feeds_cls_dominant_and_merged_tokens(llava):
    """LLM input block = projector([CLS, dominant, merged]) contiguous; text after the image keeps its positions."""
    ids, pixels = prompt(n_pre=2, n_post=4, seed=5)
    method = VisionZip(keep_ratio=0.5, contextual_fraction=0.25)  # 8 tokens: CLS + 5 dominant + 2 contextual
    model = PrunedLlava(llava, method)
    seen = {}
    original = method.apply

    def spy(state, ctx, ratio):
        new = original(state, ctx, ratio)
        seen["out"] = copy.copy(new)  # forward_infer rebinds new.hidden layer by layer
        return new

    method.apply = spy
    model.forward_infer(ids, pixels)
    new = seen["out"]
    with torch.no_grad():
        feats = adapter.image_features(llava, pixels)
        cls_attention, keys = adapter.vision_cls_attention(llava, feats.vision_input)
        d_ref, t_ref, m_ref = visionzip_reference(cls_attention[0], keys[0], feats.vision_hidden[0], 5, 2)
        block = torch.cat([feats.vision_hidden[0, :1], feats.vision_hidden[0, [1 + p for p in d_ref]], m_ref])
        expected = adapter.project_vision(llava, block[None])[0]
    vision = new.alive_vision[0]
    torch.testing.assert_close(new.hidden[0][vision], expected, atol=1e-5, rtol=1e-5)
    assert new.patch_index[0][vision].tolist() == [-1] + d_ref + t_ref
    t = ids.shape[1]
    assert new.position_ids[0].tolist() == list(range(t - (3 + 8 + 4), t))  # contiguous, ending where it did
    assert new.orig_index[0, -4:].tolist() == list(range(t - 4, t))


def test_visionzip_original_layout_keeps_patch_order_and_positions(llava):
    ids, pixels = prompt(seed=6)
    method = VisionZip(keep_ratio=0.5, contextual_fraction=0.25, cls_to_llm=False, layout="original")
    out = PrunedLlava(llava, method).forward_infer(ids, pixels)
    with torch.no_grad():
        feats = adapter.image_features(llava, pixels)
        cls_attention, keys = adapter.vision_cls_attention(llava, feats.vision_input)
    d_ref, t_ref, _ = visionzip_reference(cls_attention[0], keys[0], feats.vision_hidden[0], 6, 2)
    assert out.kept_patches[0][0].nonzero().squeeze(1).tolist() == sorted(d_ref + t_ref)


def test_visionzip_cls_attention_matches_eager_tower(llava):
    """The recomputed CLS row equals the eager vision tower's attention map of the selected layer."""
    eager = copy.deepcopy(llava)
    eager.set_attn_implementation("eager")
    _, pixels = prompt()
    with torch.no_grad():
        ref = eager.model.vision_tower(pixels, output_attentions=True)
        feats = adapter.image_features(llava, pixels)
        probs, keys = adapter.vision_cls_attention(llava, feats.vision_input)
    torch.testing.assert_close(probs, ref.attentions[-1][:, :, 0], atol=1e-6, rtol=1e-5)  # feature layer -1
    assert keys.shape == (1, 1 + N, SPEC.vision_hidden_size // SPEC.vision_heads)


# ------------------------------------------------------------------------------------------------ FLOPs
def test_peer_overhead_is_counted_as_pruner_flops(llava):
    """DivPrune's own work is its distance matrix, 2 N^2 D FLOPs; DART's the recomputed layer-k keys."""
    from lightning_lvp.flops import count_forward

    ids, pixels = prompt()
    batch = {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}
    flops, _ = count_forward(PrunedLlava(llava, DivPrune(keep_ratio=0.25)), batch)
    assert flops["pruners"] == 2 * N * N * SPEC.hidden_size and flops["other"] == 0
    flops, _ = count_forward(PrunedLlava(llava, DART(k=2, keep_ratio=0.5, pivot_image=2, pivot_text=2)), batch)
    t, d = ids.shape[1], SPEC.hidden_size
    similarity = 2 * t * d * 4  # (L, D) x (D, 4 pivots)
    assert flops["pruners"] == 2 * t * d * d + similarity  # k_proj (no GQA in the tiny model)


def test_peers_by_name(llava):
    from lightning_lvp.io import load_method
    from lightning_lvp.methods.peers import build_peer, is_peer_spec, paper_layers, pyramid_lambda

    dims = adapter.text_dims(llava.config)
    m = build_peer("dart:k=3,keep_ratio=0.25,pivot_text=2")
    assert isinstance(m, DART) and m.after_layers == [3] and m.keep_ratios == [0.25] and m.pivot_text == 2
    assert build_peer("pdrop", dims).after_layers == [1, 2, 3] and paper_layers(32) == [8, 16, 24]
    assert build_peer("pdrop:layers=1/3,lam=0.4").keep_ratios == pytest.approx([0.4, 0.16])
    vz = load_method("visionzip:keep_ratio=0.25,cls_to_llm=false,layout=original", dims)
    assert isinstance(vz, VisionZip) and not vz.cls_to_llm and vz.dims == dims
    assert is_peer_spec("divprune") and not is_peer_spec("runs/pruners")
    with pytest.raises(ValueError, match="unknown method"):
        build_peer("sparsevlm")
    with pytest.raises(ValueError, match="arg=value"):
        build_peer("dart:k")
    lam = pyramid_lambda(1 / 3, [8, 16, 24], 32)
    assert (1 + lam + lam**2 + lam**3) / 4 == pytest.approx(1 / 3) and pyramid_lambda(0.1, [8, 16, 24], 32) is None


@pytest.mark.parametrize(
    "method",
    [
        lambda: DivPrune(keep_ratio=0.25),
        lambda: DART(k=1, keep_ratio=0.5, pivot_image=2, pivot_text=2),
        lambda: PyramidDrop(layers=[1, 2], lam=0.5),
        lambda: VisionZip(keep_ratio=0.5, contextual_fraction=0.25),
    ],
)
def test_peers_on_grouped_query_attention(method):
    """Keys and attention rows of a GQA LLM (2 key/value heads for 4 query heads)."""
    llava = build_tiny_llava(SPEC, seed=1, num_kv_heads=2)
    ids, pixels = prompt()
    model = PrunedLlava(llava, method())
    out = model.forward_infer(ids, pixels)
    assert int(out.kept_patches[-1].sum()) < N
    assert model.generate(ids, pixels, max_new_tokens=2, eos_token_id=-1).shape == (1, 2)
