"""What a 665k-entry run meets (issue #16): extreme aspect ratios cost bounded memory, decompression bombs
are counted skips or clear errors, and every dropped or skipped entry is reported (per epoch, TensorBoard,
end-of-fit summary, JSONL with id + file + reason), setup-time drops at WARNING."""
# ruff: noqa: F811  (pytest fixtures imported from data_fixtures are redefined as arguments)

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_fixtures import entry, processor, processor_dir, turns, write_image, write_json  # noqa: F401
from PIL import Image

from lightning_lvp.data.collate import LlavaCollator, SkipCountingLoader
from lightning_lvp.data.llava_dataset import BadSampleError, LlavaDataset, expand_to_square, resize_then_pad


@pytest.fixture(scope="module")
def clip336(tmp_path_factory):
    """LLaVA-1.5's image processing: CLIP at 336 px (shortest edge 336, bicubic, centre crop 336)."""
    from transformers import AutoProcessor

    from lightning_lvp.data.tokenizer import save_tiny_processor

    folder = tmp_path_factory.mktemp("clip336")
    save_tiny_processor(folder, 336, 14)
    return AutoProcessor.from_pretrained(folder)


def photos() -> list[Image.Image]:
    """Real photos (scikit-learn's two sample images) in landscape, portrait and a wide crop."""
    from sklearn.datasets import load_sample_images

    out = []
    for array in load_sample_images().images:
        image = Image.fromarray(array)  # 640 x 427
        out += [image, image.transpose(Image.Transpose.TRANSPOSE), image.crop((0, 100, 640, 260))]
    return out


def test_resize_then_pad_equals_llava_pad_then_resize_on_photos(clip336):
    """Same pixel values as LLaVA-1.5's expand2square + CLIP resize, up to rounding (<= 1 grey level)."""
    ip = clip336.image_processor
    background = tuple(int(round(255 * m)) for m in ip.image_mean)
    std = torch.tensor(ip.image_std)[:, None, None]
    for image in photos():
        llava = ip(expand_to_square(image, background), return_tensors="pt")["pixel_values"][0]
        ours = ip(resize_then_pad(image, 336, background, ip.resample), return_tensors="pt")["pixel_values"][0]
        levels = ((llava - ours).abs() * std * 255).round()  # difference in 8-bit grey levels
        assert levels.max() <= 1, image.size
        assert (levels > 0).float().mean() < 1e-3, image.size  # nearly every pixel identical
    small = Image.new("RGB", (30, 20), (9, 99, 199))  # smaller than 336: padded exactly as before
    assert resize_then_pad(small, 336, background).tobytes() == expand_to_square(small, background).tobytes()


