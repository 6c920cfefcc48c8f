"""MLflow tracking: one MLflow run per Dagster run, found again by its tag."""


import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
from pydantic import Field

from .storage import PROJECT_ROOT, default_state_dir

RUN_TAG = "dagster.run_id"
CHAMPION = "champion"


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    if sha:
        return sha
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orpo_pipeline")
    except PackageNotFoundError:
        return "unknown"


class MlflowResource(dg.ConfigurableResource):
    """Tracking server or local SQLite store, experiment and registered model name."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI, e.g. http://mlflow:5000. Empty: SQLite file in the state dir."
    )
    experiment_name: str = "orpo_pipeline"
    registered_model_name: str = Field(default="orpo-pipeline-model", description="Registered model to add versions to.")
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Base URL of the MLflow UI, for links in Dagster.")
    state_dir: str = Field(default_factory=default_state_dir, description="Holds the default SQLite store and artifacts.")
    champion_tolerance: float = Field(
        default_factory=lambda: float(os.environ.get("ORPO_CHAMPION_TOLERANCE", "0")),
        description="A challenger takes the 'champion' alias unless its held-out preference accuracy is more than this "
        "below the champion's (negative: it must beat the champion by that much). Env ORPO_CHAMPION_TOLERANCE.",
    )

    @property
    def resolved_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{Path(self.state_dir).resolve() / 'mlflow.db'}"

    def client(self):
        import mlflow

        mlflow.set_tracking_uri(self.resolved_uri)
        mlflow.set_registry_uri(self.resolved_uri)
        return mlflow.MlflowClient(tracking_uri=self.resolved_uri, registry_uri=self.resolved_uri)

    def experiment_id(self) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if not self.tracking_uri:
            location = (Path(self.state_dir).resolve() / "mlartifacts").as_uri()
        return client.create_experiment(self.experiment_name, artifact_location=location)

    def run_id_for(self, dagster_run_id: str, asset: str) -> str:
        """The MLflow run of this Dagster run, created on first use; the asset is added to its tags."""
        client = self.client()
        exp = self.experiment_id()
        found = client.search_runs([exp], filter_string=f"tags.`{RUN_TAG}` = '{dagster_run_id}'", max_results=1)
        if found:
            run = found[0]
        else:
            run = client.create_run(
                exp,
                run_name=f"dagster-{dagster_run_id[:8]}",
                tags={RUN_TAG: dagster_run_id, "code_version": code_version(), "orchestrator": "dagster"},
            )
        assets = set(filter(None, run.data.tags.get("dagster.assets", "").split(",")))
        client.set_tag(run.info.run_id, "dagster.assets", ",".join(sorted(assets | {asset})))
        return run.info.run_id

    @contextmanager
    def active_run(self, context: dg.AssetExecutionContext) -> Iterator[str]:
        """Resume this Dagster run's MLflow run for the fluent API (mlflow.log_*) inside the block."""
        import mlflow

        run_id = self.run_id_for(context.run.run_id, context.asset_key.to_user_string())
        with mlflow.start_run(run_id=run_id):
            yield run_id

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id()}/runs/{run_id}"

    def model_version_url(self, version: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/models/{self.registered_model_name}/versions/{version}"

    def champion(self):
        """The model version holding the 'champion' alias, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(self.registered_model_name, CHAMPION)
        except MlflowException:
            return None

    def model_dir_of(self, version) -> Path:
        """Local folder of a registered version's merged weights (downloaded if it is not on this machine)."""
        local = version.tags.get("merged_dir")
        if local and (Path(local) / "config.json").is_file():
            return Path(local)
        import mlflow

        self.client()
        root = Path(mlflow.artifacts.download_artifacts(f"models:/{self.registered_model_name}/{version.version}"))
        return root / "artifacts" / "model"
