"""The Dagster code location: assets, checks, resources and the end-to-end job."""

import dagster as dg

from assets import model, preferences
from resources import GpuResource, MlflowResource, StorageResource

all_assets = dg.load_assets_from_modules([preferences, model])
all_checks = dg.load_asset_checks_from_modules([preferences, model])

orpo_training_job = dg.define_asset_job(
    "orpo_training_job",
    selection=dg.AssetSelection.all(),
    description="Preference files to a benchmarked, registered ORPO model.",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[orpo_training_job],
    resources={
        "storage": StorageResource(),
        "gpu": GpuResource(),
        "mlflow_tracking": MlflowResource(),
    },
)
