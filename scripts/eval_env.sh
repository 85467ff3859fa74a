#!/usr/bin/env bash
# Builds the SECOND environment for lmms-eval (issue #13): .venv-eval (~7 GB) with torch 2.14.1 +
# torchvision 0.29.1 (lmms-eval needs torchvision; none fits the main env's torch 2.13 CPU build),
# lmms-eval 0.7.3 and this package with its `eval` extra. torch is pinned again in every pip call
# so that no resolver step moves it. Idempotent: an existing venv is reused.
#
#   scripts/eval_env.sh            # build / update .venv-eval
#   VENV=/path/to/venv scripts/eval_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-eval}"
PY="${PYTHON:-python3}"
PINS=(torch==2.14.1 torchvision==0.29.1)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "${PINS[@]}"
"$VENV/bin/pip" install -q -e ".[eval]" "${PINS[@]}"
"$VENV/bin/python" -c "import lmms_eval, torch, torchvision, filelock; print('eval env ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'filelock', filelock.__version__)"
