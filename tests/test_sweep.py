"""Sweep job: 3 schedules on a tiny model write CSV/JSON/PNG/TensorBoard and resume after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_fixtures import sweep_folder

from lightning_lvp import sweep
from lightning_lvp.cli import main
from lightning_lvp.commands.experiment import Experiment
from lightning_lvp.commands.sweep import DEFAULT_SCHEDULES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model_dir, _ = sweep_folder(root, images=8)
    return root, model_dir


def run(root, model_dir, out, rhos, extra=()):
    return main(
        [
            "sweep",
            "-c",
            str(root / "cfg.yaml"),
            "--pruners",
            str(root / "pruners"),
            "--model_path",
            str(model_dir),
            "--schedules",
            f"paper:{rhos}",
            "--out",
            str(out),
            "--batch_size",
            "8",
            *extra,
        ]
    )


def test_sweep_writes_files_and_resumes(setup, tmp_path, monkeypatch):
    root, model_dir = setup
    out = tmp_path / "out"
    calls = []
    real = sweep.evaluate_one
    monkeypatch.setattr(sweep, "evaluate_one", lambda *a: calls.append(a[3]) or real(*a))
    # "interrupted" run: base + 1 schedule done
    assert run(root, model_dir, out, "0.6") == 0
    assert calls == [None, [0.6, 0.4, 0.2]]
    calls.clear()
    # resumed with the full list of 3 schedules: only the missing ones are evaluated
    assert run(root, model_dir, out, "0.45:0.6:0.05", ["--include_base", "false"]) == 0
    assert calls == [[0.45, 0.25, 0.05], [0.5, 0.3, 0.1], [0.55, 0.35, 0.15]]
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [r["name"] for r in rows] == [
        "base",
        "[0.6, 0.4, 0.2]",
        "[0.45, 0.25, 0.05]",
        "[0.5, 0.3, 0.1]",
        "[0.55, 0.35, 0.15]",
    ]
    tflops = {r["name"]: r["tflops"] for r in rows}
    assert tflops["[0.45, 0.25, 0.05]"] < tflops["[0.5, 0.3, 0.1]"] < tflops["[0.6, 0.4, 0.2]"]
    assert rows[3]["kept_tokens"] == [18.0, 11.0, 4.0]  # round(rho x 36) per stage
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms_per_sample"] > 0 for r in rows)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,ratios,accuracy,tflops") and len(csv_lines) == 6
    # digits entries carry relevant patches: per-stage relevance columns, absent for the unpruned base
    assert "relevant_kept/layer1" in csv_lines[0] and "kept_overlap/layer4" in csv_lines[0]
    assert "relevant_kept" not in rows[0] and "kept_overlap" not in rows[0]
    for r in rows[1:]:
        assert list(r["relevant_kept"]) == list(r["kept_overlap"]) == ["layer1", "layer2", "layer4"]
        assert all(0.0 <= v <= 1.0 for v in [*r["relevant_kept"].values(), *r["kept_overlap"].values()])
    assert (out / "acc_vs_tflops.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_sweep_never_overwrites_other_results(setup, tmp_path):
    root, model_dir = setup
    out = tmp_path / "out"
    (out).mkdir()
    (out / "results.json").write_text(json.dumps({"settings": {"config": "other"}, "rows": []}))
    with pytest.raises(FileExistsError, match="results of other settings"):
        run(root, model_dir, out, "0.5")


def test_schedules_default_to_the_config_then_the_range(setup):
    """--schedules in the common syntax; default: the RatioSweep callback of the config (demo.yaml: rhos
    0.6/0.5/0.45), else the range paper:0.3:0.8:0.05."""
    root, _ = setup
    experiment = Experiment.load(root / "cfg.yaml")
    assert experiment.schedules(None, 3, DEFAULT_SCHEDULES) == [[0.6, 0.4, 0.2], [0.5, 0.3, 0.1], [0.45, 0.25, 0.05]]
    assert experiment.schedules("paper:0.5;0.6,0.4,0.2", 3) == [[0.5, 0.3, 0.1], [0.6, 0.4, 0.2]]
    assert Experiment().schedules(None, 3, DEFAULT_SCHEDULES)[0] == [0.3, 0.1, 0.05]  # rho - 0.4 < 0: floored
    assert len(Experiment().schedules(None, 3, DEFAULT_SCHEDULES)) == 11
    with pytest.raises(ValueError, match="has 2 ratios, the method has 3 stages"):
        experiment.schedules("0.5,0.3", 3)


def test_old_sweep_flags_fail_naming_the_new_ones(setup, capsys):
    root, model_dir = setup
    argv = ["sweep", "-c", str(root / "cfg.yaml"), "--pruners", str(root / "pruners")]
    for old, new in (
        (["--rhos", "0.3:0.8:0.05"], "--schedules paper:"),
        (["--schedule", "0.5,0.3,0.1"], "--schedules"),
        (["--no_base"], "--include_base false"),
        (["--batch-size", "8"], "--batch_size"),
        (["--max-batches", "1"], "--max_batches"),
        (["--model-path", str(model_dir)], "--model_path"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *old])
        assert exit_.value.code == 2 and new in capsys.readouterr().err, old


def test_sweep_takes_a_training_free_peer_by_name(setup, tmp_path):
    """``--pruners divprune`` (a peer spec, issue #15): the sweep varies its keep ratio."""
    root, model_dir = setup
    out = tmp_path / "out"
    argv = ["sweep", "-c", str(root / "cfg.yaml"), "--pruners", "divprune", "--model_path", str(model_dir)]
    argv += ["--schedules", "0.25", "--out", str(out), "--batch_size", "8", "--include_base", "false"]
    assert main([*argv, "--max_batches", "1"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["ratios"] for r in rows] == [[0.25]] and rows[0]["kept_tokens"] == [9.0]  # round(0.25 x 36)
