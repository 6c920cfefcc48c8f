"""One Dagster run of champion_promotion (and its check) for one registered version, for the concurrency test.

    python -m tests.promotion_run VERSION SCORE MLFLOW_RUN_ID BARRIER_DIR N

The upstream scores are what benchmark_scores / lm_eval_scores would have handed on for that version (the test
registered it and tagged its score); promotion, pool, IO manager, instance and registry are the real ones.
Waits until N workers are ready, so the runs decide at the same time.
"""

import sys
import time
from pathlib import Path

import dagster as dg

from assets.champion import champion_alias_matches_decision, champion_promotion
from resources import MlflowResource, StorageResource
from resources.io_manager import ArtifactHandleIOManager

DIGEST = "same-settings"


def main() -> int:
    version, score, run_id, barrier, n = sys.argv[1], float(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])

    @dg.asset(name="benchmark_scores")
    def benchmark_scores() -> dict:
        return {"tuned": {"preference_accuracy": score}, "settings_digest": DIGEST, "model_version": version,
                "mlflow_run_id": run_id, "champion_version": None}

    @dg.asset(name="lm_eval_scores")
    def lm_eval_scores() -> dict:
        return {"scores": {"tuned": {}, "base": {}}, "skipped": {}, "settings_digest": DIGEST}

    storage = StorageResource()
    resources = {"storage": storage, "io_manager": ArtifactHandleIOManager(storage=storage),
                 "mlflow_tracking": MlflowResource(registered_model_name="promotion-test")}
    (barrier / version).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([benchmark_scores, lm_eval_scores, champion_promotion, champion_alias_matches_decision],
                                resources=resources, instance=instance, tags={"test.version": version})
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
