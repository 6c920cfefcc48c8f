"""Retraining the way a user runs it: dagster-webserver and dagster-daemon as real processes on 127.0.0.1.

Files dropped into the drop folder become partitions and a run that registers a model version; runs launched
through GraphQL (what the UI's buttons send) queue up and train one at a time; a challenger that cannot beat the
champion leaves the alias where it is. Every wait has a timeout; processes are stopped by their own ids.
"""

import json
import os
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

from orpo_pipeline.config import SAMPLE_DATA_DIR

from .test_webserver import ROOT, _free_port, _graphql

RUN_CONFIG = {
    "ops": {
        "base_model": {"config": {"base_model": "tiny-random-llama"}},
        "tokenized_dataset": {"config": {"max_length": 192}},
        "orpo_adapter": {"config": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}},
        "benchmark_scores": {"config": {"max_eval_pairs": 8, "max_new_tokens": 4, "generation_prompts": ["Hi"]}},
    }
}
LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def wait_for(what, predicate, timeout, interval=2.0, diagnose=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f"\n{diagnose()}" if diagnose else ""))


def _diagnose(home, state, tmp):
    """What a person would look at first: the runs and their status, the registry, the processes' last words."""
    lines = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for run in instance.get_runs(limit=10):
            lines.append(f"run {run.run_id[:8]} {run.job_name} {run.status.value} tags={dict(run.tags)}")
    lines.append(f"model versions: {[(v.version, v.tags.get('champion_gate.decision')) for v in _versions(state)]}")
    log = (tmp / "processes.log").read_text(errors="replace").splitlines()
    noise = ("Checking for new runs", "skipped: no new", "BetaWarning", "return fn(")
    lines += [line for line in log if not any(n in line for n in noise)][-40:]
    return "\n".join(lines)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def deployment(tmp_path, model_cache, tiny_model_dir):
    home, state = tmp_path / "dagster_home", tmp_path / "state"
    home.mkdir()
    state.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    (state / "models").symlink_to(model_cache, target_is_directory=True)  # tiny model built once per session
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ORPO_PIPELINE_HOME": str(state),
        "ORPO_AUTOMATION_RUN_CONFIG": str(tmp_path / "run.yaml"),
        "ORPO_DROP_SENSOR_INTERVAL": "2",
        "ORPO_DROP_SETTLE_SECONDS": "1",
        "ORPO_CHAMPION_TOLERANCE": "-1",  # a challenger must beat the champion by 1.0: never
    }
    bindir, port = Path(sys.executable).parent, _free_port()
    # create the instance's SQLite stores once: two processes migrating a fresh store at once corrupt it
    with dg.DagsterInstance.from_config(str(home)):
        pass
    log = open(tmp_path / "processes.log", "w")
    procs = [
        subprocess.Popen([str(bindir / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
    ]
    try:
        wait_for("the webserver", lambda: _try_graphql(port, "{ version }"), 120)
        procs.append(subprocess.Popen([str(bindir / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield port, home, state, tmp_path
    finally:
        for p in procs:
            _stop(p)
        log.close()


def _try_graphql(port, query, variables=None):
    try:
        return _graphql(port, query) if variables is None else _graphql_vars(port, query, variables)
    except OSError:
        return None


def _graphql_vars(port, query, variables):
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _run_status(port, run_id):
    data = _graphql(port, '{ runOrError(runId: "%s") { ... on Run { status } } }' % run_id)
    return data["data"]["runOrError"].get("status")


def _client(state):
    # registry_uri spelled out: earlier in-process tests leave mlflow's global registry URI on their own store
    uri = f"sqlite:///{state / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(state):
    client = _client(state)
    try:
        return sorted(client.search_model_versions("name='orpo-pipeline-model'"), key=lambda v: int(v.version))
    except Exception:  # the store is created by the first run
        return []


def _champion(state):
    try:
        return _client(state).get_model_version_by_alias(
            "orpo-pipeline-model", "champion")
    except Exception:  # no store, no model or no alias yet
        return None


def _gated(state, n):
    """The first n versions, once the champion gate has tagged the last of them."""
    v = _versions(state)
    return v if len(v) >= n and "champion_gate.decision" in v[n - 1].tags else None


def _drop(state, name):
    drop = state / "drops"
    drop.mkdir(exist_ok=True)
    # written elsewhere and moved in, as a careful user would; the sensor also waits for it to settle
    shutil.copy(SAMPLE_DATA_DIR / name, state / name)
    os.replace(state / name, drop / name)


def _training_intervals(home, run_ids):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        out = []
        for run_id in run_ids:
            events = instance.all_logs(run_id)
            start = [e.timestamp for e in events if e.step_key == "orpo_adapter" and e.dagster_event
                     and e.dagster_event.event_type_value == "STEP_START"]
            end = [e.timestamp for e in events if e.step_key == "orpo_adapter" and e.dagster_event
                   and e.dagster_event.event_type_value == "STEP_SUCCESS"]
            out.append((start[0], end[0]))
        return sorted(out)


def test_drop_sensor_graphql_queue_and_champion_gate(deployment):
    port, home, state, tmp = deployment
    why = lambda: _diagnose(home, state, tmp)  # noqa: E731

    # 1. a new file in the drop folder -> a partition and a run that registers a model version
    _drop(state, "factual.jsonl")
    versions = wait_for("model version 1, gated", lambda: _gated(state, 1), 900, 5, why)
    client = _client(state)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        keys = instance.get_dynamic_partitions("preference_files")
    assert len(keys) == 1
    champion = client.get_model_version_by_alias("orpo-pipeline-model", "champion")
    assert str(champion.version) == str(versions[0].version) == "1"  # the first model ever becomes champion
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["dagster.partition_keys"] == keys[0]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} >= {"factual.jsonl", "tokenized_dataset"}

    # a renamed copy of the same bytes is not new data
    shutil.copy(SAMPLE_DATA_DIR / "factual.jsonl", state / "drops" / "factual_copy.jsonl")

    # 2. three materializations launched through GraphQL at once: queued, one training at a time, all finishing
    params = {"selector": {"repositoryLocationName": "orpo_pipeline", "repositoryName": "__repository__",
                           "jobName": "retrain_job"}, "runConfigData": RUN_CONFIG}
    run_ids = []
    for _ in range(3):
        launched = _graphql_vars(port, LAUNCH, {"params": params})["data"]["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_ids.append(launched["run"]["runId"])
    def finished():
        statuses = [_run_status(port, r) for r in run_ids]
        return statuses if all(x in ("SUCCESS", "FAILURE", "CANCELED") for x in statuses) else None

    statuses = wait_for("three GraphQL runs to finish", finished, 1200, 5, why)
    assert statuses == ["SUCCESS"] * 3, statuses
    spans = _training_intervals(home, run_ids)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), f"trainings overlapped: {spans}"
    assert len(_versions(state)) == 4
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_dynamic_partitions("preference_files")) == 1  # the renamed copy added nothing

    # 3. a new file whose challenger cannot beat the champion (tolerance -1): the alias stays
    _drop(state, "safety.json")
    versions = wait_for("model version 5, gated", lambda: _gated(state, 5), 900, 5, why)
    latest = versions[-1]
    assert latest.tags["champion_gate.decision"] == "rejected"
    assert "champion kept" in latest.tags["champion_gate.reason"]
    assert str(client.get_model_version_by_alias("orpo-pipeline-model", "champion").version) == "1"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_dynamic_partitions("preference_files")) == 2
