"""A Hugging Face dataset brought in from the launchpad: written into the drop folder, where the drop sensor
registers it as a partition and starts the cleaning-and-training run, as for any dropped file."""

import dagster as dg
from pydantic import Field

from orpo_pipeline.data.hf_import import DatasetImportError, export_parquet
from resources import StorageResource


class HfDatasetConfig(dg.Config):
    dataset: str = Field(description="Hub id (needs internet), e.g. trl-lib/ultrafeedback_binarized, "
                                     "or a folder written by Dataset.save_to_disk.")
    split: str = Field("train", description="Which split to import.")
    config: str = Field("", description="The hub dataset's config (subset) name, if it has several.")


@dg.op
def export_hf_dataset(context: dg.OpExecutionContext, config: HfDatasetConfig, storage: StorageResource):
    """One split as a parquet file in the drop folder."""
    try:
        path, rows = export_parquet(config.dataset, config.split, config.config, storage.drop_path)
    except DatasetImportError as e:
        raise dg.Failure(str(e)) from e
    context.log.info(f"{rows:,} rows of {config.dataset} [{config.split}] written to {path}; "
                     "the drop sensor registers it and starts a run")
    return dg.Output(str(path), metadata={"rows": rows, "file": dg.MetadataValue.path(str(path))})


@dg.job(description="Import a Hugging Face dataset split (hub id or save_to_disk folder) into the drop folder; "
                    "the drop sensor then cleans it and retrains.")
def import_hf_dataset():
    export_hf_dataset()