MEASURE = """
import json, sys, time
from pathlib import Path
from transformers import AutoProcessor
from lightning_lvp.data.llava_dataset import LlavaDataset

folder, pad = Path(sys.argv[1]), sys.argv[2] == "1"
def read(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
processor = AutoProcessor.from_pretrained(folder / "clip")
entries = [{"id": n, "image": n + ".png", "conversations": [{"from": "human", "value": "<image>\\nQ?"},
           {"from": "gpt", "value": "7"}]} for n in ("panorama", "tower")]
ds = LlavaDataset(entries, [str(folder)], processor, pad_to_square=pad)
out = {}
for i, name in enumerate(("panorama", "tower")):
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before, start = read("VmRSS"), time.perf_counter()
    shape = list(ds[i]["pixel_values"].shape)
    out[name] = (read("VmHWM") - before, time.perf_counter() - start, shape)
Path("/proc/self/clear_refs").write_text("5")
before = read("VmRSS")
from PIL import Image
Image.new("RGB", (6000, 6000)).load()  # a known allocation: 108 MB
out["control"] = (read("VmHWM") - before, 0.0, [])
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("pad_to_square", [True, False])
def test_extreme_aspect_ratio_images_cost_bounded_memory(clip336, tmp_path, pad_to_square):
    """Peak resident memory of loading a 20000 x 10 and a 10 x 20000 image, in a fresh process (PIL
    allocates outside Python, so tracemalloc would not see it; memory freed by earlier tests would hide it)."""
    import subprocess
    import sys

    clip336.save_pretrained(tmp_path / "clip")
    Image.new("RGB", (20000, 10), (200, 10, 10)).save(tmp_path / "panorama.png")
    Image.new("RGB", (10, 20000), (10, 200, 10)).save(tmp_path / "tower.png")
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), "1" if pad_to_square else "0"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["control"][0] > 90  # the measurement sees a 108 MB image
    for name in ("panorama", "tower"):
        mb, seconds, shape = measured[name]
        assert mb < 100, f"{name}: {mb:.0f} MB"  # padding first cost 5.3 GB (issue #16)
        assert seconds < 5 and shape == [3, 336, 336]


def test_decompression_bomb_is_a_counted_skip_or_a_clear_error(processor, tmp_path):
    Image.new("L", (4000, 3000)).save(tmp_path / "big.png")  # 12 Mpx, tiny as a file
    write_image(tmp_path / "ok.png")
    entries = [entry("ok", "ok.png"), entry("bomb", "big.png")]
    raising = LlavaDataset(entries, [str(tmp_path)], processor, max_image_pixels=10_000_000)
    with pytest.raises(BadSampleError, match=r"entry 'bomb' \(image .*big\.png\): image_too_large: 4000 x 3000"):
        raising[1]
    skipping = LlavaDataset(entries, [str(tmp_path)], processor, max_image_pixels=10_000_000, policy="skip")
    loader = SkipCountingLoader(skipping, batch_size=2, collate_fn=LlavaCollator(0))
    assert [b["ids"] for b in loader] == [["ok"]]
    assert loader.epoch_skips == {"image_too_large": 1}
    assert loader.tally.records == [
        {"split": "train", "id": "bomb", "file": str(tmp_path / "big.png"), "reason": "image_too_large"}
    ]
    assert LlavaDataset(entries, [str(tmp_path)], processor, max_image_pixels=None)[1]["id"] == "bomb"  # no limit


def test_loader_resumes_mid_epoch_in_the_same_order_without_loading_skipped_batches(processor, tmp_path):
    write_image(tmp_path / "a.png")
    entries = [entry(f"e{i}", "a.png") for i in range(10)]
    ds = LlavaDataset(entries, [str(tmp_path)], processor)

    def loader():
        return SkipCountingLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3),
                                  collate_fn=LlavaCollator(0))  # fmt: skip

    whole = loader()
    epoch0 = [b["ids"] for b in whole]
    epoch1 = [b["ids"] for b in whole]
    assert epoch0 != epoch1  # reshuffled
    cut = loader()
    it = iter(cut)
    first = [next(it)["ids"] for _ in range(2)]
    state = cut.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    loaded = []
    original = ds._load
    ds._load = lambda e: loaded.append(e["id"]) or original(e)
    rest = [b["ids"] for b in resumed]
    ds._load = original
    assert first + rest == epoch0 and len(loaded) == 6  # the 4 entries already trained on are not loaded
    assert [b["ids"] for b in resumed] == epoch1  # and the next epoch follows as in the uninterrupted run


def test_setup_time_drops_are_warnings_with_counts_and_ids(processor_dir, tmp_path, caplog):
    from lightning_lvp.data.datamodule import LlavaDataModule

    write_image(tmp_path / "a.png")
    bad = [entry("two", conversations=turns("<image> <image>", "7")), entry("noimg", conversations=turns("Q?", "7"))]
    path = write_json(tmp_path / "mix.json", [entry("ok"), *bad, entry("text", image=None)])
    dm = LlavaDataModule(str(processor_dir), dataset="llava", train_json=str(path), val_json=str(path),
                         image_folder=str(tmp_path), bad_samples="skip", num_workers=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lightning_lvp"):
        dm.setup()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped 3 (multiple_image_tokens=1, no_image_token=1, text_only=1)" in r.getMessage() for r in warned)
    ids = {(e["id"], e["reason"], e["file"]) for e in dm.filter_reports[0].entries}
    assert ids == {("two", "multiple_image_tokens", str(path)), ("noimg", "no_image_token", str(path)),
                   ("text", "text_only", str(path))}  # fmt: skip


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for events in log_dir.glob("**/events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_fit_reports_skips_every_epoch_and_lists_every_bad_entry(processor_dir, tmp_path, caplog, capsys):
    """3 epochs over 12 entries with one missing image (the case of issue #16 that printed 0 reports) plus
    entries dropped at setup: a report per epoch, scalars, a summary, and the JSONL with every id."""
    from cli_fixtures import tiny_model_folder

    from lightning_lvp.cli import main

    model = tiny_model_folder(tmp_path / "model")
    write_image(tmp_path / "img" / "a.png", size=(48, 48))
    entries = [entry(f"ok{i}", "a.png") for i in range(11)] + [entry("gone", "missing.png")]
    entries.append(entry("two", conversations=turns("<image> <image>", "7")))
    train = write_json(tmp_path / "train.json", entries)
    val = write_json(tmp_path / "val.json", [entry("v1", "a.png"), entry("vgone", "nope.png")])
    args = [
        "fit", "-c", str(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"),
        f"--model.init_args.model_path={model}", "--trainer.max_steps=-1", "--trainer.max_epochs=3",
        "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--data.init_args.dataset=llava", f"--data.init_args.train_json={train}", f"--data.init_args.val_json={val}",
        f"--data.init_args.image_folder={tmp_path / 'img'}", "--data.init_args.bad_samples=skip",
        "--data.init_args.batch_size=4", "--data.init_args.val_batch_size=4", "--data.init_args.num_workers=0",
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lightning_lvp"):
        main(args)
    messages = [r.getMessage() for r in caplog.records]
    for epoch in range(3):
        assert any(m.startswith(f"train epoch {epoch}: skipped 1 bad samples (missing_image=1)") for m in messages)
    assert sum(m.startswith("val at step") and "missing_image=1" in m for m in messages) == 3
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("Bad samples in this fit"))
    assert "dropped when reading 1 (multiple_image_tokens=1)" in summary
    assert "train skipped 3 (missing_image=3)" in summary and "val skipped 3 (missing_image=3)" in summary
    run = tmp_path / "runs" / "demo" / "version_0"
    jsonl = run / "skipped_entries.jsonl"
    assert str(jsonl) in summary
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    load = Counter((r["split"], r["id"], r["reason"]) for r in records if r["stage"] == "load")
    assert load == {("train", "gone", "missing_image"): 3, ("val", "vgone", "missing_image"): 3}
    assert all(r["file"].endswith(("missing.png", "nope.png")) for r in records if r["stage"] == "load")
    assert [(r["id"], r["reason"], r["file"]) for r in records if r["stage"] == "setup"] == [
        ("two", "multiple_image_tokens", str(train))
    ]
    tb = scalars(run)
    assert [v for _, v in tb["skipped/train"]] == [1.0, 1.0, 1.0]
    assert [v for _, v in tb["skipped/train/missing_image"]] == [1.0, 1.0, 1.0]
    assert len(tb["skipped/val"]) == 3
