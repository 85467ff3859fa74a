"""data/llava_mix/prepare.py: filtering the mix to its image subset, image checks and the report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from data_fixtures import entry, turns, write_image, write_json

ROOT = Path(__file__).resolve().parents[1]


def _prepare_module():
    spec = importlib.util.spec_from_file_location("llava_mix_prepare", ROOT / "data" / "llava_mix" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that the worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return module


def test_prepare_filters_checks_and_reports(tmp_path):
    images = tmp_path / "images"
    paths = {
        "coco": "coco/train2017/000000000009.jpg",
        "gqa": "gqa/images/1.jpg",
        "ocr_vqa": "ocr_vqa/images/2.jpg",
        "textvqa": "textvqa/train_images/3.jpg",
        "vg": "vg/VG_100K/4.jpg",
    }
    for p in paths.values():
        write_image(images / p)
    (images / "gqa/images/junk.jpg").write_bytes(b"not a jpeg")
    entries = [entry(f"{k}-{i}", p) for k, p in paths.items() for i in range(2)]
    entries += [entry(f"text-{i}", image=None, conversations=turns("Hi", "Hello")) for i in range(3)]
    entries += [entry("gone", "coco/train2017/missing.jpg"), entry("junk", "gqa/images/junk.jpg")]
    entries += [entry("two", paths["vg"], conversations=turns("<image> <image>", "x"))]
    src = write_json(tmp_path / "mix.json", entries)

    report = _prepare_module().main(["--json", str(src), "--image-folder", str(images), "--workers", "2"])

    kept = json.loads((tmp_path / "mix_images.json").read_text())
    assert [e["id"] for e in kept] == [e["id"] for e in entries[:10]]
    assert report == json.loads((tmp_path / "mix_report.json").read_text())
    assert (report["total_entries"], report["kept"]) == (16, 10)
    assert report["dropped"] == {"missing_image": 1, "multiple_image_tokens": 1, "text_only": 3, "unreadable_image": 1}
    assert report["per_source"]["coco"] == {"entries": 3, "kept": 2, "missing": 1}
    assert report["per_source"]["gqa"] == {"entries": 3, "kept": 2, "unreadable": 1}
    assert all(report["per_source"][s]["kept"] == 2 for s in ("ocr_vqa", "textvqa", "vg"))
    assert report["missing_files"] == ["coco/train2017/missing.jpg"]
    assert list(report["unreadable_files"]) == ["gqa/images/junk.jpg"]
