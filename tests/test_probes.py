"""Capacity probes: exact top-k recall, a synthetic case the relevance probe must solve, hidden states vs HF,
and the ``probe`` command on a tiny random model (shapes, table, JSON)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_fixtures import tiny_model_folder

from lightning_lvp import adapter
from lightning_lvp.cli import main
from lightning_lvp.decision import DecisionModule
from lightning_lvp.model import PrunedLlava
from lightning_lvp.probes import (
    Tokens,
    default_k,
    hidden_at_depths,
    score_relevance,
    topk_recall,
    train_relevance,
    with_position_codes,
)

REPO = Path(__file__).resolve().parents[1]


def tokens(vision: torch.Tensor, relevant: torch.Tensor, text: torch.Tensor | None = None) -> Tokens:
    b, n, d = vision.shape
    text = torch.zeros(b, 1, d) if text is None else text
    ones = torch.ones(b, n, dtype=torch.bool)
    return Tokens(
        vision, ones, text, torch.ones(text.shape[:2], dtype=torch.bool), relevant, torch.arange(n).expand(b, n)
    )


def test_topk_recall_exact():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    rel = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    t = tokens(torch.zeros(3, 4, 2), rel)
    recall, hit = topk_recall(scores, t, k=2)  # top 2: {0, 1}, {3, 2}, -
    assert recall[:2].tolist() == [0.5, 0.0] and recall[2].isnan()  # no relevant patch: undefined, not 0
    assert hit.tolist() == [False, False, False]
    recall, hit = topk_recall(scores, t, k=3)
    assert recall[:2].tolist() == [1.0, 0.5] and hit[:2].tolist() == [True, False]


def _synthetic(g: torch.Generator, codes: torch.Tensor, b: int = 32) -> Tokens:
    """Patch i carries code i; the question's last text token is the code of the asked patch."""
    n, d = codes.shape
    asked = torch.randint(n, (b,), generator=g)
    rel = torch.zeros(b, n, dtype=torch.bool)
    rel[torch.arange(b), asked] = True
    text = torch.randn(b, 3, d, generator=g)
    text[:, -1] = 2 * codes[asked]
    return tokens(torch.randn(b, n, d, generator=g) + 2 * codes[None], rel, text)


def test_relevance_probe_learns_a_question_dependent_synthetic_case():
    """Relevance is readable from the features (matching codes): the probe's training reaches full recall."""
    torch.manual_seed(0)
    codes = torch.randn(16, 32)
    val = [_synthetic(torch.Generator().manual_seed(2), codes) for _ in range(4)]
    module = DecisionModule(32, num_heads=4, input_norm=True)
    before = score_relevance(module, val, k=1)
    assert before["chance"] == pytest.approx(1 / 16) and before["n"] == 128 and before["recall"] < 0.3
    g = torch.Generator().manual_seed(1)
    losses, _ = train_relevance(module, (_synthetic(g, codes) for _ in itertools.count()), steps=300, lr=3e-3)
    after = score_relevance(module, val, k=1)
    assert after["recall"] >= 0.95 and after["all_in_topk"] == after["recall"]  # one relevant patch each
    assert losses[-1] < 0.25 * losses[0]


def test_position_codes_are_added_by_patch_index():
    t = tokens(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool))
    t.patch[:] = torch.tensor([[-1, 0, 2]])  # a filler slot, then patches 0 and 2
    t.vision_valid[0, 0] = False
    codes = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert with_position_codes(t, codes).vision.tolist() == [[[0.0, 0.0], [1.0, 2.0], [5.0, 6.0]]]


def test_score_relevance_without_relevant_patches_is_an_error():
    t = tokens(torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="relevant_patches"):
        score_relevance(DecisionModule(8, num_heads=2), [t], k=1)


def test_default_k():
    from lightning_lvp.methods import LVPruning

    assert default_k(LVPruning([1, 2, 4], [0.5, 0.3, 0.1], [0.5, 0.3, 0.1]), 36) == 4  # round(0.1 x 36)
    assert default_k(None, 576) == 58


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    model_dir = tiny_model_folder(root / "model")
    cfg = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    data = cfg["data"]["init_args"]
    data["cache_dir"] = str(root / "cache")
    data["digits"] = {**(data.get("digits") or {}), "train_images": 8, "val_images": 8, "questions_per_type": 2}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root, model_dir


def test_hidden_states_match_hf(setup):
    root, model_dir = setup
    llava = adapter.load_llava(str(model_dir))
    model = PrunedLlava(llava, None).eval()
    g = torch.Generator().manual_seed(0)
    n_vis = int(llava.config.image_seq_length)
    ids = torch.cat(
        [torch.tensor([[1, 5]]), torch.full((1, n_vis), adapter.image_token_id(llava)), torch.tensor([[7, 8, 9]])], 1
    )
    pix = torch.randn(1, 3, 48, 48, generator=g)
    batch = {"input_ids": ids, "pixel_values": pix, "attention_mask": torch.ones_like(ids)}
    _, hidden = hidden_at_depths(model, batch, [0, 1, 3])
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pix, attention_mask=batch["attention_mask"], output_hidden_states=True)
    for d in (0, 1, 3):
        torch.testing.assert_close(hidden[d], ref.hidden_states[d], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="probe depths must be in"):
        hidden_at_depths(model, batch, [6])


def test_probe_commands_print_tables_and_write_json(setup, tmp_path, capsys):
    root, model_dir = setup
    common = ["-c", str(root / "cfg.yaml"), "--model_path", str(model_dir), "--batch_size", "8"]
    out = tmp_path / "rel.json"
    argv = ["probe", "relevance", *common, "--after_layer", "[0,2]", "--steps", "3", "--eval_batches", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Relevance probe" in text and "LLM input" in text and "after layer 2" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["depth"] for r in rows] == [0, 2]
    for r in rows:
        assert r["k"] == 4 and r["num_heads"] == 4 and r["num_blocks"] == 2  # the demo method's schedule / module
        assert r["n"] == 8 and r["chance"] == pytest.approx(4 / 36) and 0.0 <= r["recall"] <= 1.0
        assert r["loss_first"] > 0 and r["steps"] == 3
    out = tmp_path / "pos.json"
    argv = ["probe", "position", *common, "--layers", "[0,1]", "--train_batches", "1", "--val_batches", "1"]
    assert main([*argv, "--steps", "5", "--json", str(out)]) == 0
    assert "Position probe" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["depth"] for r in rows] == [0, 1]
    for r in rows:
        assert r["classes"] == 36 and r["n_train"] == 8 * 36 and r["n_val"] == 8 * 36
        assert r["chance"] == pytest.approx(1 / 36) and 0.0 <= r["accuracy"] <= 1.0


def test_probe_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "relevance", "--help"])
    text = capsys.readouterr().out
    for flag in ("--after_layer", "--k", "--steps", "--lr", "--dim", "--num_heads", "--num_blocks", "--input_norm"):
        assert flag in text
