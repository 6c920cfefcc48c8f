"""Test harness: the real orpo_adapter asset in a job run by the multiprocess executor (one process per step).

    python -m tests.dagster_resume_job run_config.json    # executes the job in the instance at $DAGSTER_HOME

Its upstream assets hand orpo_adapter a prepared tokenized dataset and the tiny model (paths from the
environment, RESUME_TEST_TOKENIZED and RESUME_TEST_MODEL); storage and MLflow live under RESUME_TEST_STATE.
"""

import json
import os
import sys
from pathlib import Path

import dagster as dg

from assets.model import orpo_adapter
from resources import ComputeResource, MlflowResource, StorageResource


@dg.asset(name="tokenized_dataset")
def tokenized_dataset() -> dict:
    return {"dir": os.environ["RESUME_TEST_TOKENIZED"], "max_length": 128, "sources": [], "cleaned_digest": "c0",
            "digest": "tokenized-test-digest", "chat_template": ""}


@dg.asset(name="base_model")
def base_model() -> dict:
    return {"path": os.environ["RESUME_TEST_MODEL"], "name": "tiny-random-llama"}


def get_job() -> dg.JobDefinition:
    state = Path(os.environ["RESUME_TEST_STATE"])
    defs = dg.Definitions(
        assets=[tokenized_dataset, base_model, orpo_adapter],
        jobs=[dg.define_asset_job("resume_job", executor_def=dg.multiprocess_executor)],
        resources={"storage": StorageResource(root=str(state)), "compute": ComputeResource(device="cpu"),
                   # no tracking_uri: the SQLite store and the artifacts both live under the state folder
                   "mlflow_tracking": MlflowResource(state_dir=str(state))},
    )
    return defs.resolve_job_def("resume_job")


if __name__ == "__main__":
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(get_job), instance=instance,
                                run_config=json.loads(Path(sys.argv[1]).read_text()))
        print(json.dumps({"run_id": result.run_id, "success": result.success}))
