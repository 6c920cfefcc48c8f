#!/usr/bin/env bash
# Set up, then materialize every asset on the embedded default (SmolLM2-135M-Instruct, shipped sample data).
# Options go to `orpo_pipeline.cli run`, e.g. --eval-data ../shared/data/benchmarks (lm-eval suites offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="$PWD/dagster_home" TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
start=$(date +%s)
.venv/bin/python -m orpo_pipeline.cli run "$@"
echo "orpo_training_job finished in $(( $(date +%s) - start )) s."
echo "Dagster UI: DAGSTER_HOME=$PWD/dagster_home .venv/bin/dagster dev -w workspace.yaml"
echo "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/state/mlflow.db"
