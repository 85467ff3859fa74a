"""The real lmms-eval client end to end (slow; needs the eval environment of scripts/eval_env.sh).

Runs scripts/lmms_e2e.py with the eval environment's Python on 3 digit grids (6 questions):
lmms-eval's own CLI for the unpruned model, LVPruning and FastV, each score equal to
``python -m lightning_lvp evaluate`` on the same items, results JSON present.
``pytest -m slow tests/test_lmms_e2e.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv-eval" / "bin" / "python"


@pytest.mark.slow
def test_lmms_eval_cli_scores_equal_evaluate(tmp_path):
    if not PYTHON.exists():
        pytest.skip("no eval environment: run scripts/eval_env.sh first (docs/EVAL.md)")
    cmd = [str(PYTHON), str(REPO / "scripts" / "lmms_e2e.py"), "--out", str(tmp_path), "--n_images", "3"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert done.returncode == 0 and not summary["failures"], (
        summary["failures"],
        done.stdout[-3000:],
        done.stderr[-3000:],
    )
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"unpruned", "lvpruning", "fastv"} and summary["items"] == 6
    for r in rows.values():
        assert Path(r["results_json"]).is_file() and r["logged_samples"] == 6
        assert r["lmms_exact_match"] == r["evaluate_accuracy"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-q"]))
