"""Dagster resources: compute runtime, MLflow tracking, artifact storage."""

from .compute import GpuResource
from .storage import StorageResource
from .tracking import MlflowResource

__all__ = ["GpuResource", "MlflowResource", "StorageResource"]
