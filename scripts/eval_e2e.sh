#!/usr/bin/env bash
# The lmms-eval end-to-end check (issue #13): builds/updates the eval environment, then runs the real
# lmms-eval CLI on a local digits task for the unpruned model, LVPruning and FastV and compares each
# score with `python -m lightning_lvp evaluate` on the same items (scripts/lmms_e2e.py; docs/EVAL.md).
#
#   scripts/eval_e2e.sh                       # runs/lmms_e2e, 20 grids (40 questions), + a 2-process run
#   scripts/eval_e2e.sh --n_images 4 --processes 1 --out /tmp/e2e
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-eval}"
VENV="$VENV" scripts/eval_env.sh
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" scripts/lmms_e2e.py --out runs/lmms_e2e --n_images 20 --processes 2 "$@"
