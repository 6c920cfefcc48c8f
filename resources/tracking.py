"""MLflow tracking: one MLflow run per Dagster run, found again by its tag, never left RUNNING.

Several assets of one Dagster run share its MLflow run: each step resumes it (`active_run`) and ends it again when
the step ends, FINISHED or FAILED. A run whose process died while it was open stays RUNNING in the store; the next
Dagster run of the same instance finds it (its Dagster run is over) and marks it KILLED, and marks the LoggedModels
such runs left PENDING as FAILED.
"""


import os
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
from pydantic import Field, PrivateAttr

from .storage import PROJECT_ROOT, default_state_dir

RUN_TAG = "dagster.run_id"
INSTANCE_TAG = "dagster.instance"  # the Dagster instance's folder: orphans are judged only by their own instance
CHAMPION = "champion"
# MLflow 3's experiment kind: "custom_model_development" opens the experiment on its runs, not the GenAI overview
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
HEALTH_TIMEOUT_S = 5.0


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


class TrackingUnreachable(RuntimeError):
    pass


def check_tracking_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Fail within `timeout` seconds when an HTTP tracking server does not answer (MLflow's client would retry
    for minutes first). Any HTTP answer counts: the server is there."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} does not answer (GET /health within {timeout:g} s: {e}); start it, or set "
            "the mlflow_tracking resource's tracking_uri (empty: the SQLite store in the state folder)") from e


