#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; reads real data from ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser smoke test (tests/test_ui.py) drives Debian's chromium headless; it skips, saying so, where none is.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "chromium could not be installed: the browser smoke test will be skipped" >&2
fi
export TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
