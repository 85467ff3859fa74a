"""Batched (left-padded) generation gives the same answers as batch size 1; missing images are counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_fixtures import tiny_model_folder, tiny_pruned_model
from PIL import Image
from transformers import AutoProcessor

from lightning_lvp.eval.benchmarks import PromptItem, generate_answers
from lightning_lvp.eval.runner import PrunedGenerator


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    model_dir = tiny_model_folder(root / "model")
    model = tiny_pruned_model(model_dir)
    rng = np.random.default_rng(0)
    for i, size in enumerate([(48, 48), (60, 30), (20, 52), (48, 48), (33, 33)]):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / f"img{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "gray.png")  # grayscale: converted
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return PrunedGenerator(model, processor, [str(root)], ratios=[0.5, 0.3, 0.1], max_new_tokens=5)


def items():
    prompts = [
        "What digit is in r1c1?",
        "How many 7s are in row 2?",
        "What digit is in r3c4? Answer with one word.",
        "How many",
        "What digit is in r6c6?",
        "How many 3s are in column 5?",
    ]
    images = ["img0.png", "img1.png", "img2.png", "img3.png", "missing.png", "gray.png"]
    return [PromptItem(f"q{i}", img, p) for i, (p, img) in enumerate(zip(prompts, images))]


def test_batched_answers_equal_batch_size_one(generator):
    torch.manual_seed(0)
    batched = generator(items())
    single = [generator([it])[0] for it in items()]
    assert batched == single
    assert sum(len(a) > 0 for a in batched) >= 4  # random weights still emit tokens
    assert batched[4] == ""  # missing image: no answer ...
    assert generator.missing["missing_image"] >= 1 and "q4" in generator.missing_ids  # ... but counted


def test_generate_answers_records(generator):
    questions = [{"question_id": it.question_id, "image": it.image, "text": it.prompt} for it in items()[:3]]
    records = generate_answers("gqa", questions, generator, model_id="tiny", batch_size=2)
    assert [r["question_id"] for r in records] == ["q0", "q1", "q2"]
    assert all(r["prompt"].endswith("Answer the question using a single word or phrase.") for r in records)


def test_from_pretrained_and_the_evaluate_command_read_one_schedule_syntax(tmp_path, generator):
    """``PrunedLlava.from_pretrained`` (the commands' one loader) + ``evaluate --schedules`` in both spellings."""
    import json

    from lightning_lvp.cli import main
    from lightning_lvp.io import save_pruners
    from lightning_lvp.model import PrunedLlava

    model_dir = tmp_path / "model"
    tiny_model_folder(model_dir)
    method = tiny_pruned_model(model_dir).method
    save_pruners(method, tmp_path / "pruners")
    loaded = PrunedLlava.from_pretrained(str(model_dir), str(tmp_path / "pruners"), dtype="bfloat16")
    assert next(loaded.llava.parameters()).dtype == torch.bfloat16 and not loaded.training
    saved = method.state_dict()
    assert loaded.method.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.method.state_dict().items())
    assert PrunedLlava.from_pretrained(str(model_dir)).method is None

    root = generator.image_folders[0]
    (tmp_path / "q.jsonl").write_text(
        "\n".join(json.dumps({"question_id": f"q{i}", "image": f"img{i}.png", "text": "What digit?"}) for i in range(3))
    )
    answers = {}
    for name, ratios in (("explicit", "0.5,0.3,0.1"), ("paper", "paper:0.5")):
        out = tmp_path / f"{name}.jsonl"
        argv = ["evaluate", "--benchmark", "gqa", "--questions", str(tmp_path / "q.jsonl"), "--image_folder", root]
        argv += ["--model_path", str(model_dir), "--pruners", str(tmp_path / "pruners"), "--schedules", ratios]
        assert main([*argv, "--max_new_tokens", "3", "--answers", str(out)]) == 0
        answers[name] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(answers["paper"]) == 3 and answers["paper"] == answers["explicit"]
