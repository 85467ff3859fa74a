"""Re-packing after removal: order, left fillers, original positions."""

import torch

from lightning_lvp.state import SeqState, causal_mask, pack_index


def test_pack_index_right_aligns_in_order():
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    index, valid = pack_index(mask)
    assert index[0].tolist() == [0, 2, 3] and valid[0].all()
    assert index[1, -1].item() == 1 and valid[1].tolist() == [False, False, True]


def test_select_keeps_positions_and_order():
    b, t = 1, 6
    st = SeqState(
        hidden=torch.arange(t, dtype=torch.float)[None, :, None],
        position_ids=torch.arange(t)[None] + 10,
        valid=torch.ones(b, t, dtype=torch.bool),
        vision=torch.tensor([[0, 1, 1, 1, 0, 0]], dtype=torch.bool),
        key_text=torch.tensor([[1, 0, 0, 0, 1, 0]], dtype=torch.bool),
        orig_index=torch.arange(t)[None],
        patch_index=torch.tensor([[-1, 0, 1, 2, -1, -1]]),
        n_vision=torch.tensor([3]),
    )
    new = st.select(torch.tensor([[1, 0, 1, 0, 1, 1]], dtype=torch.bool))
    assert new.orig_index.tolist() == [[0, 2, 4, 5]]
    assert new.position_ids.tolist() == [[10, 12, 14, 15]]
    assert new.hidden[0, :, 0].tolist() == [0, 2, 4, 5]
    assert new.vision.tolist() == [[False, True, False, False]] and new.patch_index.tolist() == [[-1, 1, -1, -1]]


def test_causal_mask_decode_row_and_padding():
    valid = torch.tensor([[False, True, True]])
    m = causal_mask(valid, 3)[0, 0]
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert causal_mask(valid, 1)[0, 0].tolist() == [[False, True, True]]
