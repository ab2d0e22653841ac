#!/usr/bin/env bash
# Set up lmforge in a virtual environment (.venv) with its test dependencies.
#   bash scripts/setup.sh            # creates .venv, installs torch (CPU build when no GPU), lmforge[test]
#   PYTHON=python3.12 bash scripts/setup.sh
# An already-installed torch is kept: pip only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] GPU found: installing the default (CUDA) torch build"
        $PIP install -q "torch>=2.5"
    else
        # No GPU: take the CPU build. A local wheel of it (a +cpu local version) is tried first;
        # elsewhere the CPU wheel index of PyTorch serves it.
        echo "[setup] no GPU: installing the CPU build of torch"
        $PIP install -q "torch==2.13.0+cpu" 2>/dev/null \
            || $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
$PIP install -q -e ".[test]"
"$VENV/bin/python" -c "import torch, lmforge; print(f'[setup] lmforge {lmforge.__version__} with torch {torch.__version__}')"
echo "[setup] done: run 'source $VENV/bin/activate'"
