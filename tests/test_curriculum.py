"""Token-drop curriculum: which tokens stay visible, original positions, the controller and its state."""

from __future__ import annotations

import pytest
import torch

from lightning_lvp.training.curriculum import TokenDropCurriculum, drop_vision_tokens, original_position_ids


def _batch(left_pad: bool = False) -> dict:
    """2 samples: 3 text + 6 vision + 2 text tokens; the second has 2 padding slots."""
    vision = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    mask = torch.ones(2, 11, dtype=torch.long)
    vision = vision.repeat(2, 1)
    if left_pad:
        mask[1] = torch.tensor([0, 0] + [1] * 9)
        vision[1] = torch.cat([torch.zeros(2, dtype=torch.bool), vision[1, :9]])
    else:
        mask[1, 9:] = 0
        vision[1] = vision[0]
    relevant = torch.zeros_like(vision)
    relevant[0, 5] = True  # sample 0 asks about its 3rd patch
    return {"attention_mask": mask, "vision_mask": vision, "relevant_mask": relevant}


@pytest.mark.parametrize("left_pad", [False, True])
def test_keeps_n_vision_tokens_including_relevant(left_pad):
    batch = _batch(left_pad)
    for n in range(0, 7):
        mask, pos = drop_vision_tokens(batch, n, torch.Generator().manual_seed(n))
        shown = (mask.bool() & batch["vision_mask"]).sum(-1)
        assert shown.tolist() == [max(n, 1), n]  # sample 0 always shows its relevant token
        assert bool(mask[0, 5])
        text = ~batch["vision_mask"]
        assert torch.equal(mask[text], batch["attention_mask"][text])  # text and padding untouched
        assert torch.equal(pos, original_position_ids(batch["attention_mask"]))


def test_original_positions_for_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert original_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_relevant_tokens_beyond_n_are_all_kept():
    batch = _batch()
    batch["relevant_mask"][1, 3:9] = True  # a row question: all 6 patches matter
    mask, _ = drop_vision_tokens(batch, 2)
    assert bool(mask[1, 3:9].all())


def test_without_relevant_mask_choice_is_random_but_seeded():
    batch = {k: v for k, v in _batch().items() if k != "relevant_mask"}
    a, _ = drop_vision_tokens(batch, 3, torch.Generator().manual_seed(0))
    b, _ = drop_vision_tokens(batch, 3, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert (a.bool() & batch["vision_mask"]).sum(-1).tolist() == [3, 3]


def test_controller_grows_only_when_window_accuracy_passes():
    cur = TokenDropCurriculum(max_n=36, start_n=4, growth=1.5, threshold=0.8, window=10)
    assert not cur.update(torch.ones(6, dtype=torch.bool))  # window not full yet
    assert cur.update(torch.ones(4, dtype=torch.bool)) and cur.n == 6
    assert not cur.update(torch.tensor([True] * 8 + [False] * 2)) and cur.n == 6  # exactly 80 % does not pass
    for expected in (9, 14, 21, 32, 36, 36):
        cur.update(torch.ones(10, dtype=torch.bool))
        assert cur.n == expected
    assert cur.done


def test_controller_state_round_trip_resumes():
    cur = TokenDropCurriculum(max_n=36, start_n=4, window=10)
    cur.update(torch.ones(10, dtype=torch.bool))
    cur.update(torch.tensor([True, False, True]))
    resumed = TokenDropCurriculum(max_n=36, start_n=4, window=10)
    resumed.load_state_dict(cur.state_dict())
    assert resumed.state_dict() == cur.state_dict() == {"n": 6, "correct": 2, "seen": 3}
    for c in (cur, resumed):
        c.update(torch.ones(7, dtype=torch.bool))
    assert cur.n == resumed.n == 9


def test_done_curriculum_is_the_identity():
    batch = _batch()
    cur = TokenDropCurriculum(max_n=6, start_n=6)
    mask, pos = cur.apply(batch)
    assert torch.equal(mask, batch["attention_mask"])
    assert torch.equal(pos, original_position_ids(batch["attention_mask"]))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_n=0),
        dict(max_n=4, start_n=5),
        dict(max_n=4, growth=1.0),
        dict(max_n=4, threshold=1.0),
        dict(max_n=4, window=0),
    ],
)
def test_controller_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        TokenDropCurriculum(**kwargs)


def test_hidden_tokens_do_not_reach_the_text():
    """With the mask and original positions, a tiny LLaVA's text outputs ignore the hidden image tokens."""
    from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

    spec = TinyLlavaSpec()  # 16 px / 4 px -> 16 image tokens
    model = build_tiny_llava(spec)
    n_img = spec.num_image_tokens
    ids = torch.cat([torch.tensor([1, 5, 6]), torch.full((n_img,), spec.image_token_id), torch.tensor([7, 8])])[None]
    batch = {"attention_mask": torch.ones_like(ids), "vision_mask": ids == spec.image_token_id}
    mask, pos = drop_vision_tokens(batch, 4, torch.Generator().manual_seed(0))
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos).logits
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]  # (16, D)
        embeds[batch["vision_mask"]] = features
        keep = mask[0].bool()
        removed = model(inputs_embeds=embeds[:, keep], position_ids=pos[:, keep]).logits
    assert torch.allclose(ref[:, -2:], removed[:, -2:], atol=1e-5)
