"""A run worker killed with SIGKILL mid-training, on a real dagster-daemon and webserver: the run is marked FAILURE
within seconds, its `gpu` pool slot is freed so the next training run proceeds, and that run's start closes the
MLflow run the dead one left RUNNING. Skipped sensor and schedule ticks say why, in what the UI reads (GraphQL).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import yaml

from assets.partitions import range_tags, register_files
from orpo_pipeline.config import SAMPLE_DATA_DIR

from .test_retraining_e2e import LAUNCH, _graphql_vars, _stop, _try_graphql, wait_for
from .test_webserver import ROOT, _free_port, _graphql

TINY = {"base_model": {"config": {"base_model": "tiny-random-llama"}},
        "tokenized_dataset": {"config": {"max_length": 112}}}
REPO = {"repositoryLocationName": "orpo_pipeline", "repositoryName": "__repository__"}


def _ticks(port, kind, name):
    field, selector = ("sensorOrError", "sensorSelector") if kind == "sensor" else ("scheduleOrError", "scheduleSelector")
    state = "sensorState" if kind == "sensor" else "scheduleState"
    key = "sensorName" if kind == "sensor" else "scheduleName"
    query = ('{ %s(%s: {repositoryLocationName: "orpo_pipeline", repositoryName: "__repository__", %s: "%s"}) '
             '{ ... on %s { description %s { ticks(limit: 10) { status skipReason } } } } }'
             % (field, selector, key, name, kind.capitalize(), state))
    node = _graphql(port, query)["data"][field]
    return node["description"], node[state]["ticks"]


def _skipped(port, kind, name):
    description, ticks = _ticks(port, kind, name)
    skipped = [t["skipReason"] for t in ticks if t["status"] == "SKIPPED"]
    return (description, skipped) if skipped else None


def _stop_schedule(port):
    query = ('{ scheduleOrError(scheduleSelector: {repositoryLocationName: "orpo_pipeline", repositoryName: '
             '"__repository__", scheduleName: "retrain_schedule"}) { ... on Schedule { scheduleState { id } } } }')
    state_id = _graphql(port, query)["data"]["scheduleOrError"]["scheduleState"]["id"]
    stopped = _graphql(port, 'mutation { stopRunningSchedule(id: "%s") { __typename } }' % state_id)
    assert stopped["data"]["stopRunningSchedule"]["__typename"] == "ScheduleStateResult", stopped


def _launch(port, job, run_config, tags=None, assets=None):
    selector = {**REPO, "jobName": job}
    if assets:
        selector["assetSelection"] = [{"path": [a]} for a in assets]
    params = {"selector": selector, "runConfigData": run_config,
              "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}}
    launched = _graphql_vars(port, LAUNCH, {"params": params})["data"]["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def _status(home, run_id):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(run_id)
        return run.status.value if run else None


def _events(home, run_id):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return instance.all_logs(run_id)


def _worker_pid(home, run_id):
    for e in _events(home, run_id):
        text = (e.dagster_event.message if e.dagster_event else None) or e.user_message or ""
        m = re.search(r"Started process for run \(pid: (\d+)\)", text)
        if m:
            return int(m.group(1))
    return None


def _step_started(home, run_id, step):
    return any(e.dagster_event and e.dagster_event.event_type_value == "STEP_START" and e.step_key == step
               for e in _events(home, run_id))


def _mlflow_runs(state):
    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("orpo_pipeline")
    return {r.data.tags.get("dagster.run_id"): r.info.status for r in client.search_runs([exp.experiment_id])} if exp else {}


@pytest.fixture
def daemon(tmp_path, model_cache, tiny_model_dir):
    home, state = tmp_path / "dagster_home", tmp_path / "state"
    home.mkdir()
    state.mkdir()
    config = yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())
    # the shipped settings, with the polling shortened so the test takes seconds
    config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=1)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    (state / "models").symlink_to(model_cache, target_is_directory=True)
    # the schedule ticks every minute until the test has seen one tick (while there is no data yet), then is stopped
    env = {**os.environ, "DAGSTER_HOME": str(home), "ORPO_PIPELINE_HOME": str(state),
           "ORPO_DROP_SENSOR_INTERVAL": "2", "ORPO_RETRAIN_CRON": "* * * * *"}
    with dg.DagsterInstance.from_config(str(home)):
        pass  # create the stores once, before two processes would migrate them at once
    bindir, port = Path(sys.executable).parent, _free_port()
    log = open(tmp_path / "processes.log", "w")
    procs = [subprocess.Popen([str(bindir / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                               "-p", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)]
    try:
        wait_for("the webserver", lambda: _try_graphql(port, "{ version }"), 180)
        procs.append(subprocess.Popen([str(bindir / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield port, home, state
    finally:
        for p in procs:
            _stop(p)
        log.close()


def test_killed_run_is_failed_its_slot_freed_and_its_mlflow_run_closed(daemon):
    port, home, state = daemon

    # ticks that start nothing say why
    description, reasons = wait_for("a skipped sensor tick", lambda: _skipped(port, "sensor", "preference_drop_sensor"), 120)
    assert "drop folder" in description
    assert any(r and r.startswith("no new preference files in ") for r in reasons), reasons
    description, reasons = wait_for("a skipped schedule tick", lambda: _skipped(port, "schedule", "retrain_schedule"),
                                    150)
    assert "cleaned after the last trained model" in description
    assert set(reasons) == {"no cleaned preference data yet"}
    _stop_schedule(port)  # from here on a tick would start a retrain run

    # a training run that would take minutes, killed with SIGKILL once it holds the gpu pool's only slot
    with dg.DagsterInstance.from_config(str(home)) as instance:
        _, keys = register_files(instance, [SAMPLE_DATA_DIR / "factual.jsonl"], state / "sources")
    long_run = _launch(port, "orpo_training_job", {"ops": {**TINY, "orpo_adapter": {"config": {
        "max_steps": 100000, "logging_steps": 1, "per_device_train_batch_size": 2}}}}, tags=range_tags(keys))
    wait_for("training to start", lambda: _step_started(home, long_run, "orpo_adapter"), 300)
    wait_for("its MLflow run to be RUNNING", lambda: _mlflow_runs(state).get(long_run) == "RUNNING", 60)
    pid = _worker_pid(home, long_run)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for("the killed run to be marked FAILURE", lambda: _status(home, long_run) == "FAILURE", 60, 0.5)
    assert time.monotonic() - killed_at < 60

    # the next training run gets the slot, and its start closes the MLflow run the dead worker left open
    next_run = _launch(port, "__ASSET_JOB", {"ops": {"orpo_adapter": {"config": {
        "max_steps": 1, "per_device_train_batch_size": 2}}}}, assets=["orpo_adapter"])
    wait_for("the next training run to finish", lambda: _status(home, next_run) in ("SUCCESS", "FAILURE"), 300)
    assert _status(home, next_run) == "SUCCESS"
    runs = _mlflow_runs(state)
    assert runs[long_run] == "KILLED" and runs[next_run] == "FINISHED", runs
