"""The training run's MLflow dataset inputs, with a schema and a profile that MLflow's "Datasets used" shows.

One input per preference file (its partition key, content digest, rows read / kept / rejected by reason) and one
for the tokenized dataset (rows per split, token-length statistics). Call inside an active MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

_ARROW_TO_MLFLOW = {"string": "string", "large_string": "string", "int64": "long", "int32": "integer",
                    "int8": "integer", "int16": "integer", "uint32": "long", "uint64": "long", "float": "float",
                    "double": "double", "bool": "boolean", "binary": "binary"}


class ProfiledDataset(MetaDataset):
    """A dataset known by its source, digest and schema (MLflow reads no rows), plus a profile we computed."""

    def __init__(self, source, name: str, digest: str, schema: Schema | None, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def arrow_schema(schema) -> Schema:
    """A pyarrow schema as MLflow column specs (lists and structs as 'any': MLflow's UI shows their name)."""
    cols = []
    for field in schema:
        kind = _ARROW_TO_MLFLOW.get(str(field.type))
        cols.append(ColSpec(kind if kind else AnyType(), field.name))
    return Schema(cols)


def _length_stats(values) -> dict:
    import numpy as np

    a = np.asarray(values)
    if not a.size:
        return {"min": 0, "mean": 0, "p50": 0, "p95": 0, "max": 0}
    return {"min": int(a.min()), "mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)),
            "p95": int(np.percentile(a, 95)), "max": int(a.max())}


def file_input(source: dict, cleaned_dir: Path) -> ProfiledDataset:
    """One registered preference file: schema of its cleaned pairs, profile of its row accounting."""
    import pyarrow.parquet as pq

    summary_path = cleaned_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    reasons = {k: v for k, v in (summary.get("reasons") or {}).items() if v}
    rows_in, kept = summary.get("rows_in"), summary.get("kept")
    profile = {"file": source["name"], "partition_key": source["partition_key"], "file_sha256": source["digest"],
               "rows_in": rows_in, "kept": kept,
               "rejected": rows_in - kept if rows_in is not None and kept is not None else None,
               "rejected_by_reason": reasons}
    train = cleaned_dir / "train.parquet"
    schema = arrow_schema(pq.read_schema(train)) if train.is_file() else None
    return ProfiledDataset(LocalArtifactDatasetSource(source["path"]), name=source["name"],
                           digest=source["digest"][:32], schema=schema, profile=profile)


def tokenized_input(tokenized: dict) -> ProfiledDataset:
    """The tokenized dataset: schema of its train split, rows per split, token lengths after truncation."""
    import datasets

    splits = datasets.load_from_disk(tokenized["dir"])
    profile: dict = {"rows": {s: len(d) for s, d in splits.items()}, "max_length": tokenized.get("max_length")}
    for column in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        if column in splits["train"].column_names:
            profile[f"train_{column}"] = _length_stats(splits["train"][column])
    return ProfiledDataset(LocalArtifactDatasetSource(tokenized["dir"]), name="tokenized_dataset",
                           digest=tokenized["digest"], schema=arrow_schema(splits["train"].data.schema),
                           profile=profile)


def log_training_inputs(tokenized: dict, cleaned_dir_of) -> None:
    """Log every preference file and the tokenized dataset as inputs of the active run ("Datasets used").

    `cleaned_dir_of(partition_key)` is the folder of that file's cleaned partition. The per-file tags are also
    in each input's profile, which is what the dataset panel of the run page shows."""
    for src in tokenized["sources"]:
        mlflow.log_input(file_input(src, Path(cleaned_dir_of(src["partition_key"]))), context="training",
                         tags={"dagster.partition_key": src["partition_key"], "file_sha256": src["digest"]})
    mlflow.log_input(tokenized_input(tokenized), context="training")
