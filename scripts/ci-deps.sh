#!/usr/bin/env bash
# System packages the test suite needs beyond the Python environment (scripts/setup-env.sh):
#   chromium   Debian's headless browser, driven by Playwright in tests/test_review.py
#              (Playwright never downloads a browser of its own here).
# Installs only what is missing; needs root (CI runs as root). Elsewhere it says what to install.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "[ci-deps] missing system packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "[ci-deps] installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
command -v chromium >/dev/null
