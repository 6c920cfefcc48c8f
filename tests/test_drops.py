"""Drop-folder registration, the retrain schedule's skip rule and the champion decision, on a real instance."""

import os
import time

import dagster as dg

from assets.champion import decide
from assets.partitions import register_files, registered_keys
from assets.retraining import preference_drop_sensor, retrain_schedule
from orpo_pipeline.data import drops
from orpo_pipeline.config import SAMPLE_DATA_DIR
from resources import StorageResource


def test_a_file_is_picked_up_only_once_settled(tmp_path):
    f = tmp_path / "new.jsonl"
    f.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    ready, stats = drops.settled_files(tmp_path, {}, settle_seconds=0)
    assert ready == []  # first sighting: no previous size to compare
    ready, stats = drops.settled_files(tmp_path, stats, settle_seconds=0)
    assert ready == [f]
    with open(f, "a") as out:  # still being written
        out.write('{"prompt": "p2", "chosen": "c", "rejected": "r"}\n')
    ready, _ = drops.settled_files(tmp_path, stats, settle_seconds=0)
    assert ready == []
    ready, _ = drops.settled_files(tmp_path, {str(f): [f.stat().st_size, f.stat().st_mtime]}, settle_seconds=3600)
    assert ready == []  # too recent


def test_same_content_under_another_name_is_not_new(tmp_path):
    store = tmp_path / "store"
    a = tmp_path / "a.jsonl"
    a.write_bytes((SAMPLE_DATA_DIR / "factual.jsonl").read_bytes())
    b = tmp_path / "renamed.jsonl"
    b.write_bytes(a.read_bytes())
    with dg.instance_for_test() as instance:
        _, first = register_files(instance, [a], store)
        _, second = register_files(instance, [b], store)
        assert len(first) == 1 and second == []
        assert registered_keys(instance) == first
        src = drops.load_source(store, first[0])
        assert src.name == "a.jsonl" and src.path.read_bytes() == a.read_bytes()


def test_sensor_adds_partitions_and_requests_one_run(tmp_path):
    storage = StorageResource(root=str(tmp_path / "state"))
    storage.drop_path.mkdir(parents=True)
    for name in ("factual.jsonl", "safety.json"):
        (storage.drop_path / name).write_bytes((SAMPLE_DATA_DIR / name).read_bytes())
        old = time.time() - 60
        os.utime(storage.drop_path / name, (old, old))
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        first = preference_drop_sensor(ctx)
        assert isinstance(first, dg.SkipReason)  # sizes seen once; they must hold still for a tick
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor, resources={"storage": storage})
        result = preference_drop_sensor(ctx)
        keys = registered_keys(instance)
        assert len(keys) == 2 and len(result.run_requests) == 1
        tags = result.run_requests[0].tags
        assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == (keys[0], keys[1])
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor, resources={"storage": storage})
        assert isinstance(preference_drop_sensor(ctx), dg.SkipReason)  # nothing new


def test_schedule_skips_without_new_data():
    with dg.instance_for_test() as instance:
        ctx = dg.build_schedule_context(instance=instance)
        skip = retrain_schedule(ctx)
        assert isinstance(skip, dg.SkipReason) and "no cleaned preference data" in skip.skip_message
        instance.report_runless_asset_event(dg.AssetMaterialization("orpo_adapter"))
        time.sleep(0.01)
        instance.report_runless_asset_event(dg.AssetMaterialization("cleaned_preferences"))
        assert isinstance(retrain_schedule(dg.build_schedule_context(instance=instance)), dg.RunRequest)
        time.sleep(0.01)
        instance.report_runless_asset_event(dg.AssetMaterialization("orpo_adapter"))
        skip = retrain_schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(skip, dg.SkipReason) and "since the last trained model" in skip.skip_message


def test_champion_decision():
    assert decide(0.6, None, 0.0)[0]  # the first model ever becomes champion
    assert decide(0.70, 0.70, 0.0)[0]  # not worse: promoted
    assert decide(0.69, 0.70, 0.02)[0]  # within tolerance
    promote, why = decide(0.65, 0.70, 0.02)
    assert not promote and "champion kept" in why
    assert not decide(0.99, 0.70, -1.0)[0]  # tolerance -1: must beat the champion by 1.0
