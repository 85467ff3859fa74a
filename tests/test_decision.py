"""Decision module, Gumbel decisions and the ratio loss."""

import pytest
import torch

from lightning_lvp.decision import CrossAttentionBlock, DecisionModule, gumbel_keep, ratio_loss


def test_shapes_blocks_and_padding_keys_ignored():
    m = DecisionModule(hidden_size=16, num_blocks=2, num_heads=4)
    assert len(m.blocks) == 2 and m.head.out_features == 2
    ffn = [type(x).__name__ for x in m.blocks[0].ffn]
    assert ffn == ["LayerNorm", "Linear", "SiLU", "Linear", "LayerNorm"]
    assert m.blocks[0].ffn[1].out_features == 32
    vision, text = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    gamma = m(vision, text, mask)
    assert gamma.shape == (2, 5, 2)
    garbage = text.clone()
    garbage[~mask] = 1e4  # padding keys must not matter
    torch.testing.assert_close(m(vision, garbage, mask), gamma)


def test_residual_on_query():
    block = CrossAttentionBlock(8, num_heads=2)
    for p in (block.o_proj.weight, block.o_proj.bias):
        torch.nn.init.zeros_(p)
    block.ffn = torch.nn.Identity()
    x = torch.randn(1, 3, 8)
    out = block(x, torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(out, block.q_proj(x))  # O = MHA(...) + Q with MHA = 0


def test_input_projection_when_width_differs():
    m = DecisionModule(hidden_size=16, dim=8, num_heads=2)
    assert isinstance(m.in_proj, torch.nn.Linear) and m.in_proj.out_features == 8
    assert m(torch.randn(1, 3, 16), torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.bool)).shape == (1, 3, 2)


def test_no_key_tokens_is_an_error():
    m = DecisionModule(hidden_size=8, num_heads=2)
    with pytest.raises(ValueError, match="at least one text token"):
        m(torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.zeros(1, 2, dtype=torch.bool))


def test_gumbel_keep_is_hard_with_straight_through_gradient():
    gamma = torch.randn(4, 10, 2, requires_grad=True)
    d = gumbel_keep(gamma, tau=1.0)
    assert set(d.unique().tolist()) <= {0.0, 1.0}
    d.sum().backward()
    assert gamma.grad.abs().sum() > 0


def test_ratio_loss_exact_values():
    kept = torch.tensor([[0.7, 0.3, 0.1], [0.5, 0.5, 0.1]])
    target = torch.tensor([0.5, 0.3, 0.1])
    # squared errors: 0.04, 0, 0, 0, 0.04, 0 -> mean 0.08 / 6
    assert ratio_loss(kept, target, "mse").item() == pytest.approx(0.08 / 6)
    # Huber (delta 0.5): 0.5 * 0.2^2 = 0.02 twice -> 0.04 / 6
    assert ratio_loss(kept, target, "huber", beta=0.5).item() == pytest.approx(0.04 / 6)
    # beyond beta the Huber loss is linear: beta * (|x| - beta / 2) = 0.5 * (0.9 - 0.25)
    far = ratio_loss(torch.tensor([[1.0]]), torch.tensor([0.1]), "huber", beta=0.5)
    assert far.item() == pytest.approx(0.325)
    with pytest.raises(ValueError, match="ratio loss kind"):
        ratio_loss(kept, target, "l1")


def test_rotary_tables_match_llama_rope():
    """Our RoPE (pure torch) == transformers' Llama rotary embedding + apply_rotary_pos_emb on the same positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from lightning_lvp.decision import apply_rotary, rotary_cos_sin

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=16)
    pos = torch.tensor([[0, 3, 7, 40], [5, 6, 9, 100]])
    x = torch.randn(2, 2, 4, 16)  # (B, H, N, head_dim)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    ours = apply_rotary(x, *rotary_cos_sin(pos, 16, cfg.rope_parameters["rope_theta"]))
    torch.testing.assert_close(ours, ref)


def test_rotary_module_depends_on_relative_positions_only():
    torch.manual_seed(0)
    m = DecisionModule(hidden_size=16, num_blocks=2, num_heads=2, rotary=True)
    vision, text = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    mask = torch.ones(1, 3, dtype=torch.bool)
    vpos, tpos = torch.arange(5)[None], torch.tensor([[9, 10, 12]])
    gamma = m(vision, text, mask, vpos, tpos)
    torch.testing.assert_close(m(vision, text, mask, vpos + 17, tpos + 17), gamma)  # a shift changes nothing
    assert not torch.allclose(m(vision, text, mask, vpos, tpos + 3), gamma)  # another offset does
    with pytest.raises(ValueError, match="vision_pos"):
        m(vision, text, mask)
    plain = DecisionModule(hidden_size=16, num_blocks=2, num_heads=2)
    plain.load_state_dict(m.state_dict())  # same weights: rotary adds no parameters
    assert not torch.allclose(plain(vision, text, mask), gamma)
