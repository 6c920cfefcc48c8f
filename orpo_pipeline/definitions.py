"""The Dagster code location: assets, checks, jobs, sensor, schedule and resources."""

import dagster as dg

from assets import benchmarks, champion, model, preferences
from assets.hf_import import import_hf_dataset
from assets.retraining import ingest_and_train_job, preference_drop_sensor, retrain_job, retrain_schedule
from resources import ComputeResource, MlflowResource, StorageResource
from resources.io_manager import ArtifactHandleIOManager

all_assets = dg.load_assets_from_modules([preferences, model, benchmarks, champion])
all_checks = dg.load_asset_checks_from_modules([preferences, model, champion])

STORAGE = StorageResource()

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[ingest_and_train_job, retrain_job, import_hf_dataset],
    sensors=[preference_drop_sensor],
    schedules=[retrain_schedule],
    resources={
        "storage": STORAGE,
        "compute": ComputeResource(),
        "mlflow_tracking": MlflowResource(),
        # asset outputs (small dicts of paths and digests) as JSON beside the artifacts, not pickles in dagster_home
        "io_manager": ArtifactHandleIOManager(storage=STORAGE),
    },
    # ML steps are sequential and heavy to import; one process avoids re-importing torch for every step
    executor=dg.in_process_executor,
)


def orpo_training_job() -> dg.JobDefinition:
    """The resolved job, for `dg.reconstructable` (the CLI's re-execution from failure needs a reconstructable job)."""
    return defs.resolve_job_def("orpo_training_job")
