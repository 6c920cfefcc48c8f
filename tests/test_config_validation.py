"""Every launchpad field is described, and a bad config is refused when the run starts, before any step runs."""

import os
import socket
import time
from pathlib import Path

import dagster as dg
import pytest

from orpo_pipeline.definitions import defs
from orpo_pipeline.models.base import BaseModelError, resolve_base_model
from resources import MlflowResource, StorageResource


def _fields(config_type, prefix=""):
    """(dotted name, Field) of every field of a Dagster config type, nested shapes included."""
    for name, field in (getattr(config_type, "fields", None) or {}).items():
        yield prefix + name, field
        yield from _fields(field.config_type, f"{prefix}{name}.")


def _schemas():
    repo = defs.get_repository_def()
    for asset in repo.assets_defs_by_key.values():
        if asset.op.config_schema:
            yield f"asset {asset.key.to_user_string()}", asset.op.config_schema
    for check in repo.asset_checks_defs_by_key.values():
        if check.node_def.config_schema:
            yield f"check {check.node_def.name}", check.node_def.config_schema
    for key, resource in repo.get_top_level_resources().items():
        if resource.config_schema:
            yield f"resource {key}", resource.config_schema


def test_every_config_field_a_user_can_set_has_a_description():
    seen, missing = 0, []
    for owner, schema in _schemas():
        for name, field in _fields(schema.as_field().config_type):
            seen += 1
            if not (field.description or "").strip():
                missing.append(f"{owner}: {name}")
    assert seen > 50  # the walk reached the fields (orpo_adapter alone has 25)
    assert not missing, "fields without a description:\n" + "\n".join(missing)


def test_each_preference_asset_shows_only_the_fields_it_reads():
    repo = defs.get_repository_def()
    fields = {a.key.to_user_string(): set(getattr(a.op.config_schema.as_field().config_type, "fields", {}))
              for a in repo.assets_defs_by_key.values() if a.op.config_schema}
    assert fields["raw_preferences"] == {"format", "column_mapping", "batch_rows", "max_record_bytes"}
    assert fields["cleaned_preferences"] == {"eval_fraction", "min_score_margin", "batch_rows", "max_pair_chars"}


def _errors(instance, run_id) -> str:
    """Every error the run's events carry, as the run page shows them."""
    out = []
    for entry in instance.all_logs(run_id):
        error = getattr(entry.dagster_event.event_specific_data, "error", None) if entry.dagster_event else None
        if error is not None:
            out.append(str(error))
    return "\n".join(out)


def _resources(state: Path, **tracking) -> dict:
    return {"storage": StorageResource(root=str(state)),
            "mlflow_tracking": MlflowResource(state_dir=str(state), **tracking)}


def test_an_invalid_training_config_fails_the_run_before_any_step(tmp_path):
    from assets.partitions import range_tags
    from orpo_pipeline.definitions import all_assets

    bad = {"ops": {"orpo_adapter": {"config": {"learning_rate": -0.1, "lora_r": 0, "beta": -1.0}},
                   "tokenized_dataset": {"config": {"max_length": 32, "min_completion_tokens": 64}}}}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("preference_files", ["0123456789abcdef"])
        result = dg.materialize(all_assets, resources={**_resources(tmp_path), "compute": defs.resources["compute"]},
                                run_config=bad, instance=instance, raise_on_error=False,
                                tags=range_tags(["0123456789abcdef"]))
        assert not result.success
        started = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
        assert started == []  # raw_preferences never ran
        text = _errors(instance, result.run_id)
        for expected in ("orpo_adapter.learning_rate", "orpo_adapter.lora_r", "orpo_adapter.beta",
                         "min_completion_tokens (64) must be below max_length (32)"):
            assert expected in text, text


def test_base_model_folder_and_revision_are_checked_before_anything_is_written(tmp_path):
    cache = tmp_path / "models"
    cache.mkdir()
    with pytest.raises(BaseModelError, match="no such folder"):
        resolve_base_model(str(tmp_path / "no" / "model"), cache)
    with pytest.raises(BaseModelError, match="no such folder"):
        resolve_base_model("./missing-model", cache)
    for revision in ("../../..", "main/../../x", "/etc"):
        with pytest.raises(BaseModelError, match="not a branch, tag or commit"):
            resolve_base_model("owner/model", cache, revision)
    with pytest.raises(BaseModelError, match="could not be downloaded"):  # HF_HUB_OFFLINE=1
        resolve_base_model("owner/model", cache, "v1.0")
    assert list(cache.iterdir()) == []  # no empty cache folder left behind


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_a_tracking_server_that_does_not_answer_fails_the_run_in_seconds(tmp_path):
    from assets.model import base_model

    uri = f"http://127.0.0.1:{_dead_port()}"
    start = time.monotonic()
    with dg.instance_for_test() as instance:
        result = dg.materialize([base_model], resources=_resources(tmp_path, tracking_uri=uri), instance=instance,
                                raise_on_error=False,
                                run_config={"ops": {"base_model": {"config": {"base_model": str(tmp_path)}}}})
        took = time.monotonic() - start
        text = _errors(instance, result.run_id)
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_START"]
    assert f"MLflow tracking server {uri} does not answer" in text, text
    assert took < 30, took  # MLflow's own retries took 248 s


def test_temp_folders_of_dead_writers_are_swept_when_a_run_starts(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from assets.model import base_model

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    parent = tmp_path / "artifacts" / "merged_model"
    parent.mkdir(parents=True)
    dead = parent / f".run1.tmp-{gone.pid}-0123abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 10)
    dead_file = parent / f".hash_index.parquet.tmp-{gone.pid}-89abcdef"
    dead_file.write_bytes(b"x")
    live = parent / f".run2.tmp-{os.getpid()}-0123abcd"  # this process is alive: still being written
    live.mkdir()
    with dg.instance_for_test() as instance:
        result = dg.materialize([base_model], resources=_resources(tmp_path), instance=instance,
                                run_config={"ops": {"base_model": {"config": {"base_model": str(tiny_model_dir)}}}})
    assert result.success
    assert not dead.exists() and not dead_file.exists() and live.is_dir()
