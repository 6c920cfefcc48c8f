"""Where large artifacts live: one folder per asset and Dagster run, written atomically."""


import os
import re
import shutil
from pathlib import Path

import dagster as dg
from pydantic import Field

from orpo_pipeline.config import check_run_config
from orpo_pipeline.storage import sweep_dead_temp

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# assets whose artifact is a folder per Dagster run: <root>/artifacts/<asset>/<run id>/
RUN_FOLDER_ASSETS = ("tokenized_dataset", "orpo_adapter", "merged_model", "lm_eval_scores")


def default_state_dir() -> str:
    return os.environ.get("ORPO_PIPELINE_HOME", str(PROJECT_ROOT / "state"))


class StorageResource(dg.ConfigurableResource):
    """Root folder for artifacts, the model cache and the default MLflow store."""

    root: str = Field(default_factory=default_state_dir, description="State directory (env ORPO_PIPELINE_HOME).")
    drop_dir: str = Field(default="", description="Folder watched for new preference files. Empty: drops/ under root.")
    allow_symlinks: bool = Field(default=False, description="Register preference files that are symbolic links "
                                 "(in the drop folder, --data-dir or `cli register`); refused by default, since a "
                                 "link can point anywhere (/etc/passwd).")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Once per run, before its first step: check the whole run config, then sweep what crashed writers left.

        Dagster's run-config schema has no numeric bounds nor cross-field rules, so without this an invalid
        orpo_adapter config would only be found after cleaning and tokenizing."""
        run = context.dagster_run
        if run is not None:
            check_run_config((run.run_config or {}).get("ops", {}))
        if self.root_path.is_dir():
            for path in sweep_dead_temp(self.root_path):
                if context.log is not None:
                    context.log.warning(f"removed {path}: left by a writer that is gone (a crash mid-write)")
            for path in self.sweep_unmaterialized(context.instance) if context.instance is not None else []:
                if context.log is not None:
                    context.log.warning(f"removed {path}: written by a run that ended before materializing it "
                                        "(killed between writing the folder and recording it)")

    def sweep_unmaterialized(self, instance: dg.DagsterInstance) -> list[Path]:
        """Remove artifact folders of failed runs that never recorded the asset (a merged model written, then
        the process killed while registering it): nothing points at them, and a re-execution writes its own."""
        removed = []
        for asset in RUN_FOLDER_ASSETS:
            folder = self.root_path / "artifacts" / asset
            for entry in (folder.iterdir() if folder.is_dir() else []):
                run = instance.get_run_by_id(entry.name) if RUN_ID.match(entry.name) and entry.is_dir() else None
                if run is None or run.status != dg.DagsterRunStatus.FAILURE:
                    continue
                records = instance.get_records_for_run(
                    entry.name, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
                if not any(r.event_log_entry.dagster_event.asset_key == dg.AssetKey(asset) for r in records):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        return removed

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def artifact_dir(self, asset: str, version: str) -> Path:
        return self.root_path / "artifacts" / asset / version

    def partition_dir(self, asset: str, partition_key: str) -> Path:
        return self.root_path / "artifacts" / asset / "partitions" / partition_key

    @property
    def model_cache(self) -> Path:
        return self.root_path / "models"

    @property
    def drop_path(self) -> Path:
        return Path(self.drop_dir).expanduser().resolve() if self.drop_dir else self.root_path / "drops"

    @property
    def sources_path(self) -> Path:
        """Content-addressed copies of every registered preference file (one folder per partition key)."""
        return self.root_path / "sources"
