"""The embedded digits-grid dataset: determinism, correct answers, disjoint splits, relevant patches."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from lightning_lvp.data.digits import COLOURS, DigitsConfig, build_digits_dataset, cell_patches, ensure_digits_dataset
from lightning_lvp.data.llava_dataset import filter_entries, load_entries

SMALL = dict(
    grid_size=4, train_images=12, val_images=6, questions_per_type=2, question_types=["cell", "row_count", "col_count"]
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The small dataset built twice into two folders."""
    cfg = DigitsConfig(**SMALL)
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    build_digits_dataset(cfg, a)
    build_digits_dataset(cfg, b)
    return cfg, a, b


def test_deterministic_for_a_seed(built, tmp_path):
    cfg, a, b = built
    for name in ("train.json", "val.json", "train_grids.json", "val_grids.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for png in sorted((a / "train").glob("*.png"))[:4]:
        assert png.read_bytes() == (b / "train" / png.name).read_bytes()
    build_digits_dataset(DigitsConfig(**{**SMALL, "seed": 1}), tmp_path)
    assert (tmp_path / "train.json").read_text() != (a / "train.json").read_text()


def _answer(question: str, labels: np.ndarray) -> str:
    """Re-derives the reply from the generating digits' scikit-learn labels. labels: (G, G)."""
    if m := re.fullmatch(r"<image>\nWhat digit is in (r(\d+)c(\d+))\?", question):
        return f"{m[1]} {labels[int(m[2]) - 1, int(m[3]) - 1]}"
    if m := re.fullmatch(r"<image>\nHow many (\d)s are in row(\d+)\?", question):
        return f"{m[1]}s row{m[2]} {int((labels[int(m[2]) - 1] == int(m[1])).sum())}"
    m = re.fullmatch(r"<image>\nHow many (\d)s are in column(\d+)\?", question)
    return f"{m[1]}s column{m[2]} {int((labels[:, int(m[2]) - 1] == int(m[1])).sum())}"


@pytest.mark.parametrize("split", ["train", "val"])
def test_answers_match_the_digit_labels(built, split):
    cfg, root, _ = built
    digits = load_digits()
    grids = json.loads((root / f"{split}_grids.json").read_text())
    entries = json.loads((root / f"{split}.json").read_text())
    for e in entries:
        index = np.array(grids[e["image"]]).reshape(cfg.grid_size, cfg.grid_size)
        assert e["conversations"][1]["value"] == _answer(e["conversations"][0]["value"], digits.target[index])
    # the pixels are the digits themselves (values 0..16 scaled to 0..255)
    first = entries[0]["image"]
    pixels = np.asarray(Image.open(root / first))
    index = grids[first][cfg.grid_size + 1]  # row 2, column 2
    expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
    assert np.array_equal(pixels[8:16, 8:16], expected)


def test_train_and_val_use_disjoint_digits(built):
    _, root, _ = built
    train = {i for g in json.loads((root / "train_grids.json").read_text()).values() for i in g}
    val = {i for g in json.loads((root / "val_grids.json").read_text()).values() for i in g}
    assert train and val and not train & val


def test_questions_about_one_image_have_different_answers(built):
    _, root, _ = built
    answers = defaultdict(list)
    for e in json.loads((root / "train.json").read_text()):
        answers[e["image"], e["question_type"]].append(e["conversations"][1]["value"])
    assert all(len(a) == len(set(a)) for a in answers.values())
    per_image = defaultdict(set)
    for (image, _), a in answers.items():
        per_image[image].update(a)
    assert all(len(a) > 1 for a in per_image.values())


def test_entries_are_llava_format_with_relevant_patches(built):
    cfg, root, _ = built
    entries = load_entries(root / "train.json")
    kept, report = filter_entries(entries, "train.json")
    assert report.kept == len(entries) == len(kept)
    for e in entries:
        assert (root / e["image"]).is_file()
        n = {"cell": 1, "row_count": cfg.grid_size, "col_count": cfg.grid_size}[e["question_type"]]
        assert len(e["relevant_patches"]) == n
    cell = next(e for e in entries if e["question_type"] == "cell")
    r, c = map(int, re.search(r"r(\d+)c(\d+)", cell["conversations"][0]["value"]).groups())
    assert cell["relevant_patches"] == [(r - 1) * cfg.grid_size + (c - 1)]
    with Image.open(root / cell["image"]) as image:
        assert image.size == (cfg.image_size, cfg.image_size) and image.mode == "L"


def test_relevant_patches_when_cells_span_several_patches():
    cfg = DigitsConfig(grid_size=3, cell_px=16, patch_size=8)  # 6x6 patches, 2x2 per cell
    assert cell_patches([0], [0], cfg) == [0, 1, 6, 7]
    assert cell_patches([2], [1], cfg) == [26, 27, 32, 33]
    cfg = DigitsConfig(grid_size=4, cell_px=8, patch_size=16)  # one patch holds 2x2 cells
    assert cell_patches([3], [3], cfg) == [3]


def test_ensure_builds_once_into_the_cache(tmp_path):
    cfg = DigitsConfig(**{**SMALL, "train_images": 2, "val_images": 1})
    folder = ensure_digits_dataset(cfg, tmp_path)
    stamp = (folder / "train.json").stat().st_mtime_ns
    assert ensure_digits_dataset(cfg, tmp_path) == folder
    assert (folder / "train.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(grid_size=17), "grid_size"),
        (dict(cell_px=4), "cell_px"),
        (dict(patch_size=5), "patch_size"),
        (dict(question_types=["shape"]), "question_types"),
        (dict(question_types=["colour"], questions_per_type=7), "questions_per_type"),
        (dict(questions_per_type=0), "questions_per_type"),
    ],
)
def test_config_errors_name_the_field(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        DigitsConfig(**kwargs)


def test_demo_tokenizer_knows_every_word(built):
    from lightning_lvp.data.tokenizer import build_tiny_tokenizer

    _, root, _ = built
    tok = build_tiny_tokenizer()
    for e in json.loads((root / "train.json").read_text()):
        text = " ".join(t["value"] for t in e["conversations"])
        assert tok.unk_token_id not in tok(text)["input_ids"], text


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    cfg = DigitsConfig(grid_size=4, train_images=10, val_images=4, questions_per_type=2, question_types=["colour"])
    root = tmp_path_factory.mktemp("coloured")
    build_digits_dataset(cfg, root)
    return cfg, root


def test_colour_questions_name_a_once_only_colour_and_its_digit(coloured):
    cfg, root = coloured
    digits = load_digits()
    names = list(COLOURS)
    grids = json.loads((root / "train_grids.json").read_text())
    colours = json.loads((root / "train_colours.json").read_text())
    entries = json.loads((root / "train.json").read_text())
    assert len(entries) == 2 * cfg.train_images
    for e in entries:
        colour = e["conversations"][0]["value"].removeprefix("<image>\nWhat digit is ").removesuffix("?")
        cells = [i for i, c in enumerate(colours[e["image"]]) if names[c] == colour]
        assert len(cells) == 1, (e["id"], colour)  # the asked colour appears exactly once
        assert e["relevant_patches"] == cells  # one 8-px cell = one patch
        assert e["conversations"][1]["value"] == str(digits.target[grids[e["image"]][cells[0]]])
        assert e["question_type"] == "colour"
    # the two questions about one image ask different colours
    by_image = {}
    for e in entries:
        by_image.setdefault(e["image"], set()).add(e["conversations"][0]["value"])
    assert all(len(q) == 2 for q in by_image.values())


def test_colour_pixels_are_a_white_digit_on_its_colour(coloured):
    cfg, root = coloured
    digits = load_digits()
    grids = json.loads((root / "val_grids.json").read_text())
    colours = json.loads((root / "val_colours.json").read_text())
    image = next(iter(grids))
    pixels = np.asarray(Image.open(root / image))
    assert pixels.shape == (cfg.image_size, cfg.image_size, 3)
    cell = cfg.grid_size + 1  # row 2, column 2
    grey = np.round(digits.images[grids[image][cell]] * 255 / 16)
    bg = 0.5 * np.asarray(COLOURS[list(COLOURS)[colours[image][cell]]], dtype=np.float64)
    expected = np.round(bg + (255 - bg) * grey[..., None] / 255)  # white strokes on the cell's colour
    assert np.array_equal(pixels[8:16, 8:16], expected.astype(np.uint8))


def test_demo_tokenizer_knows_the_colour_words(coloured):
    from lightning_lvp.data.tokenizer import build_tiny_tokenizer

    _, root = coloured
    tok = build_tiny_tokenizer()
    for e in json.loads((root / "train.json").read_text()):
        text = " ".join(t["value"] for t in e["conversations"])
        assert tok.unk_token_id not in tok(text)["input_ids"], text
