"""Where large artifacts live: one folder per asset and Dagster run, written atomically."""


import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from orpo_pipeline.config import check_run_config
from orpo_pipeline.storage import sweep_dead_temp

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_state_dir() -> str:
    return os.environ.get("ORPO_PIPELINE_HOME", str(PROJECT_ROOT / "state"))


class StorageResource(dg.ConfigurableResource):
    """Root folder for artifacts, the model cache and the default MLflow store."""

    root: str = Field(default_factory=default_state_dir, description="State directory (env ORPO_PIPELINE_HOME).")
    drop_dir: str = Field(default="", description="Folder watched for new preference files. Empty: <root>/drops.")
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
