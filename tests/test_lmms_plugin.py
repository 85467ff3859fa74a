"""lmms-eval adapter against its documented generate_until interface (lmms-eval is not installable here)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from cli_fixtures import tiny_model_folder, tiny_pruned_model
from PIL import Image
from transformers import AutoProcessor

from lightning_lvp.eval.benchmarks import PromptItem
from lightning_lvp.eval.lmms_plugin import LVPLmms, cut_at
from lightning_lvp.eval.runner import PrunedGenerator


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    model_dir = tiny_model_folder(root / "model")
    model = tiny_pruned_model(model_dir)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    for i, im in enumerate(images):
        im.save(root / f"{i}.png")
    return root, model_dir, model, images


def test_generate_until_matches_our_generator(setup):
    root, model_dir, model, images = setup
    processor = AutoProcessor.from_pretrained(str(model_dir))
    plugin = LVPLmms(
        pretrained=str(model_dir), rho=0.5, batch_size=2, max_new_tokens=4, model=model, processor=processor
    )
    assert plugin.ratios == [0.5, 0.3, 0.1]
    plugin.task_dict = {"pope": {"test": {i: {"image": im} for i, im in enumerate(images)}}}
    questions = ["Is there a 7 in the image?", "What digit is in r2c2?", "How many 3s are in row 1?"]
    requests = [
        SimpleNamespace(
            args=(
                f"<image>\n{q}",
                {"max_new_tokens": 4, "until": ["</s>"]},
                lambda doc: [doc["image"]],
                i,
                "pope",
                "test",
            )
        )
        for i, q in enumerate(questions)
    ]
    got = plugin.generate_until(requests)
    ref = PrunedGenerator(model, processor, [str(root)], ratios=[0.5, 0.3, 0.1], max_new_tokens=4)
    want = ref([PromptItem(str(i), f"{i}.png", q) for i, q in enumerate(questions)])
    assert got == want and len(got) == 3
    with pytest.raises(NotImplementedError, match="generation tasks only"):
        plugin.loglikelihood(requests)


def test_cut_at_stop_strings():
    assert cut_at("yes. no", ["."]) == "yes"
    assert cut_at("answer", []) == "answer"
