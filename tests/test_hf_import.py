"""A Hugging Face dataset (a save_to_disk folder here; a hub id takes the same path once downloaded) goes into the
drop folder through the Dagster job, and from there into a partition, like a dropped file."""

import time

import dagster as dg
import datasets
import polars as pl
import pytest

from assets.retraining import preference_drop_sensor
from orpo_pipeline.definitions import defs
from orpo_pipeline.data.hf_import import DatasetImportError, export_parquet, file_name
from orpo_pipeline.data.ingest import iter_file_tables
from resources import StorageResource

from .conftest import ULTRAFEEDBACK


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    """The shared UltraFeedback sample as a DatasetDict on disk, scores and message lists included."""
    folder = tmp_path_factory.mktemp("hf") / "ultrafeedback_sample"
    records = pl.read_ndjson(ULTRAFEEDBACK).to_dicts()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:600]),
                          "test": datasets.Dataset.from_list(records[600:])}).save_to_disk(str(folder))
    return folder, records


def test_a_saved_split_reads_as_the_jsonl_it_came_from(saved_dataset, tmp_path):
    folder, records = saved_dataset
    path, rows = export_parquet(str(folder), "test", "", tmp_path)
    assert path.name == "ultrafeedback_sample-test.parquet" and rows == len(records) - 600
    got = pl.concat(iter_file_tables(path, "x"))
    expected = pl.concat(iter_file_tables(ULTRAFEEDBACK, "x")).slice(600)
    assert got["format"].unique().to_list() == ["ultrafeedback"]
    assert got.drop("source_row").equals(expected.drop("source_row"))


def test_a_missing_split_or_folder_says_what_there_is(saved_dataset, tmp_path):
    folder, _ = saved_dataset
    with pytest.raises(DatasetImportError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        export_parquet(str(folder), "validation", "", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetImportError, match="not a folder written by Dataset.save_to_disk"):
        export_parquet(str(tmp_path / "empty"), "train", "", tmp_path)
    with pytest.raises(DatasetImportError, match="no such folder"):
        export_parquet(str(tmp_path / "missing"), "train", "", tmp_path)
    # the hub path, as far as this machine can follow it (the tests run with HF_HUB_OFFLINE=1)
    with pytest.raises(DatasetImportError, match="trl-lib/ultrafeedback_binarized: Couldn't reach"):
        export_parquet("trl-lib/ultrafeedback_binarized", "train", "", tmp_path)
    assert not list(tmp_path.glob("*.parquet"))


def test_hub_ids_name_their_file_by_id_config_and_split():
    assert file_name("trl-lib/ultrafeedback_binarized", "train") == "trl-lib__ultrafeedback_binarized-train.parquet"
    assert file_name("Anthropic/hh-rlhf", "test", "harmless base") == "Anthropic__hh-rlhf-harmless_base-test.parquet"


def test_the_import_job_drops_the_file_and_the_sensor_makes_it_a_partition(saved_dataset, tmp_path):
    folder, _ = saved_dataset
    storage = StorageResource(root=str(tmp_path / "state"))
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("import_hf_dataset").execute_in_process(
            run_config={"ops": {"export_hf_dataset": {"config": {"dataset": str(folder), "split": "train"}}}},
            instance=instance, resources={"storage": storage})
        assert result.success
        dropped = storage.drop_path / "ultrafeedback_sample-train.parquet"
        assert result.output_for_node("export_hf_dataset") == str(dropped)
        assert pl.read_parquet(dropped).height == 600
        # the sensor needs two scans that see the same size and mtime
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        preference_drop_sensor(ctx)
        time.sleep(2.1)
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor, resources={"storage": storage})
        run = preference_drop_sensor(ctx)
        assert len(run.run_requests) == 1
        keys = instance.get_dynamic_partitions("preference_files")
        assert len(keys) == 1 and run.run_requests[0].tags["dagster/asset_partition_range_start"] == keys[0]

        failed = defs.resolve_job_def("import_hf_dataset").execute_in_process(
            run_config={"ops": {"export_hf_dataset": {"config": {"dataset": str(folder), "split": "nope"}}}},
            instance=instance, resources={"storage": storage}, raise_on_error=False)
        assert not failed.success
        error = failed.failure_data_for_node("export_hf_dataset").error
        assert "no split 'nope'; it has ['test', 'train']" in error.message
