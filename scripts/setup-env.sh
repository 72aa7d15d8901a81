#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv.
# Idempotent: does nothing when pyproject.toml and this script are unchanged since the last run.
# Why the steps are in this order: see docs/setup.md (torch from pip's local wheels first, then the
# PyPI `sam2` sdist built without its optional CUDA op, then the project).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EVF_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.evf-setup-stamp"
want=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch + torchvision of matching builds (torchvision is needed by sam2's SAM2ImagePredictor).
pip install -q "torch==2.14.1" "torchvision==0.29.1"
# sam2 1.1.0 is an sdist; skip its optional CUDA extension and build against the torch above.
SAM2_BUILD_CUDA=0 pip install -q --no-build-isolation "sam2==1.1.0"
# s3fs and moto resolved in one command, with botocore pinned where aiobotocore accepts it.
pip install -q -e ".[dev]" "boto3==1.43.117" "botocore==1.43.117"
echo "$want" > "$stamp"
echo "[setup] $VENV ready"
