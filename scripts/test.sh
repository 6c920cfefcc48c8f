#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; reads real data from ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
