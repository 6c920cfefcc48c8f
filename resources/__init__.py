"""Dagster resources: compute runtime, MLflow tracking, artifact storage."""

from .compute import ComputeResource
from .storage import StorageResource
from .tracking import MlflowResource

__all__ = ["ComputeResource", "MlflowResource", "StorageResource"]
