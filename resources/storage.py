"""Where large artifacts live: one folder per asset and Dagster run, written atomically."""


import os
from pathlib import Path

import dagster as dg
from pydantic import Field

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
