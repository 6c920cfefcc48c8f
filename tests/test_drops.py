"""Drop-folder registration, the retrain schedule's skip rule and the champion decision, on a real instance."""

import os
import time

import dagster as dg
import pytest

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


def test_links_fifos_and_empty_files_are_refused_with_their_reason(tmp_path):
    """A link could point anywhere (/etc/passwd), reading a FIFO would block forever, and every empty file has the
    same content key: none of them becomes a partition, each is named with its reason."""
    import subprocess
    import sys

    drop, store = tmp_path / "drops", tmp_path / "store"
    drop.mkdir()
    (drop / "passwd.jsonl").symlink_to("/etc/passwd")
    os.mkfifo(drop / "pipe.jsonl")
    (drop / "empty.jsonl").write_bytes(b"")
    (drop / "empty.csv").write_bytes(b"")
    (tmp_path / "real.jsonl").write_bytes((SAMPLE_DATA_DIR / "factual.jsonl").read_bytes())
    (drop / "linked.jsonl").symlink_to(tmp_path / "real.jsonl")
    with dg.instance_for_test() as instance:
        refused: list[str] = []
        sources, new = register_files(instance, drops.candidate_files(drop), store, refused=refused)
        assert sources == [] and new == [] and registered_keys(instance) == []
        reasons = dict(zip(sorted(p.name for p in drop.iterdir()), sorted(refused)))
        assert "empty file (0 bytes)" in reasons["empty.csv"] and "empty file (0 bytes)" in reasons["empty.jsonl"]
        assert "a symbolic link (to /etc/passwd)" in reasons["passwd.jsonl"]
        assert "not a regular file (FIFO)" in reasons["pipe.jsonl"]
        with pytest.raises(drops.SourceRefused, match="symbolic link"):
            register_files(instance, [drop / "passwd.jsonl"], store)
        _, new = register_files(instance, [drop / "linked.jsonl"], store, allow_symlinks=True)  # the opt-in
        assert len(new) == 1 and drops.load_source(store, new[0]).path.read_bytes() == (tmp_path / "real.jsonl").read_bytes()
    # `cli register` on a FIFO ends at once with the reason (it used to block forever)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "ORPO_PIPELINE_HOME": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "orpo_pipeline.cli", "register", str(drop / "pipe.jsonl")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a regular file (FIFO)" in done.stderr


def test_each_partition_carries_its_own_files_counts_and_name(tmp_path):
    """Per partition, the materialization event holds that file's counts (not the run's totals) and its name."""
    from assets.partitions import range_tags
    from assets.preferences import cleaned_preferences, raw_preferences
    from resources import MlflowResource

    storage = StorageResource(root=str(tmp_path / "state"))
    resources = {"storage": storage, "mlflow_tracking": MlflowResource(state_dir=str(tmp_path / "state"))}
    (tmp_path / "none.json").write_text("[]")
    files = [SAMPLE_DATA_DIR / "factual.jsonl", SAMPLE_DATA_DIR / "dirty.jsonl", tmp_path / "none.json"]
    with dg.instance_for_test() as instance:
        _, keys = register_files(instance, files, storage.sources_path)
        run = dg.materialize([raw_preferences, cleaned_preferences], resources=resources, instance=instance,
                             tags=range_tags(keys))
        assert run.success

        def metadata(asset, key):
            [record] = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=asset.key, asset_partitions=[key]), limit=10).records
            return {k: v.value for k, v in record.asset_materialization.metadata.items()}

        for key, path in zip(keys, files):
            lines = [line for line in path.read_text().splitlines() if line.strip()] if path.suffix == ".jsonl" else []
            raw, cleaned = metadata(raw_preferences, key), metadata(cleaned_preferences, key)
            assert raw["file_name"] == cleaned["file_name"] == path.name
            assert raw["rows"] == cleaned["rows_in"] == len(lines)
            assert cleaned["kept"] + cleaned["rejected"] == len(lines)
            assert cleaned["train_pairs"] + cleaned["eval_pairs"] == cleaned["kept"]
        dirty = metadata(cleaned_preferences, keys[1])
        assert dirty["rejected_by_reason"]["unparseable"] == 3 and dirty["rejected"] == 9
        assert "holds no records" in metadata(raw_preferences, keys[2])["warning"]
        assert "warning" not in metadata(raw_preferences, keys[0])


def test_the_sensor_says_which_files_it_refused(tmp_path):
    storage = StorageResource(root=str(tmp_path / "state"))
    storage.drop_path.mkdir(parents=True)
    (storage.drop_path / "passwd.jsonl").symlink_to("/etc/passwd")
    old = time.time() - 60
    os.utime(storage.drop_path / "passwd.jsonl", (old, old), follow_symlinks=False)
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        preference_drop_sensor(ctx)  # first sighting
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor, resources={"storage": storage})
        skip = preference_drop_sensor(ctx)
        assert isinstance(skip, dg.SkipReason) and "not registered" in skip.skip_message
        assert "a symbolic link (to /etc/passwd)" in skip.skip_message and registered_keys(instance) == []