class MlflowResource(dg.ConfigurableResource):
    """Tracking server or local SQLite store, experiment and registered model name."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI, e.g. http://mlflow:5000. Empty: SQLite file in the state dir."
    )
    experiment_name: str = Field(default="orpo_pipeline", description="MLflow experiment every run is logged to.")
    registered_model_name: str = Field(default="orpo-pipeline-model", description="Registered model to add versions to.")
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Base URL of the MLflow UI, for links in Dagster.")
    state_dir: str = Field(default_factory=default_state_dir, description="Holds the default SQLite store and artifacts.")
    champion_tolerance: float = Field(
        default_factory=lambda: float(os.environ.get("ORPO_CHAMPION_TOLERANCE", "0")),
        description="A challenger takes the 'champion' alias unless its held-out preference accuracy is more than this "
        "below the champion's (negative: it must beat the champion by that much). Env ORPO_CHAMPION_TOLERANCE.",
    )
    _instance_dir: str = PrivateAttr(default="")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Once per run, before any step: a tracking server that does not answer fails the run now, in seconds;
        then runs and models orphaned by dead processes of this instance are closed."""
        check_tracking_server(self.resolved_uri)
        instance = context.instance
        if instance is None or context.dagster_run is None:
            return
        self._instance_dir = instance.root_directory or ""
        for message in self.close_orphans(instance):
            if context.log is not None:
                context.log.warning(message)

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
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # experiments made before the kind was set
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if not self.tracking_uri:
            location = (Path(self.state_dir).resolve() / "mlartifacts").as_uri()
        return client.create_experiment(self.experiment_name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})

    def run_id_for(self, dagster_run_id: str, asset: str) -> str:
        """The MLflow run of this Dagster run, created on first use (and ended at once: a step that logs into it
        resumes it with `active_run`); the asset is added to its tags."""
        client = self.client()
        exp = self.experiment_id()
        found = client.search_runs([exp], filter_string=f"tags.`{RUN_TAG}` = '{dagster_run_id}'", max_results=1)
        if found:
            run = found[0]
        else:
            tags = {RUN_TAG: dagster_run_id, "code_version": code_version(), "orchestrator": "dagster"}
            if self._instance_dir:
                tags[INSTANCE_TAG] = self._instance_dir
            run = client.create_run(exp, run_name=f"dagster-{dagster_run_id[:8]}", tags=tags)
            client.set_terminated(run.info.run_id, "FINISHED")
        assets = set(filter(None, run.data.tags.get("dagster.assets", "").split(",")))
        client.set_tag(run.info.run_id, "dagster.assets", ",".join(sorted(assets | {asset})))
        return run.info.run_id

    @contextmanager
    def active_run(self, context: dg.AssetExecutionContext) -> Iterator[str]:
        """Resume this Dagster run's MLflow run for the fluent API (mlflow.log_*) inside the block, and end it
        after: FAILED if the block raised or an earlier step of this run failed, else FINISHED."""
        import mlflow

        run_id = self.run_id_for(context.run.run_id, context.asset_key.to_user_string())
        failed_before = self.client().get_run(run_id).info.status == "FAILED"
        mlflow.start_run(run_id=run_id)
        status = "FAILED"
        try:
            yield run_id
            status = "FAILED" if failed_before else "FINISHED"
        finally:
            mlflow.end_run(status)

    def close_orphans(self, instance: dg.DagsterInstance) -> list[str]:
        """Mark KILLED every RUNNING MLflow run whose Dagster run (of this instance) is over or gone, and FAILED
        every PENDING LoggedModel of a run that is no longer RUNNING. Returns what was done, one line each."""
        from mlflow.entities import LoggedModelStatus

        client, exp, done = self.client(), self.experiment_id(), []
        here = instance.root_directory or ""
        for run in client.search_runs([exp], filter_string="attributes.status = 'RUNNING'", max_results=500):
            dagster_id, owner = run.data.tags.get(RUN_TAG), run.data.tags.get(INSTANCE_TAG)
            if not dagster_id or (owner is not None and owner != here):
                continue
            dagster_run = instance.get_run_by_id(dagster_id)
            if dagster_run is None and owner is None:
                continue  # a run of some other Dagster instance, from before runs were tagged with theirs
            if dagster_run is None or dagster_run.is_finished:
                state = "gone" if dagster_run is None else dagster_run.status.value
                client.set_tag(run.info.run_id, "orpo.orphaned",
                               f"Dagster run {dagster_id} is {state} but this run was still RUNNING: its process died")
                client.set_terminated(run.info.run_id, "KILLED")
                done.append(f"MLflow run {run.info.run_id} of Dagster run {dagster_id} ({state}) marked KILLED")
        page = None
        while True:
            models = client.search_logged_models([exp], max_results=100, page_token=page)
            for model in models:
                if model.status != LoggedModelStatus.PENDING or not model.source_run_id:
                    continue
                if client.get_run(model.source_run_id).info.status != "RUNNING":
                    client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                    done.append(f"LoggedModel {model.model_id} ({model.name}) of ended run {model.source_run_id} "
                                "was PENDING: marked FAILED")
            page = models.token
            if not page:
                return done

    def link_model_version(self, run_id: str, version: str) -> None:
        """Make the training run point at what it produced: the registered version and its LoggedModel (MLflow
        lists the model under "Logged models", not under the run's artifacts) as tags and in the run's description."""
        client = self.client()
        mv = client.get_model_version(self.registered_model_name, version)
        # the SQLite registry leaves model_id empty; the version's source is then models:/<model id>
        model_id = mv.model_id or (mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else "")
        client.set_tag(run_id, "registered_model_version", f"{self.registered_model_name}/{version}")
        if model_id:
            client.set_tag(run_id, "logged_model_id", model_id)
        lines = [f"Merged model: registered as [{self.registered_model_name} version {version}]"
                 f"({self.model_version_url(version)})"]
        if model_id:
            lines.append(f"LoggedModel [{model_id}]({self.logged_model_url(model_id)}) (the *Logged models* tab); "
                         f"weights at `models:/{model_id}`.")
        lines.append("The LoRA adapter, its card and the training curves are this run's `adapter/` artifacts.")
        client.set_tag(run_id, "mlflow.note.content", "\n\n".join(lines))

    def experiment_url(self) -> str:
        # the UI picks GenAI or model-training navigation from this parameter (else from the browser's last choice)
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id()}?workflowType=machine_learning"

    def run_url(self, run_id: str) -> str:
        return (f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id()}/runs/{run_id}"
                "?workflowType=machine_learning")

    def model_version_url(self, version: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/models/{self.registered_model_name}/versions/{version}"

    def logged_model_url(self, model_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id()}/models/{model_id}"

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
