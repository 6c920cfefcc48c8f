"""Retrain when new preference data lands: a drop-folder sensor and a schedule."""

import json
import os
from pathlib import Path

import dagster as dg

from orpo_pipeline.data import drops
from resources import StorageResource

from .model import base_model, benchmark_scores, merged_model, orpo_adapter
from .partitions import preference_files, range_tags, register_files
from .preferences import cleaned_preferences, raw_preferences, tokenized_dataset

SETTLE_SECONDS = float(os.environ.get("ORPO_DROP_SETTLE_SECONDS", "2"))
SENSOR_INTERVAL = int(os.environ.get("ORPO_DROP_SENSOR_INTERVAL", "15"))
RETRAIN_CRON = os.environ.get("ORPO_RETRAIN_CRON", "0 3 * * *")


def automation_run_config() -> dict:
    """Run config for sensor- and schedule-launched runs: the YAML file named by ORPO_AUTOMATION_RUN_CONFIG, if any."""
    path = os.environ.get("ORPO_AUTOMATION_RUN_CONFIG", "")
    if not path:
        return {}
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}

ingest_and_train_job = dg.define_asset_job(
    "orpo_training_job",
    selection=dg.AssetSelection.all(),
    partitions_def=preference_files,
    description="Clean the given preference files (one partition each), then tokenize everything accepted, retrain, "
                "merge, benchmark and gate the champion.",
)
retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(tokenized_dataset).downstream() | dg.AssetSelection.assets(base_model),
    description="Retrain on every accepted preference file, without re-cleaning.",
)


@dg.sensor(job=ingest_and_train_job, minimum_interval_seconds=SENSOR_INTERVAL,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Watches the drop folder (storage resource's drop_dir, default state/drops): each new file, once "
                       "its size and mtime hold still, is stored by content and becomes a partition; one run of "
                       "orpo_training_job then cleans the new files and retrains. A tick that starts nothing says why.")
def preference_drop_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    """New files in the drop folder become partitions; one run cleans them and retrains."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    done, previous = cursor.get("done", {}), cursor.get("stats", {})
    ready, stats = drops.settled_files(storage.drop_path, previous, SETTLE_SECONDS)
    # files already registered are not hashed again while their size and mtime stay the same
    fresh = [p for p in ready if done.get(str(p)) != stats[str(p)]]
    refused: list[str] = []
    sources, new_keys = register_files(context.instance, fresh, storage.sources_path, storage.allow_symlinks, refused)
    for reason in refused:
        context.log.warning(f"not registered: {reason}")
    done.update({str(p): stats[str(p)] for p in fresh})
    context.update_cursor(json.dumps({"done": done, "stats": stats}))
    waiting = len(stats) - len(ready)
    if not new_keys:
        refusals = f"; not registered: {'; '.join(refused)}" if refused else ""
        return dg.SkipReason(f"no new preference files in {storage.drop_path}"
                             + (f" ({waiting} still being written or not settled yet)" if waiting else "") + refusals)
    names = {s.key: s.name for s in sources}
    context.log.info("new preference files: " + ", ".join(f"{names[k]} ({k})" for k in new_keys))
    # partitions were just added by register_files, so the range below resolves in this same tick
    request = dg.RunRequest(run_key=",".join(new_keys), tags=range_tags(new_keys), run_config=automation_run_config())
    return dg.SensorResult(run_requests=[request])


@dg.schedule(job=retrain_job, cron_schedule=RETRAIN_CRON, default_status=dg.DefaultScheduleStatus.RUNNING,
             description=f"Retrains on every accepted file ({RETRAIN_CRON}, env ORPO_RETRAIN_CRON) when preference "
                         "data was cleaned after the last trained model; otherwise the tick is skipped with the reason.")
def retrain_schedule(context: dg.ScheduleEvaluationContext):
    """Retrain only when preference data was cleaned after the last trained model."""
    instance = context.instance
    data = instance.get_latest_materialization_event(cleaned_preferences.key)
    model = instance.get_latest_materialization_event(orpo_adapter.key)
    if data is None:
        return dg.SkipReason("no cleaned preference data yet")
    if model is not None and model.timestamp >= data.timestamp:
        return dg.SkipReason(f"no new preference data since the last trained model (run {model.run_id[:8]})")
    return dg.RunRequest(run_key=f"retrain-after-{data.run_id}", run_config=automation_run_config())


__all__ = ["ingest_and_train_job", "retrain_job", "preference_drop_sensor", "retrain_schedule", "raw_preferences",
           "merged_model", "benchmark_scores"]
