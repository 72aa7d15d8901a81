#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv.
# Idempotent: does nothing when pyproject.toml and this script are unchanged since the last run.
# Why the steps are in this order: see docs/setup.md (torch from pip's local wheels first, then the
# PyPI `sam2` sdist built without its optional CUDA op, then the project).
# Prints one line per step; pip's own output goes to $VENV/setup.log, whose last lines are printed
# when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EVF_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.evf-setup-stamp"
want=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
log="$VENV/setup.log"
if [ -x "$VENV/bin/python" ]; then
  echo "[setup] updating $VENV (pyproject.toml or scripts/setup-env.sh changed); pip's output: $log"
else
  echo "[setup] creating $VENV (first run takes a few minutes); pip's output: $log"
fi
mkdir -p "$VENV"
: > "$log"

# step DESCRIPTION COMMAND...: runs COMMAND with its output appended to the log, on one line of ours.
step() {
  local what=$1 t0=$SECONDS
  shift
  printf '[setup] %s ... ' "$what"
  echo "== $what: $*" >> "$log"
  if "$@" >> "$log" 2>&1; then
    echo "done ($((SECONDS - t0)) s)"
  else
    local rc=$?
    echo "failed"
    {
      echo "[setup] last 30 lines of $log:"
      tail -n 30 "$log"
      echo "[setup] step failed (exit $rc): $what; full log: $log"
    } >&2
    exit "$rc"
  fi
}
pip_install() { "$VENV/bin/python" -m pip install --progress-bar off "$@"; }

[ -x "$VENV/bin/python" ] || step "python venv ($PY)" "$PY" -m venv "$VENV"
step "pip, setuptools, wheel" pip_install --upgrade pip setuptools wheel
# torch + torchvision of matching builds (torchvision is needed by sam2's SAM2ImagePredictor).
step "torch 2.14.1 + torchvision 0.29.1" pip_install "torch==2.14.1" "torchvision==0.29.1"
# sam2 1.1.0 is an sdist; skip its optional CUDA extension and build against the torch above.
SAM2_BUILD_CUDA=0 step "sam2 1.1.0 (built without its CUDA op)" pip_install --no-build-isolation "sam2==1.1.0"
# s3fs and moto resolved in one command, with botocore pinned where aiobotocore accepts it.
step "evf-sam (editable, with the dev extra)" \
  pip_install -e ".[dev]" "boto3==1.43.117" "botocore==1.43.117"
echo "$want" > "$stamp"
echo "[setup] $VENV ready (log: $log)"
