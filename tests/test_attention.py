"""Eq. 9 masked attention: exact values, reference equality (values and gradients), memory."""

import torch

from lightning_lvp.attention import keep_attend_mask, masked_attention_reference, masked_softmax_attention


def _inputs(b=2, h=3, t=9, d=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    base = torch.ones(t, t, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    base[1, :, :, :2] = False  # sample 1 is left-padded by 2
    base |= torch.eye(t, dtype=torch.bool)
    vision = torch.zeros(b, t, dtype=torch.bool)
    vision[:, 3:7] = True
    soft = torch.rand(b, t, dtype=dtype, generator=g).requires_grad_()
    hard = (torch.rand(b, t, generator=g) > 0.5).to(dtype)
    decisions = hard + soft - soft.detach()  # straight-through
    keep = torch.where(vision, decisions, torch.ones_like(decisions))
    return q, k, v, base, keep, soft


def test_mask_of_eq7_on_a_hand_built_case():
    base = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0]])  # token 1 (vision) dropped
    m = keep_attend_mask(base, keep)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)  # column 1 masked except its own row (M[i, i] = 1)


def test_exact_value_two_keys():
    # one query attending to two keys with scores 0 and log 3: weights 1/4, 3/4; dropping key 0 gives 0, 1
    q = torch.tensor([[[[1.0]]]]).expand(1, 1, 2, 1).contiguous()
    k = torch.tensor([[[[0.0], [float(torch.log(torch.tensor(3.0)))]]]])
    v = torch.tensor([[[[10.0], [20.0]]]])
    base = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    out = masked_softmax_attention(q, k, v, base, torch.ones(1, 2), scale=1.0)
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([17.5, 17.5]))
    out = masked_softmax_attention(q, k, v, base, torch.tensor([[0.0, 1.0]]), scale=1.0)
    # row 1 no longer sees key 0; row 0 IS token 0 and still sees itself (M[i, i] = 1, eq. 7)
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([17.5, 20.0]))


def test_matches_reference_values_and_gradients():
    q, k, v, base, keep, soft = _inputs()
    out = masked_softmax_attention(q, k, v, base, keep, 0.5)
    ref = masked_attention_reference(q, k, v, base, keep, 0.5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [q, k, v, soft], retain_graph=True)
    want = torch.autograd.grad((ref * g).sum(), [q, k, v, soft])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert float(got[3].abs().sum()) > 0


def test_saves_no_seq_by_seq_tensor_for_backward():
    """Between forward and backward only O(T) tensors are kept (q, k, v, masks, output)."""
    q, k, v, base, keep, _ = _inputs(t=32, d=4)
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        masked_softmax_attention(q, k, v, base, keep, 0.5)
    b, h, t = 2, 3, 32
    assert (b, h, t, t) not in saved, saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        saved.clear()
        masked_attention_reference(q, k, v, base, keep, 0.5)
    assert saved.count((b, h, t, t)) >= 2  # the literal formula keeps several
